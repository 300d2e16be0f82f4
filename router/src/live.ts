/**
 * The live router: the pure core (estimates.ts, select.ts) fed from MQTT. It subscribes to every agent's
 * signed status and load heartbeat, keeps the registry current, answers `route()` (which agent, predicted
 * ms) and forwards requests for thin clients as itself (`infer()`): per-try timeouts from the prediction,
 * retries on another agent after MESH_BUSY / a lost agent, one hedge to a different warm node after
 * hedgeDelayMs, and the loser cancelled on the cancel topic. Time for the core is Date.now(), the same
 * clock as the wire deadlines.
 */

import {
  changeSignal,
  extraAttemptAfter,
  openMeshConnection,
  readAgentStatus,
  readReply,
  TailBudget,
  type TailBudgetOptions,
} from '@edge-mesh/client';
import {
  type AgentLoad,
  type AgentStatus,
  assertValidId,
  checkTensor,
  DEFAULT_MAX_MESSAGE_BYTES,
  decodeMessage,
  decodeTensorMap,
  encodeMessage,
  encodeTensorMap,
  type Identity,
  type InferReply,
  type Lease,
  type LeaseAgent,
  MeshError,
  type MeshErrorCode,
  type ModelInfo,
  newRequestId,
  PROTOCOL_VERSION,
  parseTopic,
  type RouteRequest as RouteMessage,
  requestIdHex,
  type Tensor,
  topics,
} from '@edge-mesh/protocol';
import type { MqttClient } from 'mqtt';
import {
  createRegistry,
  evaluateOutliers,
  markDown,
  onCancel,
  onFailure,
  onLoad,
  onReply,
  onSend,
  onStatus,
  type RouterOptions,
  serviceMsAt,
} from './estimates.ts';
import type {
  AttemptRecord,
  RouteOptions,
  RouteResult,
  RouterCounters,
  RouterHandle,
  RouterHttpHandle,
  RouterHttpOptions,
  RouterInferOptions,
  RouterInferResult,
  RouterLogger,
} from './handle.ts';
import { fleetUtilization, hedgeDelayMs, perTryTimeoutMs, type RouteRequest, selectAgent } from './select.ts';

const SILENT: RouterLogger = { debug() {}, info() {}, warn() {}, error() {} };

export interface StartRouterOptions {
  brokerUrl: string;
  /** A 'router' identity: its id is the router's client id and it proves the router on CONNECT. */
  identity: Identity;
  logger?: RouterLogger;
  /** Tuning of the pure core (see RouterConfig). */
  config?: RouterOptions;
  /** Deadline when a call gives none, ms. */
  defaultDeadlineMs?: number;
  /** Attempts per request, hedges included. */
  maxAttempts?: number;
  /** Hedge a slow attempt on a different warm node (default true). */
  hedging?: boolean;
  /** No hedges while the fleet's utilisation is above this (default 0.8). */
  hedgeMaxUtilization?: number;
  /** Retry and hedge budget (protocol/budget.ts; default: extras ≤ 20 % of requests, hedges ≤ 5 %). */
  tailBudget?: Partial<TailBudgetOptions>;
  /** Period of outlier evaluation (success-rate ejection), ms. */
  outlierIntervalMs?: number;
  maxMessageBytes?: number;
  keepaliveS?: number;
  /** Ignore statuses without a valid signature from the agent's key (default true). */
  requireSignedStatus?: boolean;
  /** How long a route lease given to an SDK client may be used, ms (default 500). */
  leaseTtlMs?: number;
  /** Agents per lease, best first (default 3). */
  leaseAgents?: number;
  /** Also serve the HTTP API (KServe v2, /v1 operator endpoints, /metrics; see http.ts); closed with the router. */
  http?: RouterHttpOptions;
}

/** Codes after which another agent may well succeed. */
const RETRY_ELSEWHERE: ReadonlySet<MeshErrorCode> = new Set([
  'MESH_BUSY',
  'MESH_AGENT_LOST',
  'MESH_SHUTTING_DOWN',
  'MESH_UNKNOWN_MODEL',
  'MESH_TIMEOUT',
  'MESH_NOT_CONNECTED',
]);

interface Attempt {
  /** Paid from the tail budget (a retry or hedge, not a failover). */
  extra: boolean;
  sentAt: number;
  predictedMs: number;
  timer: NodeJS.Timeout | undefined;
  /** The per-try timeout fired: the attempt already counted as a failure, but its late answer still wins. */
  timedOut: boolean;
}

interface InFlight {
  model: string;
  attempts: Map<string, Attempt>;
  onAnswer(agentId: string, reply: InferReply | undefined, err: MeshError | undefined): void;
}

export async function startRouter(options: StartRouterOptions): Promise<RouterHandle> {
  const {
    brokerUrl,
    identity,
    logger = SILENT,
    defaultDeadlineMs = 2_000,
    maxAttempts = 3,
    hedging = true,
    outlierIntervalMs = 1_000,
    maxMessageBytes = DEFAULT_MAX_MESSAGE_BYTES,
    keepaliveS = 10,
    requireSignedStatus = true,
    leaseTtlMs = 500,
    hedgeMaxUtilization = 0.8,
    leaseAgents = 3,
  } = options;
  if (identity.role !== 'router')
    throw new MeshError('MESH_CONFIG', `startRouter needs a router key, got a ${identity.role} key (${identity.id})`);
  const routerId = assertValidId(identity.id, 'router id');
  if (!Number.isInteger(maxAttempts) || maxAttempts < 1)
    throw new MeshError('MESH_CONFIG', `maxAttempts must be a positive integer, got ${maxAttempts}`);

  const registry = createRegistry(options.config ?? {});
  const budget = new TailBudget(options.tailBudget ?? {}, performance.now());
  const statuses = new Map<string, AgentStatus>();
  const pending = new Map<string, InFlight>();
  const listeners = new Set<(a: AttemptRecord) => void>();
  const changes = changeSignal();
  const counters: RouterCounters = {
    statusRejected: 0,
    requests: 0,
    ok: 0,
    failed: 0,
    retries: 0,
    hedges: 0,
    cancels: 0,
    budgetRefused: 0,
    leases: 0,
    leasesRefused: 0,
    sentTo: {},
  };
  const emit = (a: AttemptRecord) => {
    for (const l of listeners) {
      try {
        l(a);
      } catch (err) {
        logger.warn({ err: (err as Error).message }, 'attempt listener threw');
      }
    }
  };

  const failOutstanding = (agentId: string, code: MeshErrorCode, message: string) => {
    for (const request of [...pending.values()]) {
      if (request.attempts.has(agentId)) request.onAnswer(agentId, undefined, new MeshError(code, message, { details: { agentId } }));
    }
  };

  const handleStatus = (agentId: string, payload: Buffer) => {
    if (payload.length === 0) return;
    const reading = readAgentStatus(agentId, payload, { maxBytes: maxMessageBytes, requireSigned: requireSignedStatus });
    if (!reading.ok) {
      if (reading.reason === 'unverified') counters.statusRejected++;
      logger.debug({ agentId, reason: reading.reason, err: reading.message }, 'ignoring status');
      return;
    }
    const { status } = reading;
    const previous = statuses.get(agentId);
    const now = Date.now();
    if (status.state !== 'online') {
      statuses.set(agentId, status);
      onStatus(registry, status, now);
      failOutstanding(agentId, 'MESH_AGENT_LOST', `agent ${agentId} went ${status.state}`);
      logger.info({ agentId, state: status.state }, 'agent not online');
      changes.notify();
      return;
    }
    if (previous && previous.state === 'online' && previous.session !== status.session) {
      failOutstanding(agentId, 'MESH_AGENT_LOST', `agent ${agentId} restarted`);
    }
    statuses.set(agentId, status);
    const entry = onStatus(registry, status, now);
    // A returning agent is up again (upsertAgent keeps the learned estimates).
    if (entry) entry.up = true;
    changes.notify();
  };

  const handleLoad = (agentId: string, payload: Buffer) => {
    if (statuses.get(agentId)?.state !== 'online') return;
    let load: AgentLoad;
    try {
      load = decodeMessage(payload, ['load'], maxMessageBytes);
    } catch (err) {
      logger.debug({ agentId, err: (err as Error).message }, 'ignoring bad load report');
      return;
    }
    if (load.agent !== agentId) return;
    onLoad(registry, load, Date.now());
  };

  const handleReply = (agentId: string, payload: Buffer) => {
    const reading = readReply(agentId, payload, maxMessageBytes);
    if (!reading) {
      logger.debug({ agentId }, 'ignoring bad reply');
      return;
    }
    const request = pending.get(reading.key);
    if (request?.attempts.has(agentId)) request.onAnswer(agentId, reading.reply, reading.error);
  };

  const route = (model: string, routeOptions: RouteOptions = {}, extra: Partial<RouteRequest> = {}): RouteResult => {
    const now = Date.now();
    const request: RouteRequest = {
      model,
      ...(routeOptions.deadlineMs !== undefined ? { deadlineMs: now + routeOptions.deadlineMs } : {}),
      ...(routeOptions.bytesUp !== undefined ? { bytesUp: routeOptions.bytesUp } : {}),
      ...(routeOptions.exclude ? { exclude: routeOptions.exclude } : {}),
      ...extra,
    };
    const selection = selectAgent(registry, request, now, registry.rng);
    if (!selection.ok) throw new MeshError(selection.code, selection.message, { details: { model } });
    return { agentId: selection.agentId, predictedMs: selection.predictedMs };
  };

  /** Up to `leaseAgents` distinct agents for a lease, best first, each with the numbers the client needs. */
  const leaseFor = (model: string, budgetMs: number | undefined, bytes: number | undefined, exclude: readonly string[]): LeaseAgent[] => {
    const out: LeaseAgent[] = [];
    const skip = new Set(exclude);
    const now = Date.now();
    while (out.length < leaseAgents) {
      let choice: RouteResult;
      try {
        choice = route(model, {
          ...(budgetMs !== undefined ? { deadlineMs: budgetMs } : {}),
          ...(bytes !== undefined ? { bytesUp: bytes } : {}),
          exclude: skip,
        });
      } catch (err) {
        if (out.length === 0) throw err;
        break;
      }
      if (skip.has(choice.agentId)) break;
      skip.add(choice.agentId);
      const entry = registry.agents.get(choice.agentId)?.models.get(model);
      out.push({
        agent: choice.agentId,
        predictedMs: choice.predictedMs,
        serviceMs: entry ? serviceMsAt(entry, now) : choice.predictedMs,
        timeoutMs: perTryTimeoutMs(registry, choice.predictedMs, budgetMs),
        hedgeAfterMs: entry ? hedgeDelayMs(entry, choice.predictedMs) : Number.MAX_SAFE_INTEGER,
      });
    }
    return out;
  };

  const handleRoute = (senderId: string, payload: Buffer) => {
    let ask: RouteMessage;
    try {
      ask = decodeMessage(payload, ['route'], maxMessageBytes);
    } catch (err) {
      logger.debug({ senderId, err: (err as Error).message }, 'ignoring bad route request');
      return;
    }
    let lease: Lease;
    try {
      const agents = leaseFor(ask.model, ask.budgetMs, ask.bytes, ask.exclude ?? []);
      lease = { v: PROTOCOL_VERSION, kind: 'lease', id: ask.id, router: routerId, model: ask.model, agents, ttlMs: leaseTtlMs };
      counters.leases++;
    } catch (err) {
      const e = err instanceof MeshError ? err : new MeshError('MESH_INTERNAL', (err as Error).message);
      lease = {
        v: PROTOCOL_VERSION,
        kind: 'lease',
        id: ask.id,
        router: routerId,
        model: ask.model,
        agents: [],
        ttlMs: 0,
        code: e.code,
        message: e.message.slice(0, 1024),
      };
      counters.leasesRefused++;
    }
    if (client.connected) client.publish(topics.clientLease(senderId, routerId), encodeMessage(lease), { qos: 1 });
  };

  let connected = false;
  let closing = false;
  const connection = openMeshConnection(brokerUrl, {
    identity,
    keepaliveS,
    onConnect: (c: MqttClient) => {
      connected = true;
      c.subscribe(
        [topics.clientRepliesFor(routerId), topics.routerRoutesFor(routerId), topics.allAgentStatus(), topics.allAgentLoad()],
        { qos: 1 },
        (err) => {
          if (err) logger.error({ err: err.message }, 'subscribe failed');
        },
      );
    },
    onRefused: (err) => logger.error({ code: err.code, err: err.message }, 'broker refused the router'),
  });
  const client = connection.client;
  client.on('close', () => (connected = false));
  client.on('message', (topic, payload) => {
    const parsed = parseTopic(topic);
    if (!parsed) return;
    if (parsed.kind === 'status') handleStatus(parsed.agentId, payload);
    else if (parsed.kind === 'load') handleLoad(parsed.agentId, payload);
    else if (parsed.kind === 'reply' && parsed.clientId === routerId) handleReply(parsed.agentId, payload);
    else if (parsed.kind === 'route' && parsed.routerId === routerId) handleRoute(parsed.senderId, payload);
  });
  await connection.firstConnect;

  const outlierTimer = setInterval(() => {
    const ejected = evaluateOutliers(registry, Date.now());
    if (ejected.length > 0) logger.info({ ejected }, 'ejected outliers');
  }, outlierIntervalMs);
  outlierTimer.unref();

  const cancelOn = (agentId: string, id: Uint8Array) => {
    counters.cancels++;
    if (client.connected)
      client.publish(topics.agentCancel(agentId, routerId), encodeMessage({ v: PROTOCOL_VERSION, kind: 'cancel', id }), { qos: 1 });
  };

  const hasCandidate = (model: string): boolean => {
    try {
      route(model);
      return true;
    } catch {
      return false;
    }
  };

  const infer = async (
    model: string,
    inputs: Record<string, Tensor>,
    inferOptions: RouterInferOptions = {},
  ): Promise<RouterInferResult> => {
    const { deadlineMs = defaultDeadlineMs } = inferOptions;
    for (const [name, tensor] of Object.entries(inputs)) checkTensor(name, tensor);
    counters.requests++;
    const started = performance.now();
    const deadline = Date.now() + deadlineMs;
    const id = newRequestId();
    const key = requestIdHex(id);
    const payload = encodeMessage({ v: PROTOCOL_VERSION, kind: 'req', id, deadline, model, inputs: encodeTensorMap(inputs) });

    // A router that just started may not have heard the statuses yet: wait within the deadline.
    while (!hasCandidate(model) && Date.now() < deadline) await changes.wait(Math.min(100, deadline - Date.now()));

    budget.onRequest(performance.now());
    return new Promise<RouterInferResult>((resolve, reject) => {
      const tried: string[] = [];
      const attempts = new Map<string, Attempt>();
      let lastError: MeshError | undefined;
      let hedgeTimer: NodeJS.Timeout | undefined;
      let hedged = false;
      let done = false;

      const settle = (agentId: string): Attempt | undefined => {
        const attempt = attempts.get(agentId);
        if (!attempt) return undefined;
        attempts.delete(agentId);
        clearTimeout(attempt.timer);
        if (attempt.extra) budget.onExtraDone();
        return attempt;
      };
      const finish = (err: MeshError | undefined, result?: RouterInferResult) => {
        if (done) return;
        done = true;
        budget.onRequestDone();
        clearTimeout(deadlineTimer);
        clearTimeout(hedgeTimer);
        pending.delete(key);
        for (const agentId of [...attempts.keys()]) {
          const a = settle(agentId)!;
          if (!a.timedOut) onCancel(registry, agentId, Date.now());
          cancelOn(agentId, id);
        }
        if (err) {
          counters.failed++;
          reject(err);
        } else {
          counters.ok++;
          resolve(result!);
        }
      };
      const failNow = () => {
        if (done) return;
        if (Date.now() >= deadline) {
          const last = lastError ? ` (last: ${lastError.code})` : '';
          finish(
            new MeshError('MESH_DEADLINE_EXCEEDED', `no result for ${model} within ${deadlineMs} ms${last}`, {
              cause: lastError,
              details: { model, tried },
            }),
          );
        } else if (lastError) finish(lastError);
        else finish(new MeshError('MESH_NO_AGENT', `no live agent serves model ${model}`, { details: { model } }));
      };

      /** Starts an attempt on a node not tried yet; false when there is none, no budget, or no time. */
      const launch = (kind: 'first' | 'failover' | 'retry' | 'hedge'): boolean => {
        if (done || closing || tried.length >= maxAttempts) return false;
        const now = Date.now();
        const remaining = deadline - now;
        if (remaining <= 0) return false;
        let choice: RouteResult;
        try {
          choice = route(
            model,
            { deadlineMs: remaining, bytesUp: payload.byteLength, exclude: new Set(tried) },
            kind === 'hedge' ? { warmOnly: true } : {},
          );
        } catch (err) {
          if (kind !== 'hedge') lastError ??= err as MeshError;
          return false;
        }
        // selectAgent falls back to excluded nodes when nothing else is left; never send twice to one node.
        if (tried.includes(choice.agentId)) return false;
        // Retries and hedges are paid from the budget; moving work off a lost agent is not (it never ran).
        const paid = kind === 'retry' || kind === 'hedge';
        if (paid && !budget.take(kind, performance.now())) {
          counters.budgetRefused++;
          return false;
        }
        const { agentId, predictedMs } = choice;
        tried.push(agentId);
        counters.sentTo[agentId] = (counters.sentTo[agentId] ?? 0) + 1;
        if (kind === 'retry' || kind === 'failover') counters.retries++;
        if (kind === 'hedge') {
          counters.hedges++;
          hedged = true;
        }
        onSend(registry, agentId, model, now);
        const timeoutMs = perTryTimeoutMs(registry, predictedMs, remaining);
        const attempt: Attempt = { extra: paid, sentAt: performance.now(), predictedMs, timer: undefined, timedOut: false };
        attempts.set(agentId, attempt);
        if (timeoutMs < remaining) {
          attempt.timer = setTimeout(() => {
            if (done || attempts.get(agentId) !== attempt) return;
            // Counted as a failure at once; the attempt keeps running and its late answer may still win.
            attempt.timedOut = true;
            onFailure(registry, agentId, model, Date.now(), { predictedMs, timeoutMs });
            emit({ model, agentId, ok: false, code: 'MESH_TIMEOUT', e2eMs: performance.now() - attempt.sentAt });
            logger.debug({ model, agentId, timeoutMs }, 'attempt timed out; retrying elsewhere');
            launch('retry');
          }, timeoutMs);
          attempt.timer.unref?.();
        }
        client.publish(topics.agentRequest(agentId, routerId), payload, { qos: 1 }, (err) => {
          if (err)
            request.onAnswer(agentId, undefined, new MeshError('MESH_NOT_CONNECTED', `publish failed: ${err.message}`, { cause: err }));
        });
        if (hedging && kind !== 'hedge' && !hedged) {
          const entry = registry.agents.get(agentId)?.models.get(model);
          const delay = entry ? hedgeDelayMs(entry, predictedMs) : Number.POSITIVE_INFINITY;
          clearTimeout(hedgeTimer);
          if (delay < deadline - Date.now()) {
            hedgeTimer = setTimeout(() => {
              if (done || !attempts.has(agentId)) return;
              if (fleetUtilization(registry, Date.now()) > hedgeMaxUtilization) {
                counters.budgetRefused++;
                return;
              }
              if (launch('hedge')) logger.debug({ model, slow: agentId, afterMs: delay }, 'hedged a slow attempt');
            }, delay);
          }
        }
        return true;
      };

      const request: InFlight = {
        model,
        attempts,
        onAnswer: (agentId, reply, err) => {
          if (done) return;
          const attempt = settle(agentId);
          if (!attempt) return;
          const now = Date.now();
          const e2eMs = performance.now() - attempt.sentAt;
          if (reply) {
            let outputs: Record<string, Tensor>;
            try {
              outputs = decodeTensorMap(reply.outputs);
            } catch (decodeErr) {
              attempts.set(agentId, attempt);
              request.onAnswer(agentId, undefined, decodeErr as MeshError);
              return;
            }
            if (attempt.timedOut) {
              // Its failure was counted already; still learn the service time it reported.
              const a = registry.agents.get(agentId);
              if (a) a.outstanding++;
            }
            onReply(
              registry,
              agentId,
              model,
              { queueMs: reply.queueMs, execMs: reply.execMs, e2eMs, predictedMs: attempt.predictedMs, bytes: payload.byteLength },
              now,
            );
            emit({ model, agentId, ok: true, e2eMs });
            finish(undefined, {
              requestId: key,
              model,
              agentId,
              outputs,
              tried: [...tried],
              attempts: tried.length,
              hedged,
              timings: {
                totalMs: performance.now() - started,
                queueMs: reply.queueMs,
                execMs: reply.execMs,
                predictedMs: attempt.predictedMs,
              },
            });
            return;
          }
          const error = err!;
          lastError = error;
          if (!attempt.timedOut) {
            onFailure(registry, agentId, model, now, { lost: error.code === 'MESH_AGENT_LOST' });
            emit({ model, agentId, ok: false, code: error.code, e2eMs });
          } else if (error.code === 'MESH_AGENT_LOST') {
            const a = registry.agents.get(agentId);
            if (a) markDown(a, now);
          }
          if (!RETRY_ELSEWHERE.has(error.code)) return finish(error);
          logger.debug({ model, agentId, code: error.code }, 'attempt failed; trying another agent');
          const next = extraAttemptAfter(error.code);
          if (!launch(next) && attempts.size === 0) failNow();
        },
      };
      pending.set(key, request);
      const deadlineTimer = setTimeout(failNow, Math.max(0, deadline - Date.now()));
      if (!launch('first')) failNow();
    });
  };

  let http: RouterHttpHandle | undefined;
  const handle: RouterHandle = {
    id: routerId,
    registry,
    counters,
    route: (model, routeOptions) => route(model, routeOptions),
    infer,
    agents: () =>
      [...statuses].map(([id, status]) => ({ id, up: status.state === 'online' && (registry.agents.get(id)?.up ?? false), status })),
    models: () => {
      const byName = new Map<string, ModelInfo>();
      for (const s of statuses.values()) {
        if (s.state !== 'online' || !registry.agents.get(s.agent)?.up) continue;
        for (const m of s.models ?? []) if (!byName.has(m.name)) byName.set(m.name, m);
      }
      return [...byName.values()];
    },
    async waitForModel(model, timeoutMs = 10_000, count = 1) {
      const until = Date.now() + timeoutMs;
      const live = () =>
        [...statuses.values()].filter(
          (s) => s.state === 'online' && registry.agents.get(s.agent)?.up && s.models?.some((m) => m.name === model),
        ).length;
      while (live() < count) {
        if (Date.now() >= until) throw new MeshError('MESH_NO_AGENT', `no live agent serves model ${model} after ${timeoutMs} ms`);
        await changes.wait(Math.min(100, until - Date.now()));
      }
    },
    onAttempt(listener) {
      listeners.add(listener);
      return () => listeners.delete(listener);
    },
    get connected() {
      return connected;
    },
    get http() {
      return http;
    },
    async close() {
      await http?.close();
      clearInterval(outlierTimer);
      closing = true;
      for (const request of [...pending.values()]) {
        for (const agentId of [...request.attempts.keys()])
          request.onAnswer(agentId, undefined, new MeshError('MESH_NOT_CONNECTED', 'router closed'));
      }
      await connection.close();
    },
  };
  if (options.http) {
    try {
      // Loaded on demand: a router without the HTTP API never loads fastify.
      const { startRouterHttp } = await import('./http.ts');
      http = await startRouterHttp(handle, options.http);
    } catch (err) {
      await handle.close();
      throw err;
    }
  }
  return handle;
}
