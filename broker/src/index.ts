/**
 * The mesh's embedded MQTT broker: aedes 1.2 (MQTT 3.1.1) behind a hardened TCP front door (docs/security.md).
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
 * - front-door limits (./limits.ts, ./listener.ts): per address, a cap on sockets that have not finished CONNECT
 *   (the oldest is evicted), a CONNECT token bucket and a limit after a burst of refused CONNECTs that named no
 *   admitted id; per (admitted id, address), a ban after a burst of failed tokens; clean sessions only; keepalive
 *   between 1 and `keepaliveLimitS`; a per-client publish token bucket and byte-rate limit (./guard.ts).
 *
 * With `auth` (authenticated mode) every CONNECT must carry clientId = a key-derived id, username = that id (or
 * empty) and password = a CONNECT token (protocol/identity.ts) signed by the key the id was admitted with; cheap
 * checks run first (lengths, rate limits, flags, id form, token form and timestamp), then the admission lookup, the
 * replay check and only then the Ed25519 verify. Publishes and subscriptions pass the per-role ACL (./acl.ts),
 * operators administer admissions over MQTT (./admin.ts), and the admission store (./store.ts) lives in `level`.
 * Without `auth` ("open mode", for local tests) anonymous clients are accepted and no ACL applies.
 *
 * Refusals: a refused CONNECT is answered with CONNACK 2 (identifier rejected: id too long or not key-derived), 3
 * (server unavailable: refused by a limit, retry later) or 5 (not authorized: everything else). A
 * refused PUBLISH (topic policy, ACL, or over the publish rate) disconnects the client (MQTT 3.1.1 has no PUBACK
 * error code, and a silently dropped QoS 1 message would look delivered). A refused SUBSCRIBE gets 0x80 and the
 * connection stays up. Every refusal is logged at warn with a reason and its MESH_* code (./handlers/refusals.ts,
 * docs/errors.md; storms are logged once per run); passwords are never logged. Further application checks plug
 * into `hooks`, which run after all of the above.
 *
 * Layout, one module per packet kind as aedes lays out its own handlers: the identity and policy decisions live in
 * ./handlers/ (connect.ts, publish.ts, subscribe.ts, will.ts), each callable without a socket; ./aedes-hooks.ts turns
 * them into aedes' hooks (answers, logging, application hooks); ./admissions.ts stores admissions and cuts clients
 * off; ./listener.ts is the TCP side; ./aedes-adapter.ts holds every use of aedes internals. This file wires them.
 */

import type { Socket } from 'node:net';
import type { Duplex } from 'node:stream';
import { type MetricsServer, throttledWarn } from '@edge-mesh/client';
import type { Admission, Revocation, SignedRecord } from '@edge-mesh/protocol';
import { MeshError, parseTopic } from '@edge-mesh/protocol';
import { Aedes } from 'aedes';
import { type Logger, pino } from 'pino';
import { admissionControl } from './admissions.ts';
import { downgradeSubscribeQoS } from './aedes-adapter.ts';
import { createAedesHooks } from './aedes-hooks.ts';
import { newBrokerCounters } from './counters.ts';
import { grantedQos } from './handlers/subscribe.ts';
import { ClientGuard, IpGuard, NonceCache } from './limits.ts';
import { createListener } from './listener.ts';
import type { BrokerOptions } from './options.ts';
import { AEDES_MAX_TOPIC_LEVELS, resolveBrokerOptions } from './options.ts';
import { AdmissionStore } from './store.ts';
import { WillOrder } from './will-order.ts';

export { decodeAdminAck, encodeAdminRecord, MAX_ADMIN_RECORD_BYTES } from './admin.ts';
export { MAX_PASSWORD_BYTES, MAX_USERNAME_BYTES } from './handlers/connect.ts';
export {
  admittedInStore,
  type MosquittoAclRule,
  type MosquittoAuthFiles,
  type MosquittoIdentity,
  mosquittoAclFile,
  mosquittoAclRules,
  mosquittoConf,
  mosquittoIdentityOf,
  mosquittoPasswordHash,
  verifyMosquittoPassword,
  writeMosquittoAuth,
} from './mosquitto.ts';
export {
  NATS_MESH_ACCOUNT,
  type NatsAuthFiles,
  type NatsClusterOptions,
  type NatsNode,
  type NatsPermissions,
  natsAccountsConf,
  natsNodeConf,
  natsPermissions,
  natsSubject,
  reloadNatsNodes,
  writeNatsAuth,
} from './nats.ts';
export type { BrokerAuthOptions, BrokerHooks, BrokerOptions, BrokerTlsOptions } from './options.ts';

export interface BrokerHandle {
  /** The bound TCP port (the real one when `port: 0` was asked for). */
  readonly port: number;
  /** `mqtt://host:port` (`mqtts://` with `tls`), ready for `mqtt.connect`. */
  readonly url: string;
  /** `ws://host:port/mqtt` (`wss://` with `tls`) when started with `wsPort`. */
  readonly wsUrl?: string;
  /** The aedes instance, for events and in-process publishing. */
  readonly aedes: Aedes;
  /** `http://host:port/metrics` when started with `metricsPort`. */
  readonly metricsUrl?: string;
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

/** QoS 2 is refused, so inbound QoS 2 state never builds up; keep aedes' per-client cap small all the same. */
const MAX_INFLIGHT_INBOUND = 16;

/** How often idle per-IP state and expired nonces are forgotten. */
const SWEEP_INTERVAL_MS = 10_000;
/** Deliveries one subscriber whose socket is not draining may hold (see holdDelivery). */
const MAX_HELD_PER_CLIENT = 32;
/** Deliveries all such subscribers together may hold: half of aedes' 100 concurrent deliveries. */
const MAX_HELD_TOTAL = 50;

/**
 * Starts aedes and a TCP listener in front of it (and, with `auth`, opens the admission store first).
 * Throws MeshError('MESH_CONFIG') for bad options, a store that cannot be opened or a failed listen.
 */
export async function startBroker(options: BrokerOptions = {}): Promise<BrokerHandle> {
  const opts = resolveBrokerOptions(options);
  const { host, auth } = opts;
  const log: Logger = (opts.logger ?? pino({ level: 'silent' })).child({ part: 'broker' });
  const warnThrottled = throttledWarn(log);
  const ips = new IpGuard(opts);
  const clients = new ClientGuard(opts);
  const nonces = new NonceCache(auth?.nonceTtlMs ?? 0);
  const store = auth ? await AdmissionStore.open(auth.dataDir, auth.trustedOperators, log) : undefined;
  if (!auth) {
    log.warn(
      { mode: 'open' },
      'open mode: anonymous clients are accepted and no topic ACLs apply (start the broker with auth to require admitted keys)',
    );
  }

  const counters = newBrokerCounters();
  // Bytes in and out: sockets still open are read at scrape time, closed ones are added up as they close.
  const sockets = new Set<Socket>();
  const track = (stream: Duplex, socket: Socket) => {
    sockets.add(socket);
    socket.once('close', () => {
      sockets.delete(socket);
      counters.bytesInClosed += socket.bytesRead;
      counters.bytesOutClosed += socket.bytesWritten;
    });
    return stream;
  };
  const listener = createListener({
    maxPendingPerIp: opts.maxConnectionsPerIp,
    maxPacketBytes: opts.maxPacketBytes,
    byteRatePerClient: opts.byteRatePerClient,
    byteBurstPerClient: opts.byteBurstPerClient,
    maxConnections: opts.maxConnections,
    tls: opts.tls
      ? {
          cert: opts.tls.cert,
          key: opts.tls.key,
          ...(opts.tls.ca !== undefined ? { ca: opts.tls.ca } : {}),
          requestCert: opts.tls.requireClientCert === true,
        }
      : undefined,
    handshakeTimeoutMs: opts.connectTimeoutMs,
    proxyProtocol: opts.proxyProtocol,
    log,
    warnThrottled,
    wsPath: opts.wsPath,
    handle: (stream, transport) => downgradeSubscribeQoS(aedes.handle(track(stream, transport)), grantedQos),
  });
  const willOrder = new WillOrder();
  // Periodic fan-out a subscriber loses nothing by missing one of: the next comes within seconds. Statuses and
  // device availability are state a client keeps until the next change, which may be long: they are not dropped.
  const isPeriodic = (topic: string) => {
    const parsed = parseTopic(topic);
    return parsed?.kind === 'load' || (parsed?.kind === 'device' && parsed.what === 'telemetry');
  };
  /**
   * A subscriber's socket stopped draining: from the first message forwarded to it then until it drains or closes.
   * Two limits apply to it. A timer disconnects it if it does not drain within drainTimeoutMs: dropped QoS 0 messages
   * never reach aedes' own drain timer, and this one keeps "a client whose socket does not drain within drainTimeoutMs
   * is disconnected" true for them too. And the QoS 1 deliveries forwarded to it meanwhile are counted (`held`): each
   * holds one of aedes' 100 delivery slots until the socket drains. A subscriber may hold MAX_HELD_PER_CLIENT of them,
   * and all such subscribers together MAX_HELD_TOTAL (half the slots); past its own cap a subscriber is disconnected as
   * a slow consumer at once, and past the total the one holding the most is (the subscriber asking when it would hold
   * as many): a subscriber briefly behind on a large reply is not cut off because readers that stopped hold the rest.
   * Otherwise statuses, which are not dropped, would let a reader that stopped (or a few) hold every slot, and stall
   * every publish of everyone, until the drain timeout, again and again.
   */
  interface Stall {
    clientId: string | undefined;
    timer: NodeJS.Timeout | undefined;
    held: number;
  }
  const stalls = new Map<Duplex, Stall>();
  let heldTotal = 0;
  const endStall = (conn: Duplex) => {
    const stall = stalls.get(conn);
    if (!stall) return;
    clearTimeout(stall.timer);
    heldTotal -= stall.held;
    stalls.delete(conn);
  };
  const slowConsumer = (conn: Duplex, stall: Stall, message: string) => {
    counters.slowConsumers++;
    warnThrottled(
      `slow:${stall.clientId}`,
      { clientId: stall.clientId ?? null, reason: 'slow-consumer', held: stall.held, heldTotal },
      message,
    );
    endStall(conn);
    conn.destroy();
  };
  const stallOf = (client: { id?: string }, conn: Duplex): Stall => {
    const known = stalls.get(conn);
    if (known) return known;
    const stall: Stall = { clientId: client.id, timer: undefined, held: 0 };
    stalls.set(conn, stall);
    // One pair of listeners per stall, each removing the other.
    const onDrain = () => {
      conn.off('close', onClose);
      endStall(conn);
    };
    const onClose = () => {
      conn.off('drain', onDrain);
      endStall(conn);
    };
    conn.once('drain', onDrain);
    conn.once('close', onClose);
    if (opts.drainTimeoutMs > 0) {
      stall.timer = setTimeout(() => {
        if (stalls.get(conn) === stall && conn.writableNeedDrain && !conn.destroyed)
          slowConsumer(conn, stall, 'disconnected: its socket did not drain');
      }, opts.drainTimeoutMs);
      stall.timer.unref();
    }
    return stall;
  };
  const HELD_TOO_MANY = 'disconnected: its socket did not drain and it holds too many deliveries';
  /** Counts one more QoS 1 delivery held by `conn`'s stall; false when `conn` was disconnected instead. */
  const holdDelivery = (conn: Duplex, stall: Stall): boolean => {
    if (stall.held >= MAX_HELD_PER_CLIENT) {
      slowConsumer(conn, stall, HELD_TOO_MANY);
      return false;
    }
    if (heldTotal >= MAX_HELD_TOTAL) {
      let most: [Duplex, Stall] | undefined;
      for (const entry of stalls) if (entry[0] !== conn && entry[1].held > (most?.[1].held ?? 0)) most = entry;
      if (!most || most[1].held <= stall.held + 1) {
        slowConsumer(conn, stall, HELD_TOO_MANY);
        return false;
      }
      slowConsumer(most[0], most[1], HELD_TOO_MANY);
    }
    stall.held++;
    heldTotal++;
    return true;
  };
  const aedes = await Aedes.createBroker({
    connectTimeout: opts.connectTimeoutMs,
    keepaliveLimit: opts.keepaliveLimitS,
    drainTimeout: opts.drainTimeoutMs,
    queueLimit: opts.queueLimit,
    maxClientsIdLength: opts.maxClientIdLength, // aedes applies it to MQTT 3.1 only; checkConnect applies it to 3.1.1
    maxInflightInbound: MAX_INFLIGHT_INBOUND,
    // aedes disconnects on its own level cap, even for SUBSCRIBE; keep it at qlobber's ceiling and enforce the
    // mesh's tighter `maxTopicLevels` in the authorize handlers so an over-deep filter gets SUBACK 0x80.
    maxTopicLevels: AEDES_MAX_TOPIC_LEVELS,
    // Public aedes hook, called once per message forwarded to a subscriber: counted, and not forwarded at QoS 0 to a
    // subscriber whose socket is not draining. aedes finishes a delivery only once the subscriber's socket drains,
    // and runs at most 100 deliveries at once for the whole broker: one client that stops reading, subscribed to the
    // fleet's load reports, would hold every slot for drainTimeoutMs in turn and stall every publish of everyone.
    // QoS 0 may be lost anyway, and so may periodic fan-out (load reports, device telemetry) however published (a
    // delivery's QoS is settled after this hook, so a QoS 1 load report to a QoS 0 subscription is dropped by topic).
    // Other QoS 1 messages still wait: statuses, and what the client asked for or was sent.
    authorizeForward: (client, packet) => {
      const conn = (client as { conn?: Duplex } | null)?.conn;
      if (conn?.writableNeedDrain) {
        const stall = stallOf(client!, conn);
        if (packet.qos === 0 || isPeriodic(packet.topic)) {
          counters.messagesDroppedSlow++;
          return null;
        }
        if (!holdDelivery(conn, stall)) return null;
      }
      counters.messagesOut++;
      return packet;
    },
    ...createAedesHooks({
      opts,
      log,
      warnThrottled,
      ips,
      clients,
      nonces,
      store,
      addressOf: listener.addressOf,
      counters,
      willOrder,
      onAdminRecord: (session, payload) => void admissions.applyRecord(session, payload),
    }),
  });
  let closing: Promise<void> | undefined;
  const admissions = admissionControl(aedes, store, log, () => closing !== undefined);

  // A client that finished CONNECT no longer counts against its address's cap on pending sockets.
  aedes.on('client', (client) => listener.established(client.conn));
  aedes.on('clientError', (client, err) => log.debug({ clientId: client.id, err: err.message }, 'client error'));
  aedes.on('connectionError', (client, err) => {
    log.debug(
      { remoteAddress: (client.conn as { remoteAddress?: string } | undefined)?.remoteAddress, err: err.message },
      'connection error',
    );
  });
  aedes.on('publish', (_packet, client) => {
    if (!client) return;
    counters.messagesIn++;
    willOrder.published(client);
  });
  aedes.on('keepaliveTimeout', (client) => log.debug({ clientId: client.id }, 'keepalive timeout'));
  // Without a listener an 'error' (e.g. from persistence) would throw and take the process down.
  (aedes as NodeJS.EventEmitter).on('error', (err: Error) => log.error({ err }, 'aedes error'));

  // Forget idle per-IP state and expired nonces.
  const sweeper = setInterval(() => {
    const now = Date.now();
    ips.sweep(now);
    clients.sweep(now);
    nonces.prune(now);
  }, SWEEP_INTERVAL_MS);
  sweeper.unref();

  let port: number;
  try {
    port = await listener.listen(opts.port, host);
  } catch (err) {
    clearInterval(sweeper);
    await new Promise<void>((resolve) => aedes.close(() => resolve()));
    await store?.close();
    throw new MeshError('MESH_CONFIG', `broker cannot listen on ${host}:${opts.port}: ${(err as Error).message}`, { cause: err });
  }
  const hostPart = host.includes(':') ? `[${host}]` : host;
  const url = `${listener.scheme}://${hostPart}:${port}`;
  /** Undoes a start that failed once the listener was up. */
  const abandon = async (): Promise<void> => {
    clearInterval(sweeper);
    listener.stopAccepting();
    await new Promise<void>((resolve) => aedes.close(() => resolve()));
    await listener.close();
    await store?.close();
  };
  let wsUrl: string | undefined;
  if (opts.wsPort !== undefined) {
    try {
      const wsPort = await listener.listenWs(opts.wsPort, host);
      wsUrl = `${listener.wsScheme}://${hostPart}:${wsPort}${opts.wsPath}`;
    } catch (err) {
      await abandon();
      throw new MeshError('MESH_CONFIG', `broker cannot listen for WebSocket on ${host}:${opts.wsPort}: ${(err as Error).message}`, {
        cause: err,
      });
    }
  }
  log.debug({ port, host }, 'broker listening');
  let metrics: MetricsServer | undefined;
  if (opts.metricsPort !== undefined) {
    try {
      // prom-client loads only here, with the metrics port on.
      const { serveBrokerMetrics } = await import('./metrics.ts');
      metrics = await serveBrokerMetrics(
        {
          counters,
          connections: () => aedes.connectedClients,
          liveBytes: () => {
            let read = 0;
            let written = 0;
            for (const s of sockets) {
              read += s.bytesRead;
              written += s.bytesWritten;
            }
            return { read, written };
          },
          logger: log,
        },
        opts.metricsPort,
        opts.metricsHost,
      );
      log.info({ url: metrics.url }, 'metrics listening');
    } catch (err) {
      await abandon();
      throw err;
    }
  }

  async function shutdown(): Promise<void> {
    clearInterval(sweeper);
    await metrics?.close();
    listener.stopAccepting();
    // aedes first: it disconnects its clients, after which the server can actually finish closing.
    await new Promise<void>((resolve) => aedes.close(() => resolve()));
    await listener.close();
    await store?.close();
    log.debug({ port }, 'broker closed');
  }

  return {
    port,
    url,
    ...(wsUrl ? { wsUrl } : {}),
    aedes,
    clientCount: () => aedes.connectedClients,
    ...(metrics ? { metricsUrl: metrics.url } : {}),
    mode: auth ? 'auth' : 'open',
    admit: (signed: SignedRecord): Promise<Admission> => admissions.admit(signed),
    revoke: (signed: SignedRecord): Promise<Revocation> => admissions.revoke(signed),
    admissions: () => store?.admissions() ?? [],
    revocations: () => store?.revocations() ?? [],
    close: () => (closing ??= shutdown()),
  };
}
export {
  decodeForm,
  RABBITMQ_SERVICE_USER,
  type RabbitmqAuthHandle,
  type RabbitmqAuthOptions,
  RabbitmqDecisions,
  rabbitmqAuthConf,
  routingKeyToTopic,
  startRabbitmqAuth,
} from './rabbitmq.ts';
export { AdmissionStore } from './store.ts';
