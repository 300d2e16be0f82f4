/**
 * Broker options: the public option/hook types, their defaults and validation.
 */

import { idMatchesKey, isValidId, MAX_TOPIC_BYTES, MAX_TOPIC_LEVELS, MeshError, roleOfId } from '@edge-mesh/protocol';
import type { Client, ConnectPacket, PublishPacket, Subscription } from 'aedes';
import type { Logger } from 'pino';
import { MQTT_MAX_REMAINING_LENGTH } from './guard.ts';
import type { IpLimits } from './limits.ts';

/** aedes' matcher (qlobber) cannot hold topics deeper than 100 levels. */
export const AEDES_MAX_TOPIC_LEVELS = 100;

/**
 * Extension points for application checks, run after the broker's own checks (limits, topic policy and, with `auth`,
 * authentication and the role ACLs) have passed. A hook may return its verdict directly or as a Promise; throwing or
 * rejecting counts as a refusal (its message is logged as the reason).
 */
export interface BrokerHooks {
  /**
   * Runs on every CONNECT before authentication, with the raw packet (clientId, will, username, keepalive).
   * `false` closes the connection without a CONNACK.
   */
  preConnect?: (client: Client, packet: ConnectPacket) => boolean | Promise<boolean>;
  /** Runs after the broker's own authentication accepted the client. `false` answers CONNACK 5 (not authorized). */
  authenticate?: (client: Client, username: string | undefined, password: Buffer | undefined) => boolean | Promise<boolean>;
  /** `false` refuses the publish (aedes then disconnects a 3.1.1 client). `client` is null for an orphaned will. */
  authorizePublish?: (client: Client | null, packet: PublishPacket) => boolean | Promise<boolean>;
  /** Return the (possibly changed) subscription, or null to refuse it (SUBACK 0x80). */
  authorizeSubscribe?: (client: Client, subscription: Subscription) => Subscription | null | Promise<Subscription | null>;
}

/**
 * Authenticated mode (docs/security.md, "Admission" and "Connecting"). With it every CONNECT must prove an admitted key and every
 * publish/subscribe passes the per-role topic ACL (./acl.ts); without it the broker runs in "open mode".
 */
export interface BrokerAuthOptions {
  /** Operator keys whose signed admission/revocation records the broker accepts; each is implicitly admitted. */
  trustedOperators: { id: string; publicKey: Uint8Array }[];
  /** Folder of the `level` database holding admissions and revocations (created if missing). */
  dataDir: string;
  /** A CONNECT token's timestamp may differ from the broker's clock by at most this much. Default 60 000. */
  maxClockSkewMs?: number;
  /** A token's nonce is remembered this long; must be at least 2 × maxClockSkewMs. Default 120 000. */
  nonceTtlMs?: number;
}

export interface ResolvedAuthOptions {
  trustedOperators: ReadonlyMap<string, Uint8Array>;
  dataDir: string;
  maxClockSkewMs: number;
  nonceTtlMs: number;
}

/**
 * TLS on the broker's listener (mqtts; docs/operations.md, "TLS"). PEM text or bytes, as `tls.createServer` takes them.
 */
export interface BrokerTlsOptions {
  cert: string | Buffer;
  key: string | Buffer;
  /** CA(s) that sign client certificates; with `requireClientCert` a client must present one (mutual TLS). */
  ca?: string | Buffer;
  /** Refuse a client without a certificate signed by `ca`. Default false. */
  requireClientCert?: boolean;
}

export interface BrokerOptions {
  /** TCP port; 0 picks a free one (read it back from the handle). Default 1883. */
  port?: number;
  /** Interface to bind. Default '127.0.0.1' (loopback only). */
  host?: string;
  /** Largest whole MQTT packet (fixed header + body) accepted; larger declared packets drop the connection. */
  maxPacketBytes?: number;
  /** A connection must send its CONNECT within this time. */
  connectTimeoutMs?: number;
  /** Deepest topic (levels = '/' count + 1) a client may publish or subscribe to. At most 100. */
  maxTopicLevels?: number;
  /** Longest topic in UTF-8 bytes. */
  maxTopicBytes?: number;
  /** Cap on simultaneous TCP connections (`server.maxConnections`). */
  maxConnections?: number;
  /** Clients must use a keepalive between 1 and this many seconds (aedes `keepaliveLimit`); 0 disables the limit. */
  keepaliveLimitS?: number;
  /** A client whose socket does not drain within this time is disconnected; 0 waits forever. */
  drainTimeoutMs?: number;
  /** Packets aedes queues per client while its CONNECT is being authenticated. */
  queueLimit?: number;
  /** Longest clientId in characters. */
  maxClientIdLength?: number;
  /**
   * Cap on sockets from one IP address that have not finished CONNECT (idle-socket floods). Beyond it the oldest such
   * socket from that address is closed, so a new client (whose CONNECT follows at once) still gets in. Default 1000.
   */
  maxConnectionsPerIp?: number;
  /** CONNECT packets per second one IP address may send, sustained (token bucket). Default 50. */
  connectRatePerIp?: number;
  /** …and in a burst. Default 200. */
  connectBurstPerIp?: number;
  /**
   * This many refused CONNECTs from one IP address naming no admitted id, within `authFailureWindowMs`, limit the
   * address for `banMs`: then only CONNECTs naming an admitted id go on (the rest get CONNACK 3). Default 100.
   */
  addressFailuresBeforeLimit?: number;
  /**
   * This many refused CONNECTs naming one admitted id from one IP address within `authFailureWindowMs` ban that id
   * from that address for `banMs` (CONNACK 3, no signature checked). Default 20.
   */
  authFailuresBeforeBan?: number;
  /** Default 10 000. */
  authFailureWindowMs?: number;
  /** How long a limited address or a banned (id, address) pair stays so. Default 60 000. */
  banMs?: number;
  /**
   * Inbound bytes per second one connection may send, sustained (token bucket). Over it the broker stops reading the
   * socket until the bucket refills (TCP backpressure; nothing is dropped). Default 64 MiB/s.
   */
  byteRatePerClient?: number;
  /** …and in a burst. Default 64 MiB (16 of the largest packets). */
  byteBurstPerClient?: number;
  /** PUBLISH packets per second one client may send, sustained (token bucket). Default 20 000. */
  publishRatePerClient?: number;
  /** …and in a burst. Default 40 000. A client beyond it is disconnected. */
  publishBurstPerClient?: number;
  /**
   * Topic filters one connection may hold; filters past it get SUBACK 0x80 (`too-many-subscriptions`) and an
   * UNSUBSCRIBE frees room. Default 256.
   */
  maxSubscriptions?: number;
  /** pino logger; the broker logs through a child with `{ part: 'broker' }`. Default: silent. */
  logger?: Logger;
  hooks?: BrokerHooks;
  /** Authenticated mode; without it anonymous clients are accepted ("open mode", for local tests). */
  auth?: BrokerAuthOptions;
  /** Serve mqtts (TLS) instead of plaintext MQTT on the listener; the TLS handshake must finish within `connectTimeoutMs`. */
  tls?: BrokerTlsOptions;
  /**
   * Every connection opens with a PROXY protocol header (v1 or v2) from a trusted load balancer, and the client address
   * it names is used for limits, bans and logs; connections without one are closed. Only for a listener that nothing
   * but the balancer can reach (docs/operations.md, "Behind a load balancer"). Default false.
   */
  proxyProtocol?: boolean;
  /** Also serve MQTT over WebSocket on this port (ws://, or wss:// with `tls`), for browser clients. Off by default. */
  wsPort?: number;
  /** The WebSocket's HTTP path. Default '/mqtt'. */
  wsPath?: string;
  /** Serve Prometheus metrics at GET /metrics on this port (docs/operations.md, "Metrics"); off by default. */
  metricsPort?: number;
  /** Address the metrics port listens on. Default '127.0.0.1'. */
  metricsHost?: string;
}

export interface ResolvedBrokerOptions extends IpLimits {
  port: number;
  host: string;
  maxPacketBytes: number;
  connectTimeoutMs: number;
  maxTopicLevels: number;
  maxTopicBytes: number;
  maxConnections: number;
  keepaliveLimitS: number;
  drainTimeoutMs: number;
  queueLimit: number;
  maxClientIdLength: number;
  publishRatePerClient: number;
  publishBurstPerClient: number;
  maxSubscriptions: number;
  byteRatePerClient: number;
  byteBurstPerClient: number;
  logger: Logger | undefined;
  hooks: BrokerHooks;
  auth: ResolvedAuthOptions | undefined;
  tls: BrokerTlsOptions | undefined;
  proxyProtocol: boolean;
  wsPort: number | undefined;
  wsPath: string;
  metricsPort: number | undefined;
  metricsHost: string;
}

const KNOWN_KEYS = new Set([
  'port',
  'host',
  'maxPacketBytes',
  'connectTimeoutMs',
  'maxTopicLevels',
  'maxTopicBytes',
  'maxConnections',
  'keepaliveLimitS',
  'drainTimeoutMs',
  'queueLimit',
  'maxClientIdLength',
  'maxConnectionsPerIp',
  'connectRatePerIp',
  'connectBurstPerIp',
  'addressFailuresBeforeLimit',
  'authFailuresBeforeBan',
  'authFailureWindowMs',
  'banMs',
  'publishRatePerClient',
  'publishBurstPerClient',
  'maxSubscriptions',
  'byteRatePerClient',
  'byteBurstPerClient',
  'logger',
  'hooks',
  'auth',
  'tls',
  'proxyProtocol',
  'wsPort',
  'wsPath',
  'metricsPort',
  'metricsHost',
]);
const AUTH_KEYS = new Set(['trustedOperators', 'dataDir', 'maxClockSkewMs', 'nonceTtlMs']);
const HOOK_KEYS = new Set(['preConnect', 'authenticate', 'authorizePublish', 'authorizeSubscribe']);

/** Applies defaults and validates; throws MeshError('MESH_CONFIG') naming every bad field. */
export function resolveBrokerOptions(options: BrokerOptions = {}): ResolvedBrokerOptions {
  if (options === null || typeof options !== 'object') {
    throw new MeshError('MESH_CONFIG', 'broker options must be an object');
  }
  const {
    port = 1883,
    host = '127.0.0.1',
    maxPacketBytes = 4 * 1024 * 1024 + 64 * 1024,
    connectTimeoutMs = 10_000,
    maxTopicLevels = MAX_TOPIC_LEVELS,
    maxTopicBytes = MAX_TOPIC_BYTES,
    maxConnections = 10_000,
    keepaliveLimitS = 300,
    drainTimeoutMs = 20_000,
    queueLimit = 42,
    maxClientIdLength = 64,
    maxConnectionsPerIp = 1000,
    connectRatePerIp = 50,
    connectBurstPerIp = 200,
    addressFailuresBeforeLimit = 100,
    authFailuresBeforeBan = 20,
    authFailureWindowMs = 10_000,
    banMs = 60_000,
    publishRatePerClient = 20_000,
    publishBurstPerClient = 40_000,
    // Honest clients hold a handful: the SDK 3 or 4 filters, an agent 3 or 4 and one per deployment group, a router
    // 5, an operator 1 or 2. 256 leaves room for an app that names agents one by one instead of `+`, and bounds what
    // one connection adds to the broker's matcher (a 1.1 MB SUBSCRIBE once held 20,000 filters).
    maxSubscriptions = 256,
    byteRatePerClient = 64 * 1024 * 1024,
    byteBurstPerClient = 64 * 1024 * 1024,
    logger,
    hooks = {},
    auth,
    tls,
    proxyProtocol = false,
    wsPort,
    wsPath = '/mqtt',
  } = options;

  const bad: string[] = [];
  const fields: string[] = [];
  const fail = (field: string, problem: string): void => {
    fields.push(field);
    bad.push(`${field} (${problem})`);
  };
  const int = (name: string, value: unknown, min: number, max: number): void => {
    if (typeof value !== 'number' || !Number.isInteger(value) || value < min || value > max) {
      fail(name, `${JSON.stringify(value)}; expected an integer in ${min}..${max}`);
    }
  };
  for (const key of Object.keys(options)) {
    if (!KNOWN_KEYS.has(key)) fail(key, 'unknown option');
  }
  int('port', port, 0, 65_535);
  const { metricsPort, metricsHost = '127.0.0.1' } = options;
  if (metricsPort !== undefined) int('metricsPort', metricsPort, 0, 65_535);
  if (typeof metricsHost !== 'string' || metricsHost.length === 0)
    fail('metricsHost', `${JSON.stringify(metricsHost)}; expected a non-empty string`);
  if (typeof host !== 'string' || host.length === 0) fail('host', `${JSON.stringify(host)}; expected a non-empty string`);
  int('maxPacketBytes', maxPacketBytes, 64, MQTT_MAX_REMAINING_LENGTH + 5);
  int('connectTimeoutMs', connectTimeoutMs, 1, 600_000);
  int('maxTopicLevels', maxTopicLevels, 1, AEDES_MAX_TOPIC_LEVELS);
  int('maxTopicBytes', maxTopicBytes, 1, 65_535);
  int('maxConnections', maxConnections, 1, 10_000_000);
  int('keepaliveLimitS', keepaliveLimitS, 0, 65_535);
  int('drainTimeoutMs', drainTimeoutMs, 0, 3_600_000);
  int('queueLimit', queueLimit, 1, 100_000);
  int('maxClientIdLength', maxClientIdLength, 1, 65_535);
  int('maxConnectionsPerIp', maxConnectionsPerIp, 1, 10_000_000);
  int('connectRatePerIp', connectRatePerIp, 1, 1_000_000);
  int('connectBurstPerIp', connectBurstPerIp, 1, 1_000_000);
  int('addressFailuresBeforeLimit', addressFailuresBeforeLimit, 1, 1_000_000);
  int('authFailuresBeforeBan', authFailuresBeforeBan, 1, 1_000_000);
  int('authFailureWindowMs', authFailureWindowMs, 1, 86_400_000);
  int('banMs', banMs, 0, 86_400_000);
  int('publishRatePerClient', publishRatePerClient, 1, 10_000_000);
  int('publishBurstPerClient', publishBurstPerClient, 1, 10_000_000);
  int('maxSubscriptions', maxSubscriptions, 1, 1_000_000);
  int('byteRatePerClient', byteRatePerClient, 1024, 2 ** 40);
  int('byteBurstPerClient', byteBurstPerClient, 1024, 2 ** 40);
  if (logger !== undefined) {
    const l = logger as unknown as Record<string, unknown> | null;
    if (l === null || typeof l !== 'object' || typeof l.child !== 'function' || typeof l.warn !== 'function') {
      fail('logger', 'expected a pino logger');
    }
  }
  if (hooks === null || typeof hooks !== 'object') {
    fail('hooks', 'expected an object');
  } else {
    for (const [key, value] of Object.entries(hooks)) {
      if (!HOOK_KEYS.has(key)) fail(`hooks.${key}`, 'unknown hook');
      else if (value !== undefined && typeof value !== 'function') fail(`hooks.${key}`, 'expected a function');
    }
  }
  if (wsPort !== undefined) int('wsPort', wsPort, 0, 65_535);
  if (typeof wsPath !== 'string' || !wsPath.startsWith('/')) fail('wsPath', `${JSON.stringify(wsPath)}; expected a path starting with /`);
  if (typeof proxyProtocol !== 'boolean') fail('proxyProtocol', `${JSON.stringify(proxyProtocol)}; expected true or false`);
  const resolvedAuth = auth === undefined ? undefined : resolveAuth(auth, fail, int);
  if (tls !== undefined) {
    const pem = (v: unknown) => typeof v === 'string' || Buffer.isBuffer(v);
    if (tls === null || typeof tls !== 'object') fail('tls', 'expected { cert, key, ca?, requireClientCert? }');
    else {
      for (const key of Object.keys(tls))
        if (!['cert', 'key', 'ca', 'requireClientCert'].includes(key)) fail(`tls.${key}`, 'unknown option');
      if (!pem(tls.cert)) fail('tls.cert', 'expected PEM text or bytes');
      if (!pem(tls.key)) fail('tls.key', 'expected PEM text or bytes');
      if (tls.ca !== undefined && !pem(tls.ca)) fail('tls.ca', 'expected PEM text or bytes');
      if (tls.requireClientCert && tls.ca === undefined)
        fail('tls.requireClientCert', 'needs tls.ca, the CA that signs client certificates');
    }
  }
  if (bad.length > 0) {
    throw new MeshError('MESH_CONFIG', `invalid broker options: ${bad.join(', ')}`, { details: { fields } });
  }
  return {
    port,
    host,
    metricsPort,
    metricsHost,
    maxPacketBytes,
    connectTimeoutMs,
    maxTopicLevels,
    maxTopicBytes,
    maxConnections,
    keepaliveLimitS,
    drainTimeoutMs,
    queueLimit,
    maxClientIdLength,
    maxConnectionsPerIp,
    connectRatePerIp,
    connectBurstPerIp,
    addressFailuresBeforeLimit,
    authFailuresBeforeBan,
    authFailureWindowMs,
    banMs,
    publishRatePerClient,
    publishBurstPerClient,
    maxSubscriptions,
    byteRatePerClient,
    byteBurstPerClient,
    logger,
    hooks,
    auth: resolvedAuth,
    tls,
    proxyProtocol,
    wsPort,
    wsPath,
  };
}

function resolveAuth(
  auth: BrokerAuthOptions,
  fail: (field: string, problem: string) => void,
  int: (name: string, value: unknown, min: number, max: number) => void,
): ResolvedAuthOptions | undefined {
  if (auth === null || typeof auth !== 'object') {
    fail('auth', 'expected an object');
    return undefined;
  }
  for (const key of Object.keys(auth)) if (!AUTH_KEYS.has(key)) fail(`auth.${key}`, 'unknown option');
  const { trustedOperators, dataDir, maxClockSkewMs = 60_000, nonceTtlMs = 120_000 } = auth;
  const trusted = new Map<string, Uint8Array>();
  if (!Array.isArray(trustedOperators) || trustedOperators.length === 0) {
    fail('auth.trustedOperators', 'expected a non-empty array of { id, publicKey }');
  } else {
    trustedOperators.forEach((op, i) => {
      const id = (op as { id?: unknown } | null)?.id;
      const key = (op as { publicKey?: unknown } | null)?.publicKey;
      if (!isValidId(id) || roleOfId(id) !== 'operator' || !(key instanceof Uint8Array) || !idMatchesKey(id, key)) {
        fail(`auth.trustedOperators[${i}]`, 'expected an operator id and the 32-byte public key it derives from');
      } else {
        trusted.set(id, new Uint8Array(key));
      }
    });
  }
  if (typeof dataDir !== 'string' || dataDir.length === 0) fail('auth.dataDir', `${JSON.stringify(dataDir)}; expected a folder path`);
  int('auth.maxClockSkewMs', maxClockSkewMs, 1, 3_600_000);
  int('auth.nonceTtlMs', nonceTtlMs, 1, 7_200_000);
  // A token stays acceptable for 2 × skew (from ts − skew to ts + skew); its nonce must be remembered that long.
  if (typeof maxClockSkewMs === 'number' && typeof nonceTtlMs === 'number' && nonceTtlMs < 2 * maxClockSkewMs) {
    fail('auth.nonceTtlMs', `${nonceTtlMs}; must be at least 2 × maxClockSkewMs (${2 * maxClockSkewMs}) or a token could be replayed`);
  }
  return { trustedOperators: trusted, dataDir, maxClockSkewMs, nonceTtlMs };
}
