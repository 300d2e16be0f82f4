/**
 * Broker options: the public option/hook types, their defaults and validation.
 */
import type { Logger } from 'pino';
import type { Client, ConnectPacket, PublishPacket, Subscription } from 'aedes';
import { MAX_TOPIC_BYTES, MAX_TOPIC_LEVELS, MeshError } from '../protocol/index.ts';
import { MQTT_MAX_REMAINING_LENGTH } from './guard.ts';

/** aedes' matcher (qlobber) cannot hold topics deeper than 100 levels. */
export const AEDES_MAX_TOPIC_LEVELS = 100;

/**
 * Extension points, run after the broker's own checks have passed. They are where the identity issue adds
 * Ed25519 authentication and per-identity ACLs. A hook may return its verdict directly or as a Promise; throwing or
 * rejecting counts as a refusal (its message is logged as the reason).
 */
export interface BrokerHooks {
  /**
   * Runs on every CONNECT before authentication, with the raw packet (clientId, will, username, keepalive).
   * Identity issue: per-IP token buckets, connection-storm limits, bans (cheap checks before any signature verify).
   * `false` closes the connection without a CONNACK.
   */
  preConnect?: (client: Client, packet: ConnectPacket) => boolean | Promise<boolean>;
  /**
   * Identity issue: verify the Ed25519 token carried in username/password and bind it to `client.id`.
   * `false` answers CONNACK 5 (not authorized).
   */
  authenticate?: (client: Client, username: string | undefined, password: Buffer | undefined) => boolean | Promise<boolean>;
  /**
   * Identity issue: topic ACL (identity-in-topic rules), per-client publish token bucket.
   * `false` refuses the publish (aedes then disconnects a 3.1.1 client). `client` is null for an orphaned will.
   */
  authorizePublish?: (client: Client | null, packet: PublishPacket) => boolean | Promise<boolean>;
  /**
   * Identity issue: subscription allow-list per role. Return the (possibly changed) subscription, or null to
   * refuse it (SUBACK 0x80).
   */
  authorizeSubscribe?: (client: Client, subscription: Subscription) => Subscription | null | Promise<Subscription | null>;
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
  /** pino logger; the broker logs through a child with `{ part: 'broker' }`. Default: silent. */
  logger?: Logger;
  hooks?: BrokerHooks;
}

export interface ResolvedBrokerOptions {
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
  logger: Logger | undefined;
  hooks: BrokerHooks;
}

const KNOWN_KEYS = new Set([
  'port', 'host', 'maxPacketBytes', 'connectTimeoutMs', 'maxTopicLevels', 'maxTopicBytes', 'maxConnections',
  'keepaliveLimitS', 'drainTimeoutMs', 'queueLimit', 'maxClientIdLength', 'logger', 'hooks',
]);
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
    logger,
    hooks = {},
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
  if (bad.length > 0) {
    throw new MeshError('MESH_CONFIG', `invalid broker options: ${bad.join(', ')}`, { details: { fields } });
  }
  return {
    port, host, maxPacketBytes, connectTimeoutMs, maxTopicLevels, maxTopicBytes, maxConnections, keepaliveLimitS,
    drainTimeoutMs, queueLimit, maxClientIdLength, logger, hooks,
  };
}
