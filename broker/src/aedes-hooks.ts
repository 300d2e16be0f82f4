/**
 * The broker's aedes hooks (preConnect, authenticate, authorizePublish, authorizeSubscribe): each asks the decision
 * module for its packet kind (./handlers/), answers aedes the way MQTT 3.1.1 wants the refusal answered, logs it, and
 * then runs the application's hook of the same name (options.ts `BrokerHooks`).
 */

import type { WarnThrottled } from '@edge-mesh/client';
import { MeshError, type MeshErrorCode, toMeshError } from '@edge-mesh/protocol';
import type { AuthenticateError, Client, ConnectPacket, PublishPacket, Subscription } from 'aedes';
import type { Logger } from 'pino';
import type { MeshSession } from './acl.ts';
import {
  answerUnacceptableProtocol,
  authenticateError,
  isOwnWill,
  orphanWillOwner,
  passAedesKeepaliveCheck,
  sessionOf,
  setSession,
} from './aedes-adapter.ts';
import { type BrokerCounters, countConnectRefused, countInto } from './counters.ts';
import {
  type Admissions,
  CONNACK_NOT_AUTHORIZED,
  type ConnectCheck,
  type ConnectPolicy,
  checkConnect,
  type DoorVerdict,
  doorVerdict,
  limitRefusal,
  namesAdmittedId,
  verifyConnect,
} from './handlers/connect.ts';
import { decidePublish } from './handlers/publish.ts';
import { REFUSAL_CODES } from './handlers/refusals.ts';
import { decideSubscribe, grantedQos, takeSubscription } from './handlers/subscribe.ts';
import type { ClientGuard, IpGuard, NonceCache } from './limits.ts';
import type { ResolvedBrokerOptions } from './options.ts';
import type { TopicLimits } from './policy.ts';
import type { WillOrder } from './will-order.ts';

export interface HookContext {
  opts: ResolvedBrokerOptions;
  log: Logger;
  warnThrottled: WarnThrottled;
  ips: IpGuard;
  clients: ClientGuard;
  nonces: NonceCache;
  /** The admission store; undefined in open mode. */
  store: Admissions | undefined;
  /** The address a socket came from, as the listener recorded it. */
  addressOf(socket: unknown): string | undefined;
  /** Refusals and bans, for the metrics (./counters.ts). */
  counters: BrokerCounters;
  /** Holds each client's will until its earlier publishes are through. */
  willOrder: WillOrder;
  /** An operator's admin record passed the ACL: apply it and publish the ack. */
  onAdminRecord(session: MeshSession, payload: Buffer): void;
}

export interface AedesHooks {
  preConnect(client: Client, packet: ConnectPacket, callback: (error: Error | null, success: boolean) => void): void;
  authenticate(
    client: Client,
    username: string | undefined,
    password: Buffer | undefined,
    callback: (error: AuthenticateError | null, success: boolean | null) => void,
  ): void;
  authorizePublish(client: Client | null, packet: PublishPacket, callback: (error?: Error | null) => void): void;
  authorizeSubscribe(client: Client, sub: Subscription, callback: (error: Error | null, subscription?: Subscription | null) => void): void;
}

export function createAedesHooks(ctx: HookContext): AedesHooks {
  const { opts, log, warnThrottled } = ctx;
  const { hooks, auth } = opts;
  const limits: TopicLimits = { maxTopicLevels: opts.maxTopicLevels, maxTopicBytes: opts.maxTopicBytes };
  const connectPolicy: ConnectPolicy = {
    maxClientIdLength: opts.maxClientIdLength,
    keepaliveLimitS: opts.keepaliveLimitS,
    limits,
    auth: auth && { maxClockSkewMs: auth.maxClockSkewMs },
  };
  const publishRatePerMs = opts.publishRatePerClient / 1000;
  const publishBurst = opts.publishBurstPerClient;
  // CONNECT checks run in preConnect (which sees the raw packet) but are answered in authenticate, which is the only
  // place aedes can send a CONNACK with a refusal code instead of just dropping the socket.
  const pendingConnects = new WeakMap<Client, { check: ConnectCheck; door: DoorVerdict & { action: 'go' } }>();

  function ipOf(client: Client): string {
    return ctx.addressOf(client.conn) ?? (client.conn as { remoteAddress?: string } | undefined)?.remoteAddress ?? 'unknown';
  }

  /**
   * Counts a refused CONNECT and logs it: against the (id, address) pair when it named an admitted id, else against
   * the address (docs/security.md, "Connecting"). Logged at warn once a second per address and reason, the repeats
   * at debug: a flood from one address (fresh ids each time) must not flood the log.
   */
  function connectFailed(client: Client, reason: string, code: MeshErrorCode, topic?: string): void {
    const ip = ipOf(client);
    // An over-long id is logged by its first 64 characters only.
    const clientId = client.id?.slice(0, 64) ?? null;
    warnThrottled(`connect:${ip}:${reason}`, { clientId, topic, reason, code, remoteAddress: ip }, 'connect refused');
    countConnectRefused(ctx.counters, reason, code);
    const now = Date.now();
    if (namesAdmittedId(client.id ?? '', ctx.store, now)) {
      if (ctx.clients.failure(ip, client.id, now)) {
        ctx.counters.clientBans++;
        log.warn({ clientId, remoteAddress: ip, reason: 'auth-failure-storm', banMs: opts.banMs }, 'client limited');
      }
    } else countFailure(ip);
  }

  function countFailure(ip: string): void {
    if (ctx.ips.failure(ip, Date.now())) {
      ctx.counters.addressLimits++;
      log.warn({ remoteAddress: ip, reason: 'auth-failure-storm', banMs: opts.banMs }, 'address limited');
    }
  }

  function refusePublish(
    ownerId: string | null | undefined,
    topic: string,
    reason: string,
    code: MeshErrorCode,
    callback: (error?: Error | null) => void,
    cause?: Error,
  ): void {
    countInto(ctx.counters.publishRefused, code);
    // A hook's reasons may differ each time (its error's message): they share one key, so a flood logs once a second.
    const key = reason.startsWith('hook') ? 'hook' : reason;
    warnThrottled(`publish:${ownerId}:${key}`, { clientId: ownerId ?? null, topic, reason, code }, 'publish refused');
    // For MQTT 3.1.1 aedes answers an error by closing the connection (there is no PUBACK error code, [MQTT-3.3.5-2]).
    callback(new MeshError(code, `publish refused: ${reason}`, { cause, details: { reason } }));
  }

  function refuseSubscribe(
    client: Client,
    topic: string,
    reason: string,
    code: MeshErrorCode,
    callback: (error: Error | null, sub?: null) => void,
  ): void {
    countInto(ctx.counters.subscribeRefused, code);
    warnThrottled(`subscribe:${client.id}`, { clientId: client.id, topic, reason, code }, 'subscribe refused');
    // SUBACK 0x80 for this filter; the connection stays up
    callback(null, null);
  }

  return {
    preConnect(client: Client, packet: ConnectPacket, callback: (error: Error | null, success: boolean) => void): void {
      const now = Date.now();
      const ip = ipOf(client);
      const door = doorVerdict(ctx.ips, ip, packet.protocolVersion, now);
      if (door.action === 'wrong-version') {
        const clientId = packet.clientId?.slice(0, 64) || null;
        const { reason, code, limited } = door;
        warnThrottled(
          `connect:${ip}:${reason}`,
          { clientId, reason, code, protocolVersion: packet.protocolVersion, remoteAddress: ip, limited },
          'connect refused',
        );
        countConnectRefused(ctx.counters, reason, code);
        // As in authenticate: a refusal while a limit holds is not counted, so a limit cannot feed itself.
        if (limited === undefined) countFailure(ip);
        answerUnacceptableProtocol(packet);
        callback(null, true);
        return;
      }
      if (door.limited === 'connect-rate' && !door.quiet) {
        log.warn(
          { remoteAddress: ip, reason: door.limited, code: 'MESH_RATE_LIMITED' },
          'address over its CONNECT rate: only admitted ids go on',
        );
      }
      const check = checkConnect(packet, connectPolicy, now);
      if (!check.ok && (check.reason === 'keepalive-too-long' || check.reason === 'keepalive-zero')) passAedesKeepaliveCheck(packet);
      pendingConnects.set(client, { check, door });
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
            const clientId = packet.clientId?.slice(0, 64) || null;
            warnThrottled(
              `connect:${ip}:hook`,
              { clientId, topic: undefined, reason, code: 'MESH_UNAUTHORIZED', remoteAddress: ip },
              'connect refused',
            );
            countConnectRefused(ctx.counters, 'hook', 'MESH_UNAUTHORIZED');
            // aedes only closes the socket when preConnect reports an error; `false` alone would leave it open.
            const refusal = new MeshError('MESH_UNAUTHORIZED', `connect refused by preConnect hook${err ? `: ${err.message}` : ''}`, {
              cause: err ?? undefined,
              details: { reason: 'hook' },
            });
            return callback(refusal, false);
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
      const pending = pendingConnects.get(client);
      pendingConnects.delete(client);
      const now = Date.now();
      const ip = ipOf(client);
      // The limits first: a refusal by a limit is not itself counted as a failure, so a limit cannot feed itself.
      const limited = limitRefusal(pending?.door.limited !== undefined, client.id ?? '', ip, ctx.clients, ctx.store, now);
      if (limited !== undefined) {
        const clientId = client.id?.slice(0, 64) ?? null;
        warnThrottled(
          `limit:${ip}:${limited.reason}`,
          { clientId, reason: limited.reason, code: limited.code, remoteAddress: ip },
          'connect refused',
        );
        countConnectRefused(ctx.counters, limited.reason, limited.code);
        const refusal = new MeshError(limited.code, limited.reason, { details: { reason: limited.reason } });
        callback(authenticateError(refusal, limited.returnCode), false);
        return;
      }
      const check = pending?.check;
      const verdict =
        check === undefined || check.ok ? verifyConnect(client.id, check?.token, ctx.store, ctx.nonces, now, publishBurst) : check;
      if (!verdict.ok) {
        connectFailed(client, verdict.reason, verdict.code, verdict.topic);
        const refusal = new MeshError(verdict.code, verdict.reason, { details: { reason: verdict.reason } });
        callback(authenticateError(refusal, verdict.returnCode), false);
        return;
      }
      setSession(client, verdict.session);
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
            connectFailed(client, reason, 'MESH_UNAUTHORIZED');
            const refusal = new MeshError('MESH_UNAUTHORIZED', reason, { cause: err ?? undefined, details: { reason: 'hook' } });
            return callback(authenticateError(refusal, CONNACK_NOT_AUTHORIZED), false);
          }
          callback(null, true);
        },
      );
    },

    authorizePublish(client: Client | null, packet: PublishPacket, callback: (error?: Error | null) => void): void {
      // `client` is null only for a will aedes republishes after its owner's broker vanished.
      const ownerId = client ? client.id : orphanWillOwner(packet);
      const session = client === null ? undefined : sessionOf(client);
      const ownWill = client !== null && isOwnWill(client, packet);
      if (client !== null && !ownWill && ctx.willOrder.willReleased(client)) {
        // Read from the connection after its will went out: older news than the will (./will-order.ts).
        refusePublish(ownerId, packet.topic, 'after-will', 'MESH_FORBIDDEN', callback);
        return;
      }
      const verdict = decidePublish(packet, {
        ownerId,
        session,
        orphanWill: client === null,
        ownWill,
        auth: auth !== undefined,
        limits,
        ratePerMs: publishRatePerMs,
        burst: publishBurst,
        now: Date.now(),
      });
      if (!verdict.ok) {
        refusePublish(ownerId, packet.topic, verdict.reason, verdict.code, callback);
        return;
      }
      // An admin record is applied by the broker and acknowledged on the operator's acks topic. Nobody may subscribe
      // to admin records, so letting aedes go on (which sends the PUBACK) forwards it to no one.
      const accept = () => {
        if (verdict.admin) ctx.onAdminRecord(session!, packet.payload as Buffer);
        if (client === null) callback(null);
        else if (ownWill) ctx.willOrder.beforeWill(client, () => callback(null));
        else {
          ctx.willOrder.accepted(client);
          callback(null);
        }
      };
      const hook = hooks.authorizePublish;
      if (!hook) {
        accept();
        return;
      }
      runHook(
        () => hook(client, packet),
        (err, ok) => {
          if (err || ok !== true) {
            const reason = err ? `hook: ${err.message}` : 'hook';
            return refusePublish(ownerId, packet.topic, reason, 'MESH_FORBIDDEN', callback, err ?? undefined);
          }
          accept();
        },
      );
    },

    authorizeSubscribe(
      client: Client,
      sub: Subscription,
      callback: (error: Error | null, subscription?: Subscription | null) => void,
    ): void {
      const session = sessionOf(client);
      const verdict = decideSubscribe(sub.topic, sub.qos, session, auth !== undefined, limits, opts.maxSubscriptions);
      if (!verdict.ok) {
        refuseSubscribe(client, sub.topic, verdict.reason, verdict.code, callback);
        return;
      }
      sub.qos = verdict.qos as Subscription['qos'];
      // The filter takes its room as aedes is told it is granted (a hook may have changed it, or answered later).
      const grant = (granted: Subscription): void => {
        if (session === undefined || takeSubscription(session, granted.topic, opts.maxSubscriptions)) callback(null, granted);
        else refuseSubscribe(client, granted.topic, 'too-many-subscriptions', REFUSAL_CODES['too-many-subscriptions'], callback);
      };
      const hook = hooks.authorizeSubscribe;
      if (!hook) {
        grant(sub);
        return;
      }
      runHook(
        () => hook(client, sub),
        (err, allowed) => {
          if (err || !allowed) {
            refuseSubscribe(client, sub.topic, err ? `hook: ${err.message}` : 'hook', 'MESH_FORBIDDEN', callback);
            return;
          }
          allowed.qos = grantedQos(allowed.qos) as Subscription['qos'];
          grant(allowed);
        },
      );
    },
  };
}

/** Runs an application hook, which may answer synchronously or with a Promise; a throw or rejection becomes `err`. */
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

/** A hook may throw anything; a non-Error becomes a MeshError carrying it as the cause. */
function asError(err: unknown): Error {
  return err instanceof Error ? err : toMeshError(err, 'MESH_INTERNAL');
}
