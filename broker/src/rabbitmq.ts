/**
 * The mesh's decisions for RabbitMQ 3.10 as an external broker (docs/operations.md, "Running on RabbitMQ"): an HTTP
 * service for the `rabbitmq_auth_backend_http` plugin, which asks it who may connect and what they may touch.
 *
 * The request and answer formats follow rabbitmq/rabbitmq-server v3.10.8,
 * deps/rabbitmq_auth_backend_http/src/rabbit_auth_backend_http.erl: each path gets a form-encoded query (GET) or body
 * (POST) and the answer body is `allow` (for user_path optionally followed by tags) or `deny`; any other answer is an
 * error to RabbitMQ, and it refuses then too.
 *
 *   user_path      username, password, vhost           a CONNECT: the password is the mesh CONNECT token of the
 *                                                      id in `username` (protocol/identity.ts), checked as the
 *                                                      embedded broker checks it (./handlers/connect.ts): form,
 *                                                      freshness, the admission, an unseen nonce, the signature
 *   vhost_path     username, vhost, ip, client_id      the MQTT client id must be the username, so nobody can
 *                                                      take over another id's session (RabbitMQ closes the older
 *                                                      connection of a client id, cluster-wide)
 *   resource_path  username, vhost, resource, name,    the `amq.topic` exchange (read, write) and the client's own
 *                  permission                          subscription queues `mqtt-subscription-{id}qos0|1`
 *   topic_path     username, vhost, name, permission,  the routing key is the MQTT topic with `/` as `.` and `+`
 *                  routing_key, variable_map.client_id as `*` (rabbit_mqtt_util:mqtt_to_amqp); it is mapped back
 *                                                      and checked against the per-role ACL (./acl.ts, ./policy.ts)
 *
 * In 3.10 the MQTT plugin checks topics on PUBLISH (deps/rabbitmq_mqtt/src/rabbit_mqtt_processor.erl,
 * check_topic_access) and, through the AMQP channel, on the queue binding a SUBSCRIBE makes: a refused SUBSCRIBE
 * closes the connection. Each connection caches up to 12 allowed topics, so a decision is not asked again per message.
 *
 * Revocation: RabbitMQ asks again only at the next CONNECT, so a connection that is open stays open. The service
 * closes it itself. It connects to the cluster as its own user (`edge_mesh_auth`, a random password it never hands
 * out), with the revoked id as MQTT client id: the MQTT plugin keeps client ids unique across the cluster
 * (rabbit_mqtt_collector) and closes the older connection, on whichever node it is. Its reconnect is then refused
 * at user_path. Expired admissions are closed the same way.
 *
 * Admissions: the service keeps the admission store (./store.ts) the embedded broker keeps. Operators admit and
 * revoke as on the embedded broker (`edge-mesh admit|revoke --broker rabbitmq-urls`): they publish the signed record
 * on their admin topic, which only the service's own user may read; the service applies it and answers on the
 * operator's acks topic.
 */
import { randomBytes, timingSafeEqual } from 'node:crypto';
import http from 'node:http';
import type { AddressInfo } from 'node:net';
import { type MeshConnection, openMeshConnection } from '@edge-mesh/client';
import {
  type Admission,
  encodeMessage,
  isValidId,
  MAX_TOPIC_BYTES,
  MAX_TOPIC_LEVELS,
  MeshError,
  type Revocation,
  type SignedRecord,
  topics,
} from '@edge-mesh/protocol';
import { type Logger, pino } from 'pino';
import { ACL_DENY, aclPublish, aclSubscribe, type MeshSession, newSession, takeAdminToken } from './acl.ts';
import { applyAdminRecord, MAX_ADMIN_RECORD_BYTES } from './admin.ts';
import { checkConnect, stillAdmitted, verifyConnect } from './handlers/connect.ts';
import { REFUSAL_CODES, type RefusalReason } from './handlers/refusals.ts';
import { NonceCache } from './limits.ts';
import { checkPublishTopic, checkSubscribeFilter, type TopicLimits } from './policy.ts';
import { AdmissionStore } from './store.ts';

/** The service's own RabbitMQ user. `_` is not allowed in mesh ids, so no identity can be named so. */
export const RABBITMQ_SERVICE_USER = 'edge_mesh_auth';
/** The RabbitMQ MQTT plugin's exchange and subscription queue names (rabbit_mqtt_util:subcription_queue_name). */
const EXCHANGE = 'amq.topic';
const queueNames = (clientId: string) => [`mqtt-subscription-${clientId}qos0`, `mqtt-subscription-${clientId}qos1`];
/** Request bodies larger than this are refused (a token is 88 bytes, percent-encoded at most 264). */
const MAX_BODY_BYTES = 4096;
const LIMITS: TopicLimits = { maxTopicLevels: MAX_TOPIC_LEVELS, maxTopicBytes: MAX_TOPIC_BYTES };

export interface RabbitmqAuthOptions {
  /** Operator keys whose admission and revocation records are accepted; each may connect as an operator. */
  trustedOperators: { id: string; publicKey: Uint8Array }[];
  /** The admission store's folder (the same format as `edge-mesh broker --data`). */
  dataDir: string;
  /** The RabbitMQ nodes' MQTT URLs (any order): where admin records are read and revoked ids are disconnected. */
  brokerUrls?: readonly string[];
  /** HTTP listen address; default 127.0.0.1 and port 0 (any free port). */
  host?: string;
  port?: number;
  /** The RabbitMQ vhost the MQTT plugin uses (`mqtt.vhost`); others are refused. Default `/`. */
  vhost?: string;
  /** A CONNECT token's timestamp may differ from this clock by at most this much. Default 60 000. */
  maxClockSkewMs?: number;
  logger?: Logger;
}

export interface RabbitmqAuthHandle {
  /** `http://host:port`: the base of the four paths (`/auth/user`, `/auth/vhost`, `/auth/resource`, `/auth/topic`). */
  readonly url: string;
  /** Allow and deny answers so far, per path and reason. */
  readonly counters: { allow: Record<string, number>; deny: Record<string, number>; kicks: number };
  admit(signed: SignedRecord): Promise<Admission>;
  /** Stores the revocation and closes the id's connection on whichever node it is. */
  revoke(signed: SignedRecord): Promise<Revocation>;
  /** Resolves once the service's own MQTT connection is up (it reads the admin records). */
  readonly ready: Promise<void>;
  close(): Promise<void>;
}

/** The `rabbitmq.conf` lines that point RabbitMQ at the service (POST keeps tokens out of URLs and access logs). */
export function rabbitmqAuthConf(serviceUrl: string): string {
  return [
    'auth_backends.1 = http',
    'auth_http.http_method = post',
    `auth_http.user_path = ${serviceUrl}/auth/user`,
    `auth_http.vhost_path = ${serviceUrl}/auth/vhost`,
    `auth_http.resource_path = ${serviceUrl}/auth/resource`,
    `auth_http.topic_path = ${serviceUrl}/auth/topic`,
    'auth_http.request_timeout = 5000',
    'auth_http.connection_timeout = 2000',
    'mqtt.allow_anonymous = false',
    '',
  ].join('\n');
}

/**
 * Decodes `application/x-www-form-urlencoded` into raw bytes per field: RabbitMQ percent-encodes the password's bytes
 * (rabbit_http_util:quote_plus), and a CONNECT token is binary, so it must not go through a UTF-8 decoder. Repeated
 * or malformed fields make the whole request invalid (undefined).
 */
export function decodeForm(text: string): Map<string, Buffer> | undefined {
  const out = new Map<string, Buffer>();
  if (text === '') return out;
  for (const pair of text.split('&')) {
    const eq = pair.indexOf('=');
    const key = eq === -1 ? pair : pair.slice(0, eq);
    const value = eq === -1 ? '' : pair.slice(eq + 1);
    const k = percentDecode(key);
    const v = percentDecode(value);
    if (k === undefined || v === undefined) return undefined;
    const name = k.toString('latin1');
    if (out.has(name)) return undefined;
    out.set(name, v);
  }
  return out;
}

function percentDecode(s: string): Buffer | undefined {
  const bytes: number[] = [];
  for (let i = 0; i < s.length; i++) {
    const c = s.charCodeAt(i);
    if (c === 43) bytes.push(32);
    else if (c === 37) {
      const hex = s.slice(i + 1, i + 3);
      if (!/^[0-9A-Fa-f]{2}$/.test(hex)) return undefined;
      bytes.push(Number.parseInt(hex, 16));
      i += 2;
    } else if (c < 128) bytes.push(c);
    else return undefined;
  }
  return Buffer.from(bytes);
}

/** RabbitMQ's routing key (or binding key) back to the MQTT topic (or filter): `.` ↔ `/`, `*` → `+`. */
export function routingKeyToTopic(key: string): string {
  let out = '';
  for (const ch of key) out += ch === '.' ? '/' : ch === '/' ? '.' : ch === '*' ? '+' : ch;
  return out;
}

export type RabbitmqDecision = { allow: true } | { allow: false; reason: string };

const ALLOW: RabbitmqDecision = { allow: true };
const deny = (reason: string): RabbitmqDecision => ({ allow: false, reason });

/**
 * The four decisions, without HTTP: what each path answers for the fields RabbitMQ sends. `store` holds the
 * admissions; `service` is the service's own user and password.
 */
export class RabbitmqDecisions {
  private readonly nonces: NonceCache;

  constructor(
    private readonly store: AdmissionStore,
    private readonly service: { user: string; password: Buffer; clientIds: ReadonlySet<string> },
    private readonly opts: { vhost: string; maxClockSkewMs: number },
    private readonly onLogin: (id: string, expires: number) => void = () => {},
  ) {
    this.nonces = new NonceCache(2 * opts.maxClockSkewMs);
  }

  /** The session (role) of an id admitted now, for the ACL checks; undefined when it is not. */
  private sessionOf(id: string, now: number): MeshSession | undefined {
    const grant = this.store.lookup(id, now);
    if (typeof grant === 'string') return undefined;
    return newSession(id, grant.role, grant.expires, 0);
  }

  private isService(username: string): boolean {
    return username === this.service.user;
  }

  user(f: Map<string, Buffer>, now = Date.now()): RabbitmqDecision {
    const username = f.get('username')?.toString('utf8') ?? '';
    const password = f.get('password') ?? Buffer.alloc(0);
    if (this.isService(username)) {
      const ok = password.byteLength === this.service.password.byteLength && timingSafeEqual(password, this.service.password);
      return ok ? ALLOW : deny('bad-signature');
    }
    // The same checks, in the same order of cost, as a CONNECT to the embedded broker (clean session and keepalive
    // are not sent to the service; RabbitMQ keeps no session for a clean client either way).
    const check = checkConnect(
      { clientId: username, username, password, clean: true, keepalive: 1 },
      { maxClientIdLength: 64, keepaliveLimitS: 0, limits: LIMITS, auth: { maxClockSkewMs: this.opts.maxClockSkewMs } },
      now,
    );
    if (!check.ok) return deny(check.reason);
    const verified = verifyConnect(username, check.token, this.store, this.nonces, now, 0);
    if (!verified.ok) return deny(verified.reason);
    this.onLogin(username, verified.session.expires);
    return ALLOW;
  }

  vhost(f: Map<string, Buffer>, now = Date.now()): RabbitmqDecision {
    const username = f.get('username')?.toString('utf8') ?? '';
    if (f.get('vhost')?.toString('utf8') !== this.opts.vhost) return deny('vhost');
    if (this.isService(username)) return ALLOW;
    if (!stillAdmitted(this.store, username, now) || !isValidId(username)) return deny('not-admitted');
    // An AMQP connection has no client id: only MQTT connections, whose client id is the user's own id.
    if (f.get('client_id')?.toString('utf8') !== username) return deny('client-id-not-username');
    return ALLOW;
  }

  resource(f: Map<string, Buffer>, now = Date.now()): RabbitmqDecision {
    const username = f.get('username')?.toString('utf8') ?? '';
    const kind = f.get('resource')?.toString('utf8');
    const name = f.get('name')?.toString('utf8') ?? '';
    const permission = f.get('permission')?.toString('utf8');
    if (f.get('vhost')?.toString('utf8') !== this.opts.vhost) return deny('vhost');
    const ownQueues = this.isService(username) ? [...this.service.clientIds].flatMap(queueNames) : queueNames(username);
    if (!this.isService(username) && !stillAdmitted(this.store, username, now)) return deny('not-admitted');
    if (kind === 'exchange' && name === EXCHANGE && (permission === 'read' || permission === 'write')) return ALLOW;
    if (kind === 'queue' && ownQueues.includes(name) && (permission === 'configure' || permission === 'read' || permission === 'write'))
      return ALLOW;
    return deny('acl');
  }

  topic(f: Map<string, Buffer>, now = Date.now()): RabbitmqDecision {
    const username = f.get('username')?.toString('utf8') ?? '';
    const permission = f.get('permission')?.toString('utf8');
    const key = f.get('routing_key')?.toString('utf8');
    if (f.get('vhost')?.toString('utf8') !== this.opts.vhost) return deny('vhost');
    if (f.get('name')?.toString('utf8') !== EXCHANGE || key === undefined) return deny('acl');
    const topic = routingKeyToTopic(key);
    // The MQTT plugin names the client; the AMQP channel under it (the binding of a SUBSCRIBE) does too, with the
    // same variable map. Whoever is named must be the user (vhost_path allowed nothing else).
    const clientId = f.get('variable_map.client_id')?.toString('utf8');
    if (this.isService(username)) {
      if (clientId !== undefined && !this.service.clientIds.has(clientId)) return deny('acl');
      if (permission === 'read') return topic === 'mesh/v1/admin/+/records' ? ALLOW : deny('acl');
      if (permission === 'write') return /^mesh\/v1\/admin\/[a-z0-9-]+\/acks$/.test(topic) ? ALLOW : deny('acl');
      return deny('acl');
    }
    if (clientId !== undefined && clientId !== username) return deny('client-id-not-username');
    const session = this.sessionOf(username, now);
    if (!session) return deny('not-admitted');
    if (permission === 'write') {
      const refusal = checkPublishTopic(topic, LIMITS);
      if (refusal !== undefined) return deny(refusal);
      return aclPublish(session, topic) === ACL_DENY ? deny('acl') : ALLOW;
    }
    if (permission === 'read') {
      const refusal = checkSubscribeFilter(topic, LIMITS);
      if (refusal !== undefined) return deny(refusal);
      return aclSubscribe(session, topic) ? ALLOW : deny('acl');
    }
    return deny('acl');
  }
}

/**
 * Closes a connection, waiting at most a second for what it has in flight: a graceful MQTT close waits for the acks
 * of its QoS 1 publishes, which a node that died never sends.
 */
async function closeSoon(conn: MeshConnection): Promise<void> {
  let timer: NodeJS.Timeout | undefined;
  await Promise.race([conn.close(), new Promise<void>((resolve) => (timer = setTimeout(resolve, 1_000)))]);
  clearTimeout(timer);
  conn.client.end(true);
}

const codeOf = (reason: string) => REFUSAL_CODES[reason as RefusalReason] ?? 'MESH_FORBIDDEN';

/** Reads a request body up to MAX_BODY_BYTES; undefined when it is larger. */
function readBody(req: http.IncomingMessage): Promise<string | undefined> {
  return new Promise((resolve) => {
    const chunks: Buffer[] = [];
    let size = 0;
    let done = false;
    req.on('data', (c: Buffer) => {
      size += c.byteLength;
      if (size > MAX_BODY_BYTES) {
        // Answered (deny) at once; the rest is read and dropped, within the server's request timeout.
        if (!done) resolve(undefined);
        done = true;
        chunks.length = 0;
        return;
      }
      chunks.push(c);
    });
    req.on('end', () => {
      if (!done) resolve(Buffer.concat(chunks).toString('latin1'));
      done = true;
    });
    req.on('error', () => {
      if (!done) resolve(undefined);
      done = true;
    });
  });
}

/**
 * Starts the service: opens the admission store, listens for RabbitMQ's questions and (with `brokerUrls`)
 * connects to the cluster to read admin records. Throws MESH_CONFIG for a store that cannot be opened or a failed
 * listen.
 */
export async function startRabbitmqAuth(options: RabbitmqAuthOptions): Promise<RabbitmqAuthHandle> {
  const log = (options.logger ?? pino({ level: 'silent' })).child({ part: 'rabbitmq-auth' });
  if (!Array.isArray(options.trustedOperators) || options.trustedOperators.length === 0)
    throw new MeshError('MESH_CONFIG', 'the RabbitMQ auth service needs at least one trusted operator');
  const trusted = new Map(options.trustedOperators.map((o) => [o.id, o.publicKey] as const));
  const store = await AdmissionStore.open(options.dataDir, trusted, log);
  const password = Buffer.from(randomBytes(32).toString('base64url'));
  const mainClientId = `${RABBITMQ_SERVICE_USER}_${randomBytes(6).toString('hex')}`;
  const clientIds = new Set<string>([mainClientId]);
  const counters = { allow: {} as Record<string, number>, deny: {} as Record<string, number>, kicks: 0 };
  const expiryTimers = new Map<string, NodeJS.Timeout>();
  const brokerUrls = options.brokerUrls ?? [];
  let closed = false;

  /** Closes the connection of `id`, wherever in the cluster it is, by connecting with its client id. */
  async function kick(id: string, reason = 'revoked'): Promise<void> {
    if (brokerUrls.length === 0 || closed) return;
    counters.kicks++;
    clientIds.add(id);
    const conn = openMeshConnection(brokerUrls, {
      clientId: id,
      username: RABBITMQ_SERVICE_USER,
      password,
      connectTimeoutMs: 3_000,
      backoff: { baseMs: 50, maxMs: 200 },
    });
    try {
      await Promise.race([
        conn.firstConnect,
        new Promise((_, reject) => setTimeout(() => reject(new MeshError('MESH_TIMEOUT', 'no connection within 5 s')), 5_000).unref()),
      ]);
      log.warn({ clientId: id, reason }, 'client disconnected');
    } catch (err) {
      log.error({ clientId: id, reason, err: (err as Error).message }, 'could not close the connection of an id no longer admitted');
    } finally {
      await closeSoon(conn);
      clientIds.delete(id);
    }
  }

  /**
   * Cuts `id` off when the admission in force for it ends. The store is asked each time the timer fires, not the
   * expiry the id logged in with, and a re-admission of a watched id re-arms it (`admit` below): a shorter one cuts
   * the live connection off at its new end, a longer one keeps it on until then.
   */
  function watchExpiry(id: string): void {
    clearTimeout(expiryTimers.get(id));
    expiryTimers.delete(id);
    const now = Date.now();
    const grant = store.lookup(id, now);
    if (typeof grant === 'string') {
      void kick(id, grant);
      return;
    }
    if (grant.expires === Infinity) return;
    const t = setTimeout(() => watchExpiry(id), Math.min(Math.max(0, grant.expires - now), 2 ** 31 - 1));
    t.unref();
    expiryTimers.set(id, t);
  }
  function armExpiry(id: string, expires: number): void {
    if (expires === Infinity) return;
    watchExpiry(id);
  }

  const decisions = new RabbitmqDecisions(
    store,
    { user: RABBITMQ_SERVICE_USER, password, clientIds },
    { vhost: options.vhost ?? '/', maxClockSkewMs: options.maxClockSkewMs ?? 60_000 },
    armExpiry,
  );

  async function admit(signed: SignedRecord): Promise<Admission> {
    const a = await store.admit(signed);
    log.info({ id: a.id, role: a.role, expires: a.expires, operator: a.operator }, 'admission stored');
    // An id that logged in on an admission that ends is watched: its cut-off moves to the new admission's end.
    if (expiryTimers.has(a.id)) watchExpiry(a.id);
    return a;
  }
  async function revoke(signed: SignedRecord): Promise<Revocation> {
    const r = await store.revoke(signed);
    log.info({ id: r.id, revokedAt: r.revokedAt, operator: r.operator }, 'revocation stored');
    if (!stillAdmitted(store, r.id, Date.now())) await kick(r.id);
    return r;
  }

  const paths: Record<string, (f: Map<string, Buffer>) => RabbitmqDecision> = {
    '/auth/user': (f) => decisions.user(f),
    '/auth/vhost': (f) => decisions.vhost(f),
    '/auth/resource': (f) => decisions.resource(f),
    '/auth/topic': (f) => decisions.topic(f),
  };
  const server = http.createServer(async (req, res) => {
    const [pathname, query = ''] = (req.url ?? '').split('?', 2) as [string, string?];
    if (pathname === '/health' && req.method === 'GET') {
      res.writeHead(200, { 'content-type': 'text/plain' }).end('ok');
      return;
    }
    const decide = paths[pathname];
    if (!decide || (req.method !== 'GET' && req.method !== 'POST')) {
      res.writeHead(404, { 'content-type': 'text/plain' }).end('not found');
      return;
    }
    const text = req.method === 'POST' ? await readBody(req) : query;
    const fields = text === undefined ? undefined : decodeForm(text);
    const decision = fields === undefined ? deny('bad-request') : decide(fields);
    const name = pathname.slice('/auth/'.length);
    if (decision.allow) counters.allow[name] = (counters.allow[name] ?? 0) + 1;
    else {
      const key = `${name}:${decision.reason}`;
      counters.deny[key] = (counters.deny[key] ?? 0) + 1;
      // Never the password; the user name is cut to what a mesh id can be.
      log.warn(
        {
          path: name,
          reason: decision.reason,
          code: decision.reason === 'bad-request' ? 'MESH_BAD_REQUEST' : codeOf(decision.reason),
          username: fields?.get('username')?.toString('utf8').slice(0, 64),
          routingKey: fields?.get('routing_key')?.toString('utf8').slice(0, 256),
        },
        'refused',
      );
    }
    // RabbitMQ reads the body only: `allow` or `deny` (any other answer is an error, and it refuses).
    res
      .writeHead(200, { 'content-type': 'text/plain', ...(text === undefined ? { connection: 'close' } : {}) })
      .end(decision.allow ? 'allow' : 'deny');
  });
  server.keepAliveTimeout = 60_000;
  // A client that never finishes its request is cut off (RabbitMQ's own requests take milliseconds).
  server.requestTimeout = 10_000;
  server.headersTimeout = 5_000;
  try {
    await new Promise<void>((resolve, reject) => {
      server.once('error', reject);
      server.listen(options.port ?? 0, options.host ?? '127.0.0.1', () => resolve());
    });
  } catch (cause) {
    await store.close();
    throw new MeshError('MESH_CONFIG', `the RabbitMQ auth service cannot listen: ${(cause as Error).message}`, { cause });
  }
  const address = server.address() as AddressInfo;
  const host = address.family === 'IPv6' ? `[${address.address}]` : address.address;

  // The admin records: operators publish them as on the embedded broker; only this user may read them.
  let conn: MeshConnection | undefined;
  const adminSessions = new Map<string, MeshSession>();
  let ready: Promise<void> = Promise.resolve();
  if (brokerUrls.length > 0) {
    conn = openMeshConnection(brokerUrls, {
      clientId: mainClientId,
      username: RABBITMQ_SERVICE_USER,
      password,
      backoff: { baseMs: 100, maxMs: 2_000 },
      onConnect: (c) => {
        c.subscribe(topics.adminRecords('+'), { qos: 1 }, (err) => {
          if (err) log.error({ err: err.message }, 'cannot subscribe to the admin records');
        });
      },
    });
    const c = conn.client;
    c.on('message', (topic, payload) => {
      const operatorId = topic.split('/')[3] ?? '';
      if (!trusted.has(operatorId) || payload.byteLength > MAX_ADMIN_RECORD_BYTES) return;
      let session = adminSessions.get(operatorId);
      if (!session) {
        session = newSession(operatorId, 'operator', Infinity, 0);
        adminSessions.set(operatorId, session);
      }
      if (!takeAdminToken(session, Date.now())) {
        log.warn({ clientId: operatorId, reason: 'admin-rate', code: 'MESH_RATE_LIMITED' }, 'admin record refused');
        return;
      }
      void applyAdminRecord(payload, { admit, revoke }).then((ack) => {
        if (!ack.ok) log.warn({ clientId: operatorId, id: ack.id, reason: ack.code, err: ack.message }, 'admin record refused');
        if (!closed) c.publish(topics.adminAcks(operatorId), encodeMessage(ack as never), { qos: 1 });
      });
    });
    ready = conn.firstConnect;
    ready.catch(() => {});
  }

  return {
    url: `http://${host}:${address.port}`,
    counters,
    admit,
    revoke,
    ready,
    async close() {
      if (closed) return;
      closed = true;
      for (const t of expiryTimers.values()) clearTimeout(t);
      if (conn) await closeSoon(conn);
      server.closeAllConnections();
      await new Promise<void>((resolve) => server.close(() => resolve()));
      await store.close();
    },
  };
}
