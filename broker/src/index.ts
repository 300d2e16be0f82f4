/**
 * The mesh's embedded MQTT broker: aedes 1.2 (MQTT 3.1.1) behind a hardened TCP front door (mqtt.md §7.4, §7.5, §9).
 *
 *   const broker = await startBroker({ port: 0 });
 *   // … broker.url is 'mqtt://127.0.0.1:<port>'
 *   await broker.close();
 *
 * What the front door enforces before any application code runs:
 * - TCP_NODELAY on every socket, a connection cap, a CONNECT deadline, a keepalive limit and a drain timeout;
 * - a framing guard (./guard.ts) that drops a connection whose first byte is not CONNECT or whose packet declares
 *   more than `maxPacketBytes`, before the body is buffered;
 * - the built-in topic policy (./policy.ts): no QoS 2, topic caps, no `$` topics, retain and wills only on the
 *   client's own status topic, no match-everything subscriptions.
 * - per-IP limits (./limits.ts): simultaneous connections, a CONNECT token bucket, a ban after a burst of refused
 *   CONNECTs; clean sessions only; keepalive between 1 and `keepaliveLimitS`; a per-client publish token bucket.
 *
 * With `auth` (authenticated mode) every CONNECT must carry clientId = a key-derived id, username = that id (or
 * empty) and password = a CONNECT token (protocol/identity.ts) signed by the key the id was admitted with; cheap
 * checks run first (lengths, rate limits, flags, id form, token form and timestamp), then the admission lookup, the
 * replay check and only then the Ed25519 verify. Publishes and subscriptions pass the per-role ACL (./acl.ts),
 * operators administer admissions over MQTT (./admin.ts), and the admission store (./store.ts) lives in `level`.
 * Without `auth` ("open mode", for local tests) anonymous clients are accepted and no ACL applies.
 *
 * Refusals: a refused CONNECT is answered with CONNACK 2 (identifier rejected: id too long or not key-derived) or 5
 * (not authorized: everything else), except a banned or over-rate address, which is closed without a CONNACK. A
 * refused PUBLISH (topic policy, ACL, or over the publish rate) disconnects the client (MQTT 3.1.1 has no PUBACK
 * error code, and a silently dropped QoS 1 message would look delivered). A refused SUBSCRIBE gets 0x80 and the
 * connection stays up. Every refusal is logged at warn with a reason (storms are logged once per run); passwords are
 * never logged. Further application checks plug into `hooks`, which run after all of the above.
 */
import net from 'node:net';
import {
  type AdminAck,
  type Admission,
  type ConnectToken,
  connectTokenMessage,
  encodeMessage,
  isValidId,
  MeshError,
  type Revocation,
  readConnectToken,
  roleOfId,
  type SignedRecord,
  verifyBytes,
} from '@edge-mesh/protocol';
import type { AuthenticateError, Client, ConnectPacket, PublishPacket, Subscription } from 'aedes';
import { Aedes } from 'aedes';
import { type Logger, pino } from 'pino';
import { ACL_ADMIN, ACL_DENY, aclPublish, aclSubscribe, type MeshSession, newSession, takeAdminToken } from './acl.ts';
import { ackError, ackOk, parseAdminRecord } from './admin.ts';
import { guardSocket } from './guard.ts';
import { IpGuard, NonceCache } from './limits.ts';
import type { BrokerOptions } from './options.ts';
import { AEDES_MAX_TOPIC_LEVELS, resolveBrokerOptions } from './options.ts';
import { checkPublish, checkSubscribeFilter, checkWill, isOwnStatusTopic, type TopicLimits } from './policy.ts';
import { AdmissionStore } from './store.ts';

export { decodeAdminAck, encodeAdminRecord, MAX_ADMIN_RECORD_BYTES } from './admin.ts';
export type { BrokerAuthOptions, BrokerHooks, BrokerOptions } from './options.ts';

export interface BrokerHandle {
  /** The bound TCP port (the real one when `port: 0` was asked for). */
  readonly port: number;
  /** `mqtt://host:port`, ready for `mqtt.connect`. */
  readonly url: string;
  /** The aedes instance, for events and in-process publishing. */
  readonly aedes: Aedes;
  /** MQTT clients that completed CONNECT and are still connected. */
  clientCount(): number;
  /** 'auth' when started with `auth`, else 'open' (anonymous clients accepted). */
  readonly mode: 'open' | 'auth';
  /**
   * Verifies an operator-signed admission against the trusted operators, stores it durably, then resolves.
   * Rejects with MESH_UNAUTHORIZED (bad or untrusted signature, expired, id not derived from the key),
   * MESH_BAD_REQUEST (a revocation, or a record superseded by a newer one) or MESH_CONFIG (open mode).
   */
  admit(signed: SignedRecord): Promise<Admission>;
  /**
   * Same for a revocation; a live client with that id is disconnected at once and cannot reconnect until a newer
   * admission is stored.
   */
  revoke(signed: SignedRecord): Promise<Revocation>;
  /** Admissions in force now (not revoked, not expired); trusted operators are not listed. Empty in open mode. */
  admissions(): Admission[];
  /** The newest revocation per id. Empty in open mode. */
  revocations(): Revocation[];
  /** Disconnects every client, stops listening, closes the admission store; resolves once all is closed. Idempotent. */
  close(): Promise<void>;
}

/** CONNACK return codes (MQTT 3.1.1 §3.2.2.3) used when refusing a CONNECT. */
const CONNACK_IDENTIFIER_REJECTED = 2;
const CONNACK_NOT_AUTHORIZED = 5;

/** QoS 2 is refused, so inbound QoS 2 state never builds up; keep aedes' per-client cap small all the same. */
const MAX_INFLIGHT_INBOUND = 16;

/** CONNECT field caps (bytes), checked before anything else looks at the fields. */
export const MAX_USERNAME_BYTES = 64;
export const MAX_PASSWORD_BYTES = 128;

/** How often idle per-IP state and expired nonces are forgotten. */
const SWEEP_INTERVAL_MS = 10_000;
/** setTimeout's ceiling (~24.8 days). */
const MAX_TIMER_MS = 2 ** 31 - 1;

/** The per-connection state the broker caches on each aedes client once its CONNECT is accepted. */
const SESSION = Symbol('edge-mesh.session');
type MeshClient = Client & { [SESSION]?: MeshSession; will?: unknown };
/** aedes keeps its connected clients by id (typed loosely in aedes 1.2's .d.ts). */
function clientsOf(aedes: Aedes): Record<string, Client> {
  return (aedes as unknown as { clients: Record<string, Client> }).clients;
}

interface ConnectRefusal {
  returnCode: number;
  reason: string;
  topic: string | undefined;
}

/**
 * Starts aedes and a TCP listener in front of it (and, with `auth`, opens the admission store first).
 * Throws MeshError('MESH_CONFIG') for bad options, a store that cannot be opened or a failed listen.
 */
export async function startBroker(options: BrokerOptions = {}): Promise<BrokerHandle> {
  const opts = resolveBrokerOptions(options);
  const { host, hooks, maxPacketBytes, maxClientIdLength, keepaliveLimitS, auth } = opts;
  const log: Logger = (opts.logger ?? pino({ level: 'silent' })).child({ part: 'broker' });
  const limits: TopicLimits = { maxTopicLevels: opts.maxTopicLevels, maxTopicBytes: opts.maxTopicBytes };
  const publishRatePerMs = opts.publishRatePerClient / 1000;
  const publishBurst = opts.publishBurstPerClient;
  // CONNECT checks run in preConnect (which sees the raw packet) but are answered in authenticate, which is the
  // only place aedes can send a CONNACK with a refusal code instead of just dropping the socket.
  const connectRefusals = new WeakMap<Client, ConnectRefusal>();
  /** Tokens that passed the cheap checks in preConnect, for authenticate to verify. */
  const pendingTokens = new WeakMap<Client, ConnectToken>();
  /** The address each accepted socket came from (read once: remoteAddress is gone after a destroy). */
  const socketIps = new WeakMap<object, string>();
  const ips = new IpGuard(opts);
  const nonces = new NonceCache(auth?.nonceTtlMs ?? 0);
  const store = auth ? await AdmissionStore.open(auth.dataDir, auth.trustedOperators, log) : undefined;

  if (!auth) {
    log.warn(
      { mode: 'open' },
      'open mode: anonymous clients are accepted and no topic ACLs apply (start the broker with auth to require admitted keys)',
    );
  }

  /** Warn once per `key` per second at most (floods from one source must not flood the log). */
  const lastWarn = new Map<string, number>();
  function warnThrottled(key: string, fields: Record<string, unknown>, msg: string): void {
    const now = Date.now();
    const last = lastWarn.get(key);
    if (last !== undefined && now - last < 1000) {
      log.debug(fields, msg);
      return;
    }
    if (lastWarn.size > 10_000) lastWarn.clear();
    lastWarn.set(key, now);
    log.warn(fields, msg);
  }

  function ipOf(client: Client): string {
    return socketIps.get(client.conn) ?? (client.conn as net.Socket | undefined)?.remoteAddress ?? 'unknown';
  }

  /** Counts a refused CONNECT against its address and logs it; the address is banned after a burst of them. */
  function connectFailed(client: Client, reason: string, topic?: string): void {
    const ip = ipOf(client);
    // An over-long id is logged by its first 64 characters only.
    log.warn({ clientId: client.id?.slice(0, 64) ?? null, topic, reason, remoteAddress: ip }, 'connect refused');
    countFailure(ip);
  }

  function countFailure(ip: string): void {
    if (ips.failure(ip, Date.now())) {
      log.warn({ remoteAddress: ip, reason: 'auth-failure-storm', banMs: opts.banMs }, 'address banned');
    }
  }

  /** The cheap CONNECT checks, in order of cost. Returns a refusal, or undefined to go on. */
  function checkConnect(client: Client, packet: ConnectPacket, now: number): ConnectRefusal | undefined {
    const clientId = packet.clientId ?? '';
    if (clientId.length > maxClientIdLength) return refuse(CONNACK_IDENTIFIER_REJECTED, 'client-id-too-long');
    const { username, password } = packet;
    if (username !== undefined && (username.length > MAX_USERNAME_BYTES || Buffer.byteLength(username) > MAX_USERNAME_BYTES)) {
      return refuse(CONNACK_NOT_AUTHORIZED, 'username-too-long');
    }
    if (password !== undefined && password.byteLength > MAX_PASSWORD_BYTES) return refuse(CONNACK_NOT_AUTHORIZED, 'password-too-long');
    if (packet.clean === false) return refuse(CONNACK_NOT_AUTHORIZED, 'persistent-session');
    if (keepaliveLimitS > 0 && (!packet.keepalive || packet.keepalive > keepaliveLimitS)) {
      const reason = packet.keepalive ? 'keepalive-too-long' : 'keepalive-zero';
      // aedes would answer these itself with the non-3.1.1 return code 6 before authenticate runs; pass its check
      // so that authenticate answers CONNACK 5 with the reason logged. The session never starts, so the value is moot.
      packet.keepalive = 1;
      return refuse(CONNACK_NOT_AUTHORIZED, reason);
    }
    if (packet.will) {
      const reason = checkWill(packet.will, clientId, limits);
      if (reason !== undefined) return refuse(CONNACK_NOT_AUTHORIZED, reason, packet.will.topic);
    }
    if (!auth) return undefined;
    const role = isValidId(clientId) ? roleOfId(clientId) : undefined;
    if (role === undefined) return refuse(CONNACK_IDENTIFIER_REJECTED, 'id-not-key-derived');
    if (packet.will && role !== 'agent') return refuse(CONNACK_NOT_AUTHORIZED, 'will-not-agent', packet.will.topic);
    if (username !== undefined && username !== '' && username !== clientId) return refuse(CONNACK_NOT_AUTHORIZED, 'username-not-client-id');
    if (password === undefined || password.byteLength === 0) return refuse(CONNACK_NOT_AUTHORIZED, 'no-token');
    const token = readConnectToken(password);
    if (token === undefined) return refuse(CONNACK_NOT_AUTHORIZED, 'bad-token');
    if (Math.abs(now - token.timestampMs) > auth.maxClockSkewMs) return refuse(CONNACK_NOT_AUTHORIZED, 'stale-token');
    pendingTokens.set(client, token);
    return undefined;
  }

  /** The expensive part of authentication: admission lookup, replay check, Ed25519 verify. */
  function verifyClient(client: Client, now: number): { session: MeshSession } | { reason: string } {
    if (!auth || !store) return { session: newSession(client.id, undefined, Infinity, publishBurst) };
    const token = pendingTokens.get(client);
    pendingTokens.delete(client);
    if (!token) return { reason: 'no-token' };
    const grant = store.lookup(client.id, now);
    if (typeof grant === 'string') return { reason: grant };
    // Replays are refused before the signature is checked (cheap); a nonce is recorded only once its signature held.
    const nonceKey = token.nonce.toString('base64');
    if (nonces.has(nonceKey, now)) return { reason: 'replayed-token' };
    if (!verifyBytes(grant.publicKey, connectTokenMessage(client.id, token.timestampMs, token.nonce), token.signature)) {
      return { reason: 'bad-signature' };
    }
    nonces.add(nonceKey, now);
    return { session: newSession(client.id, grant.role, grant.expires, publishBurst) };
  }

  function refusePublish(
    ownerId: string | null | undefined,
    topic: string,
    reason: string,
    callback: (error?: Error | null) => void,
  ): void {
    warnThrottled(`publish:${ownerId}:${reason}`, { clientId: ownerId ?? null, topic, reason }, 'publish refused');
    // For MQTT 3.1.1 aedes answers an error by closing the connection (there is no PUBACK error code).
    callback(new Error(`publish refused: ${reason}`));
  }

  const aedes = await Aedes.createBroker({
    connectTimeout: opts.connectTimeoutMs,
    keepaliveLimit: opts.keepaliveLimitS,
    drainTimeout: opts.drainTimeoutMs,
    queueLimit: opts.queueLimit,
    maxClientsIdLength: maxClientIdLength, // aedes applies it to MQTT 3.1 only; preConnect applies it to 3.1.1
    maxInflightInbound: MAX_INFLIGHT_INBOUND,
    // aedes disconnects on its own level cap, even for SUBSCRIBE; keep it at qlobber's ceiling and enforce the
    // mesh's tighter `maxTopicLevels` in the authorize handlers so an over-deep filter gets SUBACK 0x80.
    maxTopicLevels: AEDES_MAX_TOPIC_LEVELS,

    preConnect(client: Client, packet: ConnectPacket, callback: (error: Error | null, success: boolean) => void): void {
      const now = Date.now();
      const ip = ipOf(client);
      const rate = ips.connect(ip, now);
      if (rate !== 'ok') {
        const fields = {
          clientId: packet.clientId?.slice(0, 64) || null,
          reason: rate === 'banned' ? 'banned' : 'connect-rate',
          remoteAddress: ip,
        };
        if (rate === 'connect-rate') log.warn(fields, 'connect refused');
        else log.debug(fields, 'connect refused');
        // Closed without a CONNACK: the cheapest answer to a storm; a well-behaved client backs off and retries.
        callback(new Error(`connect refused: ${fields.reason}`), false);
        return;
      }
      if (packet.protocolVersion !== 4) {
        // MQTT 3.1.1 only (3.1, or 3.1.1's level with another name, is refused too). Lowering the level makes aedes
        // answer CONNACK 1 (unacceptable protocol version) itself, as §3.1.2.2 asks, before authenticate runs.
        log.warn(
          {
            clientId: packet.clientId?.slice(0, 64) || null,
            reason: 'protocol-version',
            protocolVersion: packet.protocolVersion,
            remoteAddress: ip,
          },
          'connect refused',
        );
        countFailure(ip);
        packet.protocolVersion = 0 as never;
        callback(null, true);
        return;
      }
      const refusal = checkConnect(client, packet, now);
      if (refusal) connectRefusals.set(client, refusal);
      const hook = hooks.preConnect;
      if (!hook) {
        callback(null, true);
        return;
      }
      runHook(
        () => hook(client, packet),
        (err, ok) => {
          if (err || ok !== true) {
            const reason = err ? `hook: ${err.message}` : 'hook';
            log.warn({ clientId: packet.clientId?.slice(0, 64) || null, topic: undefined, reason, remoteAddress: ip }, 'connect refused');
            // aedes only closes the socket when preConnect reports an error; `false` alone would leave it open.
            return callback(err ?? new Error('connect refused by preConnect hook'), false);
          }
          callback(null, true);
        },
      );
    },

    authenticate(
      client: Client,
      username: string | undefined,
      password: Buffer | undefined,
      callback: (error: AuthenticateError | null, success: boolean | null) => void,
    ): void {
      const refusal = connectRefusals.get(client);
      if (refusal) {
        connectRefusals.delete(client);
        pendingTokens.delete(client);
        connectFailed(client, refusal.reason, refusal.topic);
        callback(authError(refusal.reason, refusal.returnCode), false);
        return;
      }
      const verdict = verifyClient(client, Date.now());
      if ('reason' in verdict) {
        connectFailed(client, verdict.reason);
        callback(authError(verdict.reason, CONNACK_NOT_AUTHORIZED), false);
        return;
      }
      (client as MeshClient)[SESSION] = verdict.session;
      const hook = hooks.authenticate;
      if (!hook) {
        callback(null, true);
        return;
      }
      runHook(
        () => hook(client, username, password),
        (err, ok) => {
          if (err || ok !== true) {
            const reason = err ? `hook: ${err.message}` : 'hook';
            connectFailed(client, reason);
            return callback(authError(reason, CONNACK_NOT_AUTHORIZED), false);
          }
          callback(null, true);
        },
      );
    },

    authorizePublish(client: Client | null, packet: PublishPacket, callback: (error?: Error | null) => void): void {
      // `client` is null only for a will aedes republishes after its owner's broker vanished; the stored will keeps
      // its owner's id.
      const ownerId = client ? client.id : (packet as { clientId?: string }).clientId;
      const topic = packet.topic;
      const reason = checkPublish(packet, ownerId, limits);
      if (reason !== undefined) {
        refusePublish(ownerId, topic, reason, callback);
        return;
      }
      const session = client === null ? undefined : (client as MeshClient)[SESSION];
      let adminRecord = false;
      if (session !== undefined) {
        // A client's own will (published as it goes) is never rate limited.
        if (packet !== (client as MeshClient).will) {
          const now = Date.now();
          let tokens = session.tokens + (now - session.last) * publishRatePerMs;
          if (tokens > publishBurst) tokens = publishBurst;
          session.last = now;
          if (tokens < 1) {
            session.tokens = tokens;
            refusePublish(ownerId, topic, 'publish-rate', callback);
            return;
          }
          session.tokens = tokens - 1;
        }
        if (auth) {
          const acl = aclPublish(session, topic);
          if (acl === ACL_DENY) {
            refusePublish(ownerId, topic, 'acl', callback);
            return;
          }
          if (acl === ACL_ADMIN) {
            if (!takeAdminToken(session, Date.now())) {
              refusePublish(ownerId, topic, 'admin-rate', callback);
              return;
            }
            adminRecord = true;
          }
        }
      } else if (auth && (client !== null || !isOwnStatusTopic(topic, ownerId) || roleOfId(ownerId ?? '') !== 'agent')) {
        // No session: an orphaned will (client null) may only be its agent's own status.
        refusePublish(ownerId, topic, 'acl', callback);
        return;
      }
      // An admin record is applied by the broker and acknowledged on the operator's acks topic. Nobody may subscribe
      // to admin records, so letting aedes go on (which sends the PUBACK) forwards it to no one.
      const hook = hooks.authorizePublish;
      if (!hook) {
        if (adminRecord) void applyAdminRecord(session!, packet.payload as Buffer);
        callback(null);
        return;
      }
      runHook(
        () => hook(client, packet),
        (err, ok) => {
          if (err || ok !== true) return refusePublish(ownerId, topic, err ? `hook: ${err.message}` : 'hook', callback);
          if (adminRecord) void applyAdminRecord(session!, packet.payload as Buffer);
          callback(null);
        },
      );
    },

    authorizeSubscribe(
      client: Client,
      sub: Subscription,
      callback: (error: Error | null, subscription?: Subscription | null) => void,
    ): void {
      const reason = checkSubscribeFilter(sub.topic, limits);
      if (reason !== undefined) {
        warnThrottled(`subscribe:${client.id}`, { clientId: client.id, topic: sub.topic, reason }, 'subscribe refused');
        // SUBACK 0x80 for this filter; the connection stays up
        callback(null, null);
        return;
      }
      if (auth) {
        const session = (client as MeshClient)[SESSION];
        if (session === undefined || !aclSubscribe(session, sub.topic)) {
          warnThrottled(`subscribe:${client.id}`, { clientId: client.id, topic: sub.topic, reason: 'acl' }, 'subscribe refused');
          callback(null, null);
          return;
        }
      }
      if (sub.qos === 2) sub.qos = 1;
      const hook = hooks.authorizeSubscribe;
      if (!hook) {
        callback(null, sub);
        return;
      }
      runHook(
        () => hook(client, sub),
        (err, allowed) => {
          if (err || !allowed) {
            log.warn({ clientId: client.id, topic: sub.topic, reason: err ? `hook: ${err.message}` : 'hook' }, 'subscribe refused');
            return callback(null, null);
          }
          if (allowed.qos === 2) allowed.qos = 1;
          callback(null, allowed);
        },
      );
    },
  });

  function requireStore(): AdmissionStore {
    if (!store) throw new MeshError('MESH_CONFIG', 'this broker runs in open mode: start it with auth to manage admissions');
    return store;
  }

  async function admitRecord(signed: SignedRecord): Promise<Admission> {
    const admission = await requireStore().admit(signed);
    log.info({ id: admission.id, role: admission.role, expires: admission.expires, operator: admission.operator }, 'admission stored');
    return admission;
  }

  async function revokeRecord(signed: SignedRecord): Promise<Revocation> {
    const s = requireStore();
    const revocation = await s.revoke(signed);
    log.info({ id: revocation.id, revokedAt: revocation.revokedAt, operator: revocation.operator }, 'revocation stored');
    const live = clientsOf(aedes)[revocation.id];
    if (live && !s.isAdmitted(revocation.id, Date.now())) {
      log.warn({ clientId: revocation.id, reason: 'revoked' }, 'client disconnected');
      live.close();
    }
    return revocation;
  }

  async function applyAdminRecord(session: MeshSession, payload: Buffer): Promise<void> {
    let ack: AdminAck;
    let id = '';
    try {
      const parsed = parseAdminRecord(payload);
      id = parsed.id;
      const signed = parsed.signed as SignedRecord;
      if (parsed.kind === 'revocation') await revokeRecord(signed);
      else await admitRecord(signed); // verifyRecord refuses anything that is not a valid admission
      ack = ackOk(id);
    } catch (err) {
      ack = ackError(id, err);
      log.warn({ clientId: session.id, id, reason: ack.code, err: ack.message }, 'admin record refused');
    }
    if (closing) return;
    aedes.publish(
      { cmd: 'publish', topic: session.adminAcks, payload: encodeMessage(ack as never), qos: 1, retain: false, dup: false },
      (err) => {
        if (err) log.warn({ clientId: session.id, err: err.message }, 'admin ack not published');
      },
    );
  }

  /** Cuts a client off when its admission expires. */
  const expiryTimers = new WeakMap<Client, NodeJS.Timeout>();
  aedes.on('client', (client) => {
    log.debug({ clientId: client.id }, 'client connected');
    if (!store) return;
    // A revocation that landed while this client was between authenticate and registration.
    if (!store.isAdmitted(client.id, Date.now())) {
      log.warn({ clientId: client.id, reason: 'revoked' }, 'client disconnected');
      client.close();
      return;
    }
    const expires = (client as MeshClient)[SESSION]?.expires ?? Infinity;
    if (expires === Infinity) return;
    const arm = (): void => {
      const inMs = expires - Date.now();
      if (inMs <= 0) {
        log.warn({ clientId: client.id, reason: 'admission-expired' }, 'client disconnected');
        client.close();
        return;
      }
      // Re-armed in steps below setTimeout's ceiling for admissions that end months away.
      const timer = setTimeout(arm, Math.min(inMs, MAX_TIMER_MS));
      timer.unref();
      expiryTimers.set(client, timer);
    };
    arm();
  });
  aedes.on('clientDisconnect', (client) => {
    log.debug({ clientId: client.id }, 'client disconnected');
    clearTimeout(expiryTimers.get(client));
  });
  aedes.on('clientError', (client, err) => log.debug({ clientId: client.id, err: err.message }, 'client error'));
  aedes.on('connectionError', (client, err) => {
    log.debug({ remoteAddress: (client.conn as net.Socket | undefined)?.remoteAddress, err: err.message }, 'connection error');
  });
  aedes.on('keepaliveTimeout', (client) => log.debug({ clientId: client.id }, 'keepalive timeout'));
  // Without a listener an 'error' (e.g. from persistence) would throw and take the process down.
  (aedes as NodeJS.EventEmitter).on('error', (err: Error) => log.error({ err }, 'aedes error'));

  const sockets = new Set<net.Socket>();
  let closing: Promise<void> | undefined;

  const server = net.createServer({ noDelay: true }, (socket) => {
    if (closing) {
      socket.destroy();
      return;
    }
    const ip = socket.remoteAddress ?? 'unknown';
    const verdict = ips.accept(ip, Date.now());
    if (verdict !== 'ok') {
      // Banned addresses are dropped before a byte is read; one IP cannot take the whole connection cap.
      if (verdict === 'too-many-connections') warnThrottled(`accept:${ip}`, { remoteAddress: ip, reason: verdict }, 'connection dropped');
      else log.debug({ remoteAddress: ip, reason: verdict }, 'connection dropped');
      socket.destroy();
      return;
    }
    socketIps.set(socket, ip);
    sockets.add(socket);
    socket.once('close', () => {
      sockets.delete(socket);
      ips.release(ip);
    });
    guardSocket(socket, maxPacketBytes, (rejection) => {
      const client = (socket as net.Socket & { client?: Client }).client;
      log.warn(
        { clientId: client?.id ?? null, topic: undefined, remoteAddress: socket.remoteAddress, ...rejection },
        'connection dropped by framing guard',
      );
    });
    const client = aedes.handle(socket);
    downgradeSubscribeQoS(client);
  });
  server.maxConnections = opts.maxConnections;
  server.on('drop', (data) =>
    warnThrottled('drop', { remoteAddress: data?.remoteAddress, reason: 'max-connections' }, 'connection dropped'),
  );

  // Forget idle per-IP state and expired nonces.
  const sweeper = setInterval(() => {
    const now = Date.now();
    ips.sweep(now);
    nonces.prune(now);
  }, SWEEP_INTERVAL_MS);
  sweeper.unref();

  try {
    await new Promise<void>((resolve, reject) => {
      server.once('error', reject);
      server.listen(opts.port, host, () => {
        server.off('error', reject);
        resolve();
      });
    });
  } catch (err) {
    clearInterval(sweeper);
    await new Promise<void>((resolve) => aedes.close(() => resolve()));
    await store?.close();
    throw new MeshError('MESH_CONFIG', `broker cannot listen on ${host}:${opts.port}: ${(err as Error).message}`, { cause: err });
  }
  server.on('error', (err) => log.error({ err }, 'server error'));

  const port = (server.address() as net.AddressInfo).port;
  const url = `mqtt://${host.includes(':') ? `[${host}]` : host}:${port}`;
  log.debug({ port, host }, 'broker listening');

  async function shutdown(): Promise<void> {
    clearInterval(sweeper);
    // aedes first: it disconnects its clients, after which the server can actually finish closing (FACTS).
    await new Promise<void>((resolve) => aedes.close(() => resolve()));
    const serverClosed = new Promise<void>((resolve) => server.close(() => resolve()));
    // Sockets aedes never registered (no CONNECT yet) or that are still closing.
    for (const socket of sockets) socket.destroy();
    await serverClosed;
    await store?.close();
    log.debug({ port }, 'broker closed');
  }

  return {
    port,
    url,
    aedes,
    clientCount: () => aedes.connectedClients,
    mode: auth ? 'auth' : 'open',
    admit: async (signed) => admitRecord(signed),
    revoke: async (signed) => revokeRecord(signed),
    admissions: () => store?.admissions() ?? [],
    revocations: () => store?.revocations() ?? [],
    close: () => (closing ??= shutdown()),
  };
}

function refuse(returnCode: number, reason: string, topic?: string): ConnectRefusal {
  return { returnCode, reason, topic };
}

function authError(message: string, returnCode: number): AuthenticateError {
  return Object.assign(new Error(message), { returnCode }) as AuthenticateError;
}

/** Runs a hook that may answer synchronously or with a Promise; a throw or rejection becomes `err`. */
function runHook<T>(run: () => T | Promise<T>, done: (err: Error | null, value?: T) => void): void {
  let result: T | Promise<T>;
  try {
    result = run();
  } catch (err) {
    done(asError(err));
    return;
  }
  if (result !== null && typeof result === 'object' && typeof (result as Promise<T>).then === 'function') {
    (result as Promise<T>).then(
      (value) => done(null, value),
      (err: unknown) => done(asError(err)),
    );
  } else {
    done(null, result as T);
  }
}

function asError(err: unknown): Error {
  return err instanceof Error ? err : new Error(String(err));
}

/**
 * aedes fixes a SUBSCRIBE's granted QoS (sent in the SUBACK) before authorizeSubscribe runs, so downgrading there
 * alone would deliver at QoS 1 while the SUBACK claims 2. Lower the requested QoS as the packet is parsed instead,
 * through the parser aedes keeps on each client (aedes 1.2 internals; authorizeSubscribe still downgrades too).
 */
function downgradeSubscribeQoS(client: Client): void {
  const parser = (client as Client & { _parser?: NodeJS.EventEmitter })._parser;
  if (!parser || typeof parser.prependListener !== 'function') return;
  parser.prependListener('packet', (packet: { cmd: string; subscriptions?: { qos: number }[] }) => {
    if (packet.cmd !== 'subscribe' || !packet.subscriptions) return;
    for (const sub of packet.subscriptions) if (sub.qos === 2) sub.qos = 1;
  });
}
