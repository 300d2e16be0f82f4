/**
 * The one MQTT connection recipe every mesh client shares (agent, SDK, later router and bridge).
 * It is the only I/O in protocol/, kept here because its rules are part of the transport contract:
 * MQTT 3.1.1, clean sessions, TCP_NODELAY on every (re)connect, jittered exponential reconnects and,
 * with an identity, a fresh signed CONNECT token on every attempt (the broker refuses a replayed one).
 * With a password (given, or in the URL) the same credentials go with every attempt instead, for an external broker
 * that checks passwords (docs/operations.md, "External brokers"). `mqtts://` URLs connect over TLS with `tls`'s CA,
 * certificate and key; a TLS failure is reported as MESH_TLS, not retried in silence (docs/operations.md, "TLS").
 */

import { type Identity, MeshError, makeConnectToken } from '@edge-mesh/protocol';
import mqtt, { type IClientOptions, type MqttClient } from 'mqtt';
import { describeTlsFailure, type MeshTlsOptions } from './tls.ts';
import { type BackoffOptions, MQTT_PROTOCOL_VERSION, reconnectDelayMs } from './transport.ts';

export interface MeshConnectionOptions {
  /** Defaults to `identity.id`; with an identity it must be that id. */
  clientId?: string;
  /**
   * The key this client proves on CONNECT: username = its id, password = a token signed over
   * (id, timestamp, nonce), made fresh for the first connect and before every reconnect.
   * Without it the client connects anonymously, which only an open broker accepts.
   */
  identity?: Identity;
  /**
   * Credentials for a broker that checks passwords (mosquitto, RabbitMQ): sent on the first connect and on every
   * reconnect. A password here, or one in the URL (`mqtt://user:pass@host`), replaces the identity's CONNECT token;
   * the username defaults to the URL's, then to the identity's id.
   */
  username?: string;
  password?: string | Buffer;
  /** CA, client certificate and key for `mqtts://` (docs/operations.md, "TLS"). */
  tls?: MeshTlsOptions;
  /**
   * QoS of this client's subscriptions (default 1). 0 on a NATS cluster (docs/operations.md, "Running on a NATS
   * cluster"): there a QoS 1 subscription is a JetStream consumer, slower and refused while the cluster elects
   * leaders after losing a node, while a QoS 0 one is plain NATS routing. With clean sessions a QoS 1 subscription
   * keeps nothing across a reconnect either, so the mesh loses nothing by it.
   */
  subscriptionQos?: 0 | 1;
  /**
   * QoS of what this client publishes to one receiver (requests, cancels, replies, leases, vouchers; default 1).
   * 0 on a NATS cluster (docs/operations.md, "Running on a NATS cluster"): there a QoS 1 PUBLISH is stored in
   * JetStream before the broker reads the client's next packet, and while the cluster elects leaders after losing a
   * node each one waits up to 4 s. Statuses and the last will stay QoS 1 and retained.
   */
  publishQos?: 0 | 1;
  keepaliveS?: number;
  connectTimeoutMs?: number;
  backoff?: BackoffOptions;
  will?: IClientOptions['will'];
  /**
   * mqtt.js by default builds, on the first packet it writes, a table of 65,536 two-byte buffers for the
   * packet ids and lengths it encodes: about 6 MB of heap held for the life of the process. `false` encodes
   * those numbers as they come instead; a device where memory counts (the agent, docs/agent.md) turns it off.
   * The table belongs to mqtt.js's packet writer, so one connection turning it off turns it off for the whole process.
   */
  numberCache?: boolean;
  /** Called on every successful (re)connect, before anything else runs on it. */
  onConnect?: (client: MqttClient) => void;
  onReconnectScheduled?: (delayMs: number, attempt: number) => void;
  /**
   * Called when the broker answers a CONNECT with a refusal (CONNACK return code > 0): MESH_UNAUTHORIZED
   * for "bad username or password" and "not authorized", MESH_RATE_LIMITED for "server unavailable" (the
   * broker's limits, docs/security.md "Connecting"), MESH_NOT_CONNECTED for the rest. Called once per run
   * of the same refusal (again only after a connect succeeded or the return code changed), so a caller
   * that logs it logs it once. The connection keeps retrying with backoff until closed; `firstConnect` is
   * true until a connect succeeded. `refusal` on the handle holds the latest one until a connect succeeds.
   * A failed TLS handshake (untrusted or mismatched certificate, a plaintext server, a client certificate refused) is
   * reported here too, as MESH_TLS with `details.reason` (Node's TLS error code).
   */
  onRefused?: (err: MeshError, firstConnect: boolean) => void;
}

export interface MeshConnection {
  client: MqttClient;
  /** Resolves on the first successful connect. */
  firstConnect: Promise<void>;
  /** The broker's latest CONNACK refusal, cleared by a successful connect. */
  readonly refusal: MeshError | undefined;
  /**
   * Stops reconnecting and ends the connection: with a DISCONNECT once the broker has acknowledged the QoS 1 messages
   * still in flight, or at once without one when the connection is down, drops while it waits, or the acknowledgements
   * take longer than CLOSE_GRACE_MS (the broker then publishes the client's will, if it has one).
   */
  close(): Promise<void>;
}

/** How long `close()` waits for the broker to acknowledge the QoS 1 messages in flight. */
export const CLOSE_GRACE_MS = 2_000;

const MQTT_DEBUG = /mqttjs/.test(process.env.DEBUG ?? '');
const noLog = () => {};

/** MQTT 3.1.1 CONNACK return codes (§3.2.2.3) and their MQTT 5 counterparts that mean "who you are is refused". */
const AUTH_REFUSALS = new Set([4, 5, 134, 135]);

/** MQTT 3.1.1 CONNACK 3, "server unavailable": the mesh broker's answer when a limit refuses a CONNECT. */
const CONNACK_SERVER_UNAVAILABLE = 3;

/** The MeshError for a CONNACK refusal as mqtt.js reports it, or undefined for any other error. */
export function connectRefusal(err: unknown, clientId: string): MeshError | undefined {
  const e = err as { code?: unknown; message?: unknown } | null;
  if (!e || typeof e.code !== 'number' || e.code <= 0 || typeof e.message !== 'string' || !e.message.startsWith('Connection refused'))
    return undefined;
  const reason = e.message.replace(/^Connection refused:\s*/, '') || `return code ${e.code}`;
  if (e.code === CONNACK_SERVER_UNAVAILABLE) {
    return new MeshError('MESH_RATE_LIMITED', `the broker is limiting ${clientId}: ${reason.toLowerCase()}; retrying later`, {
      cause: err,
      details: { clientId, returnCode: e.code },
    });
  }
  return AUTH_REFUSALS.has(e.code)
    ? new MeshError('MESH_UNAUTHORIZED', `the broker refused ${clientId}: ${reason.toLowerCase()}`, {
        cause: err,
        details: { clientId, returnCode: e.code },
      })
    : new MeshError('MESH_NOT_CONNECTED', `the broker refused ${clientId}: ${reason.toLowerCase()}`, {
        cause: err,
        details: { clientId, returnCode: e.code },
      });
}

/** The transports a broker URL may name, as mqtt.js calls them, and their default ports. */
const BROKER_PROTOCOLS: Record<string, { protocol: BrokerTransport; port: number }> = {
  'mqtt:': { protocol: 'mqtt', port: 1883 },
  'tcp:': { protocol: 'mqtt', port: 1883 },
  'mqtts:': { protocol: 'mqtts', port: 8883 },
  'ws:': { protocol: 'ws', port: 80 },
  'wss:': { protocol: 'wss', port: 443 },
};

type BrokerTransport = 'mqtt' | 'mqtts' | 'ws' | 'wss';

/**
 * The brokers a client may use, in order: one URL, a comma-separated list of them, or an array. Each must be
 * `mqtt://host:port` (or `tcp://`), or `mqtts://host:port` for TLS (docs/security.md), or MQTT over WebSocket as
 * `ws://host:port/path` or `wss://…`; a bad entry is MESH_CONFIG. In a list, every WebSocket entry uses the first
 * URL's path.
 */
export function brokerList(brokers: string | readonly string[]): { url: string; host: string; port: number; protocol: BrokerTransport }[] {
  const entries = (typeof brokers === 'string' ? brokers.split(',') : [...brokers]).map((u) => u.trim()).filter((u) => u !== '');
  if (entries.length === 0) throw new MeshError('MESH_CONFIG', 'no broker URL given');
  return entries.map((url) => {
    let parsed: URL;
    try {
      parsed = new URL(url);
    } catch {
      throw new MeshError('MESH_CONFIG', `not a broker URL: ${JSON.stringify(url)}`);
    }
    const transport = BROKER_PROTOCOLS[parsed.protocol];
    if (!transport || parsed.hostname === '')
      throw new MeshError(
        'MESH_CONFIG',
        `a broker URL is mqtt://host:port, mqtts://host:port, ws://host:port/path or wss://host:port/path, got ${JSON.stringify(url)}`,
      );
    const port = parsed.port === '' ? transport.port : Number(parsed.port);
    // URL keeps an IPv6 host in brackets; net.connect wants it bare.
    return { url, host: parsed.hostname.replace(/^\[|\]$/g, ''), port, protocol: transport.protocol };
  });
}

/**
 * Opens the connection to the first broker of `brokers` (one URL, a comma-separated list, or an array). Each
 * reconnect attempt goes to the next broker of the list, round the list (mqtt.js's `servers` option), so a
 * client whose broker is gone fails over at its next retry.
 */
export function openMeshConnection(brokers: string | readonly string[], options: MeshConnectionOptions): MeshConnection {
  const {
    identity,
    keepaliveS = 10,
    connectTimeoutMs = 5_000,
    backoff,
    will,
    onConnect,
    onReconnectScheduled,
    onRefused,
    numberCache,
  } = options;
  const clientId = options.clientId ?? identity?.id;
  if (clientId === undefined) throw new MeshError('MESH_CONFIG', 'a mesh connection needs a client id or an identity');
  if (identity && clientId !== identity.id) {
    throw new MeshError('MESH_CONFIG', `client id ${JSON.stringify(clientId)} must be the identity's id ${identity.id}`);
  }
  const servers = brokerList(brokers);
  const brokerUrl = servers[0]!.url;
  const credentials = resolveCredentials(brokerUrl, options, identity);
  const client = mqtt.connect(brokerUrl, {
    clientId,
    ...(servers.length > 1 ? { servers: servers.map(({ host, port, protocol }) => ({ host, port, protocol })) } : {}),
    protocolVersion: MQTT_PROTOCOL_VERSION,
    clean: true,
    keepalive: keepaliveS,
    connectTimeout: connectTimeoutMs,
    // Reconnects are scheduled below with jitter; mqtt.js's own timer has a fixed period.
    reconnectPeriod: 0,
    resubscribe: false,
    queueQoSZero: false,
    // `auth: undefined` keeps mqtt.js from reading the URL's user:pass over ours (resolveCredentials read them).
    auth: undefined,
    ...(credentials.username !== undefined ? { username: credentials.username } : {}),
    ...(credentials.password !== undefined ? { password: credentials.password } : {}),
    ...(credentials.useToken && identity ? { password: makeConnectToken(identity) } : {}),
    ...(options.tls ? tlsConnectOptions(options.tls) : {}),
    ...(will ? { will } : {}),
    ...(numberCache === false ? { writeCache: false } : {}),
    // mqtt.js calls its `debug` logger a dozen times per packet; a no-op costs less, unless DEBUG asks for mqtt.js's logs.
    ...(MQTT_DEBUG ? {} : { log: noLog }),
  });
  let attempt = 0;
  let closed = false;
  let connectedOnce = false;
  let timer: NodeJS.Timeout | undefined;
  let refusal: MeshError | undefined;
  let resolveFirst!: () => void;
  const firstConnect = new Promise<void>((resolve) => (resolveFirst = resolve));

  client.on('connect', () => {
    attempt = 0;
    connectedOnce = true;
    refusal = undefined;
    // mqtt.js never sets TCP_NODELAY; without it small request bursts stall on delayed ACKs.
    (client.stream as { setNoDelay?: (on: boolean) => void }).setNoDelay?.(true);
    onConnect?.(client);
    resolveFirst();
  });
  client.on('close', () => {
    if (closed || timer) return;
    const delayMs = reconnectDelayMs(attempt++, backoff);
    onReconnectScheduled?.(delayMs, attempt);
    timer = setTimeout(() => {
      timer = undefined;
      if (closed) return;
      // mqtt.js sends `client.options.password` again on reconnect; a token is single-use, so renew it. A password
      // the caller gave stays as it is: the broker that checks it would refuse a token.
      if (credentials.useToken && identity) client.options.password = makeConnectToken(identity);
      client.reconnect();
    }, delayMs);
  });
  // Errors (refused connection, protocol errors) are followed by 'close', which reconnects.
  client.on('error', (err) => {
    if (closed) return;
    const refused = connectRefusal(err, clientId) ?? describeTlsFailure(err, brokerUrl, connectedOnce);
    if (!refused) return;
    const repeat =
      refusal !== undefined &&
      refusal.code === refused.code &&
      refusal.details?.returnCode === refused.details?.returnCode &&
      refusal.details?.reason === refused.details?.reason;
    refusal = refused;
    if (!repeat) onRefused?.(refused, !connectedOnce);
  });

  return {
    client,
    firstConnect,
    get refusal() {
      return refusal;
    },
    close: () => {
      closed = true;
      if (timer) clearTimeout(timer);
      return new Promise<void>((resolve) => {
        const end = (force: boolean) => client.end(force, {}, () => resolve());
        if (client.disconnected || !client.connected) return end(true);
        if (Object.keys(client.outgoing).length === 0) return end(false);
        // mqtt.js's own graceful end waits for these acknowledgements without a bound, and for ever once the connection
        // drops, since nothing reconnects it after this: the wait is made here, bounded. (mqtt.js tells that its
        // in-flight table emptied only once it is ending, so the table is looked at.)
        const settle = (drained: boolean) => {
          clearInterval(check);
          clearTimeout(grace);
          client.off('close', onClose);
          end(!(drained && client.connected));
        };
        const onClose = () => settle(false);
        const check = setInterval(() => Object.keys(client.outgoing).length === 0 && settle(true), 5);
        const grace = setTimeout(() => settle(false), CLOSE_GRACE_MS);
        client.once('close', onClose);
      });
    },
  };
}

/**
 * A hold on a connection's socket writes from now to this event-loop turn's check phase, so that what is written
 * meanwhile leaves in one write and reaches the broker in one read: a received message's PUBACK, which mqtt.js writes
 * once the message handler returns (mqtt.js lib/handlers/publish.js), and what the handler's work sends in the same
 * turn (the agent's inline reply, the app's next request). The release is a setImmediate, queued behind
 * `afterMicrotasks` microtasks (the agent's inline runs are handed over in a microtask and run in the check phase:
 * its release must come after theirs). One hold per stream and turn; `stream` is read at each hold, so a connection
 * that failed over holds its new socket. The returned function starts a hold.
 */
export function turnWriteHold(stream: () => unknown, afterMicrotasks = 0): () => void {
  let held: unknown;
  return () => {
    const s = stream() as { cork?: () => void; uncork?: () => void; destroyed?: boolean } | undefined;
    if (!s?.cork || !s.uncork || s.destroyed || s === held) return;
    s.cork();
    held = s;
    let release = () => {
      setImmediate(() => {
        if (held === s) held = undefined;
        s.uncork!();
      });
    };
    for (let i = 0; i < afterMicrotasks; i++) {
      const next = release;
      release = () => queueMicrotask(next);
    }
    release();
  };
}

/**
 * Subscribes `filters` on a connection that has just connected, and calls `onSubscribed` once the broker granted them
 * all. A refusal (an error, or a SUBACK failure code 0x80) drops the connection instead, so that it reconnects with
 * backoff and subscribes again: a client whose subscriptions failed would otherwise look connected and receive
 * nothing. A clustered broker refuses while it cannot create the subscription's state (NATS: a QoS 1 subscription
 * is a JetStream consumer, refused while the cluster elects a new stream leader after a node died).
 */
export function subscribeOrReconnect(
  client: MqttClient,
  filters: string[],
  qos: 0 | 1,
  onRefused: (reason: string) => void,
  onSubscribed: () => void = () => {},
): void {
  client.subscribe(filters, { qos }, (err, granted) => {
    const failed = err ? err.message : granted?.some((g) => g.qos === 128) ? 'a subscription was refused (SUBACK 0x80)' : undefined;
    if (failed === undefined) return onSubscribed();
    onRefused(failed);
    (client.stream as { destroy?: () => void } | undefined)?.destroy?.();
  });
}

/** Which credentials a connection sends: a given password (options, then URL) wins over the identity's token. */
export function resolveCredentials(
  brokerUrl: string,
  options: Pick<MeshConnectionOptions, 'username' | 'password'>,
  identity: Identity | undefined,
): { username: string | undefined; password: string | Buffer | undefined; useToken: boolean } {
  let urlUser: string | undefined;
  let urlPassword: string | undefined;
  try {
    const url = new URL(brokerUrl);
    if (url.username !== '') urlUser = decodeURIComponent(url.username);
    if (url.password !== '') urlPassword = decodeURIComponent(url.password);
  } catch {
    // mqtt.js reports a URL it cannot use; nothing to read here.
  }
  const password = options.password ?? urlPassword;
  const username = options.username ?? urlUser ?? identity?.id;
  return { username, password, useToken: password === undefined && identity !== undefined };
}

function tlsConnectOptions(tls: MeshTlsOptions): Partial<IClientOptions> {
  return {
    ...(tls.ca !== undefined ? { ca: tls.ca } : {}),
    ...(tls.cert !== undefined ? { cert: tls.cert } : {}),
    ...(tls.key !== undefined ? { key: tls.key } : {}),
    ...(tls.servername !== undefined ? { servername: tls.servername } : {}),
    rejectUnauthorized: true,
  };
}
