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
 * Identity (Ed25519 authentication, per-role ACLs) plugs into `hooks`, which run after those checks.
 */
import net from 'node:net';
import { Aedes } from 'aedes';
import type { AuthenticateError, Client, ConnectPacket, PublishPacket, Subscription } from 'aedes';
import { pino, type Logger } from 'pino';
import { MeshError } from '../protocol/index.ts';
import { guardSocket } from './guard.ts';
import { AEDES_MAX_TOPIC_LEVELS, resolveBrokerOptions } from './options.ts';
import type { BrokerHooks, BrokerOptions } from './options.ts';
import { checkPublish, checkSubscribeFilter, checkWill, type TopicLimits } from './policy.ts';

export type { BrokerHooks, BrokerOptions } from './options.ts';

export interface BrokerHandle {
  /** The bound TCP port (the real one when `port: 0` was asked for). */
  readonly port: number;
  /** `mqtt://host:port`, ready for `mqtt.connect`. */
  readonly url: string;
  /** The aedes instance, for events and in-process publishing. */
  readonly aedes: Aedes;
  /** MQTT clients that completed CONNECT and are still connected. */
  clientCount(): number;
  /** Disconnects every client, stops listening and resolves once every socket is closed. Idempotent. */
  close(): Promise<void>;
}

/** CONNACK return codes (MQTT 3.1.1 §3.2.2.3) used when refusing a CONNECT. */
const CONNACK_IDENTIFIER_REJECTED = 2;
const CONNACK_NOT_AUTHORIZED = 5;

/** QoS 2 is refused, so inbound QoS 2 state never builds up; keep aedes' per-client cap small all the same. */
const MAX_INFLIGHT_INBOUND = 16;

interface ConnectRefusal {
  returnCode: number;
  reason: string;
  topic: string | undefined;
}

/** Starts aedes and a TCP listener in front of it. Throws MeshError('MESH_CONFIG') for bad options or a failed listen. */
export async function startBroker(options: BrokerOptions = {}): Promise<BrokerHandle> {
  const opts = resolveBrokerOptions(options);
  const { host, hooks, maxPacketBytes, maxClientIdLength } = opts;
  const log: Logger = (opts.logger ?? pino({ level: 'silent' })).child({ part: 'broker' });
  const limits: TopicLimits = { maxTopicLevels: opts.maxTopicLevels, maxTopicBytes: opts.maxTopicBytes };
  // CONNECT checks run in preConnect (which sees the raw packet) but are answered in authenticate, which is the
  // only place aedes can send a CONNACK with a refusal code instead of just dropping the socket.
  const connectRefusals = new WeakMap<Client, ConnectRefusal>();

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
      const clientId = packet.clientId ?? '';
      if (clientId.length > maxClientIdLength) {
        connectRefusals.set(client, { returnCode: CONNACK_IDENTIFIER_REJECTED, reason: 'client-id-too-long', topic: undefined });
      } else if (packet.will) {
        const reason = checkWill(packet.will, clientId, limits);
        if (reason !== undefined) connectRefusals.set(client, { returnCode: CONNACK_NOT_AUTHORIZED, reason, topic: packet.will.topic });
      }
      // ── Identity issue: per-IP rate limits / bans go in hooks.preConnect. ──
      const hook = hooks.preConnect;
      if (!hook) return callback(null, true);
      runHook(() => hook(client, packet), (err, ok) => {
        if (err || ok !== true) {
          const reason = err ? `hook: ${err.message}` : 'hook';
          log.warn({ clientId: clientId || null, topic: undefined, reason, remoteAddress: client.conn && (client.conn as net.Socket).remoteAddress }, 'connect refused');
          // aedes only closes the socket when preConnect reports an error; `false` alone would leave it open.
          return callback(err ?? new Error('connect refused by preConnect hook'), false);
        }
        callback(null, true);
      });
    },

    authenticate(client: Client, username: string | undefined, password: Buffer | undefined, callback: (error: AuthenticateError | null, success: boolean | null) => void): void {
      const refusal = connectRefusals.get(client);
      if (refusal) {
        connectRefusals.delete(client);
        log.warn({ clientId: client.id, topic: refusal.topic, reason: refusal.reason }, 'connect refused');
        return callback(authError(refusal.reason, refusal.returnCode), false);
      }
      // ── Identity issue: Ed25519 token verification binding clientId to the key goes in hooks.authenticate. ──
      const hook = hooks.authenticate;
      if (!hook) return callback(null, true);
      runHook(() => hook(client, username, password), (err, ok) => {
        if (err || ok !== true) {
          const reason = err ? `hook: ${err.message}` : 'hook';
          log.warn({ clientId: client.id, topic: undefined, reason }, 'connect refused');
          return callback(authError(reason, CONNACK_NOT_AUTHORIZED), false);
        }
        callback(null, true);
      });
    },

    authorizePublish(client: Client | null, packet: PublishPacket, callback: (error?: Error | null) => void): void {
      // `client` is null only for a will aedes republishes after its owner's broker vanished; the stored will keeps
      // its owner's id.
      const ownerId = client ? client.id : (packet as { clientId?: string }).clientId;
      const reason = checkPublish(packet, ownerId, limits);
      if (reason !== undefined) {
        log.warn({ clientId: ownerId ?? null, topic: packet.topic, reason }, 'publish refused');
        // For MQTT 3.1.1 aedes answers an error by closing the connection (there is no PUBACK error code).
        return callback(new Error(`publish refused: ${reason}`));
      }
      // ── Identity issue: topic ACLs (identity-in-topic) and per-client token buckets go in hooks.authorizePublish. ──
      const hook = hooks.authorizePublish;
      if (!hook) return callback(null);
      runHook(() => hook(client, packet), (err, ok) => {
        if (err || ok !== true) {
          const why = err ? `hook: ${err.message}` : 'hook';
          log.warn({ clientId: ownerId ?? null, topic: packet.topic, reason: why }, 'publish refused');
          return callback(new Error(`publish refused: ${why}`));
        }
        callback(null);
      });
    },

    authorizeSubscribe(client: Client, sub: Subscription, callback: (error: Error | null, subscription?: Subscription | null) => void): void {
      const reason = checkSubscribeFilter(sub.topic, limits);
      if (reason !== undefined) {
        log.warn({ clientId: client.id, topic: sub.topic, reason }, 'subscribe refused');
        return callback(null, null); // SUBACK 0x80 for this filter; the connection stays up
      }
      if (sub.qos === 2) sub.qos = 1;
      // ── Identity issue: per-role subscription allow-lists go in hooks.authorizeSubscribe. ──
      const hook = hooks.authorizeSubscribe;
      if (!hook) return callback(null, sub);
      runHook(() => hook(client, sub), (err, allowed) => {
        if (err || !allowed) {
          log.warn({ clientId: client.id, topic: sub.topic, reason: err ? `hook: ${err.message}` : 'hook' }, 'subscribe refused');
          return callback(null, null);
        }
        if (allowed.qos === 2) allowed.qos = 1;
        callback(null, allowed);
      });
    },
  });

  aedes.on('client', (client) => log.debug({ clientId: client.id }, 'client connected'));
  aedes.on('clientDisconnect', (client) => log.debug({ clientId: client.id }, 'client disconnected'));
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
    sockets.add(socket);
    socket.once('close', () => sockets.delete(socket));
    guardSocket(socket, maxPacketBytes, (rejection) => {
      const client = (socket as net.Socket & { client?: Client }).client;
      log.warn({ clientId: client?.id ?? null, topic: undefined, remoteAddress: socket.remoteAddress, ...rejection }, 'connection dropped by framing guard');
    });
    const client = aedes.handle(socket);
    downgradeSubscribeQoS(client);
  });
  server.maxConnections = opts.maxConnections;
  server.on('drop', (data) => log.warn({ remoteAddress: data?.remoteAddress, reason: 'max-connections' }, 'connection dropped'));

  try {
    await new Promise<void>((resolve, reject) => {
      server.once('error', reject);
      server.listen(opts.port, host, () => {
        server.off('error', reject);
        resolve();
      });
    });
  } catch (err) {
    await new Promise<void>((resolve) => aedes.close(() => resolve()));
    throw new MeshError('MESH_CONFIG', `broker cannot listen on ${host}:${opts.port}: ${(err as Error).message}`, { cause: err });
  }
  server.on('error', (err) => log.error({ err }, 'server error'));

  const port = (server.address() as net.AddressInfo).port;
  const url = `mqtt://${host.includes(':') ? `[${host}]` : host}:${port}`;
  log.debug({ port, host }, 'broker listening');

  async function shutdown(): Promise<void> {
    // aedes first: it disconnects its clients, after which the server can actually finish closing (FACTS).
    await new Promise<void>((resolve) => aedes.close(() => resolve()));
    const serverClosed = new Promise<void>((resolve) => server.close(() => resolve()));
    // Sockets aedes never registered (no CONNECT yet) or that are still closing.
    for (const socket of sockets) socket.destroy();
    await serverClosed;
    log.debug({ port }, 'broker closed');
  }

  return {
    port,
    url,
    aedes,
    clientCount: () => aedes.connectedClients,
    close: () => (closing ??= shutdown()),
  };
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
    (result as Promise<T>).then((value) => done(null, value), (err: unknown) => done(asError(err)));
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
