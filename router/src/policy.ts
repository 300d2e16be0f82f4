/**
 * The router's policy for the request engine (docs/routing.md): which agent for each attempt, its
 * per-try timeout and hedge delay, all from the registry's estimates; and what each attempt teaches the
 * registry. The live router and the simulator's `ours` run this very object, so what the benchmark
 * measures is what the router does.
 */
import type { Attempt, AttemptEnd, EnginePolicy, EngineRequest } from '@edge-mesh/client';
import { type InferReply, MeshError } from '@edge-mesh/protocol';
import { evaluateOutliers, markDown, onCancel, onFailure, onQueueClaim, onReply, onSend, type Registry } from './estimates.ts';
import { fleetUtilization, hedgeDelayMs, perTryTimeoutMs, type RouteRequest, type SelectOptions, selectAgent } from './select.ts';
import { createWarmer, type WarmingOptions } from './warming.ts';

/** What the router's engine carries for one forwarded request. */
export interface RouterAsk {
  model: string;
  /** Request payload size, bytes. */
  bytesUp: number;
  /** Expected reply size, bytes, when known. */
  bytesDown?: number;
  /** Where the requester sits, when it is not the router itself (the simulator's clients, leases). */
  clientSite?: string;
  clientCoord?: RouteRequest['clientCoord'];
  /** Agents never to send this request to (a pipeline stage whose answer from them was refused). */
  excluded?: ReadonlySet<string>;
}

/**
 * The part of an agent's answer the registry learns from: the fields of the `res` message
 * (docs/protocol.md), which the simulator's agents fill the same way. All of it is the agent's claim,
 * bounded by the registry (client/src/claims.ts).
 */
export interface ReplyTimes {
  queueMs: number;
  execMs: number;
  /** Cold-load time the request waited for. */
  loadMs?: number;
  /** The agent's requests in flight (queued + running) when it replied. */
  rif?: number;
  /** The same queue as work, ms. */
  workMs?: number;
}

/**
 * A per-try timer that fires this much later than it was due (or later than its own length) says the
 * router's process stalled, not that the agent was slow: the retry still goes out, but the agent is not
 * charged with a failure.
 */
const STALLED_TIMER_FRACTION = 0.5;

export interface RouterPolicyOptions {
  /** Hedge slow attempts on a different warm node (default true). */
  hedging?: boolean;
  /** No hedges while the fleet's utilisation is above this (default 0.8). */
  hedgeMaxUtilization?: number;
  /** How often the success-rate outlier sweep runs, ms of the policy's clock (default 1,000). */
  outlierIntervalMs?: number;
  /** The registry's random stream for the sampling (default the registry's own). */
  random?: () => number;
  /**
   * Warm cold agents ahead of demand (warming.ts): when most agents holding a model have no free slot,
   * one request also goes at once to the best cold agent, which loads the model. Default on; false turns it off.
   */
  warming?: boolean | WarmingOptions;
  /** Selection variants (the simulator's ablations: uniform sampling, more choices). */
  select?: SelectOptions;
  /** Called after every attempt that ended with an answer, an error or a per-try timeout (metrics). */
  onAttemptResult?: (record: { model: string; agentId: string; ok: boolean; code?: MeshError['code']; e2eMs: number }) => void;
  onEjected?: (agentIds: string[]) => void;
}

export interface RouterPolicy<Rep extends ReplyTimes> extends EnginePolicy<RouterAsk, Rep> {
  readonly registry: Registry;
  /** Attempts sent per agent id. */
  readonly sentTo: Record<string, number>;
}

export function createRouterPolicy<Rep extends ReplyTimes = InferReply>(
  registry: Registry,
  options: RouterPolicyOptions = {},
): RouterPolicy<Rep> {
  const { hedging = true, hedgeMaxUtilization = 0.8, outlierIntervalMs = 1_000, onAttemptResult } = options;
  const random = options.random ?? registry.rng;
  const sentTo: Record<string, number> = {};
  let lastSweep = Number.NEGATIVE_INFINITY;
  const warmer = options.warming === false ? undefined : createWarmer(registry, options.warming === true ? {} : options.warming, random);
  /** Requests whose backup copy goes at once to a cold agent, to make it load the model. */
  const warmingFor = new WeakMap<EngineRequest<RouterAsk>, string>();

  const sweep = (now: number) => {
    if (now - lastSweep < outlierIntervalMs) return;
    lastSweep = now;
    const ejected = evaluateOutliers(registry, now);
    if (ejected.length > 0) options.onEjected?.(ejected);
  };

  const timeoutOf = (attempt: Attempt<RouterAsk>) => attempt.plan.timeoutMs ?? perTryTimeoutMs(registry, attempt.plan.predictedMs ?? 0);
  /** Attempts whose per-try timeout was charged to their agent as a failure. */
  const charged = new WeakSet<Attempt<RouterAsk>>();

  return {
    registry,
    sentTo,
    pick(request: EngineRequest<RouterAsk>, tried, kind, now) {
      sweep(now);
      const ask = request.data;
      const avoid = ask.excluded ? new Set([...tried, ...ask.excluded]) : tried;
      const warming = kind === 'hedge' ? warmingFor.get(request) : undefined;
      if (warming !== undefined) {
        warmingFor.delete(request);
        // The warming copy waits for the load: no per-try timeout (a load is not a failure), no hedge.
        return avoid.has(warming) ? undefined : { agentId: warming };
      }
      const selection = selectAgent(
        registry,
        {
          model: ask.model,
          bytesUp: ask.bytesUp,
          ...(ask.bytesDown !== undefined ? { bytesDown: ask.bytesDown } : {}),
          deadlineMs: request.deadlineAt,
          ...(ask.clientSite !== undefined ? { clientSite: ask.clientSite } : {}),
          ...(ask.clientCoord !== undefined ? { clientCoord: ask.clientCoord } : {}),
          ...(avoid.size > 0 ? { exclude: avoid } : {}),
          warmOnly: kind === 'hedge',
        },
        now,
        random,
        options.select,
      );
      if (!selection.ok) throw new MeshError(selection.code, selection.message, { details: { model: ask.model } });
      // selectAgent falls back to excluded nodes when nothing else is left; the engine never sends twice to one.
      if (avoid.has(selection.agentId)) return undefined;
      const remaining = request.deadlineAt - now;
      const cold = kind === 'first' ? warmer?.target(ask.model, now) : undefined;
      if (cold && cold.agent.agentId !== selection.agentId) warmingFor.set(request, cold.agent.agentId);
      return {
        agentId: selection.agentId,
        predictedMs: selection.predictedMs,
        timeoutMs: perTryTimeoutMs(registry, selection.predictedMs, remaining, selection.entry),
        ...(warmingFor.has(request)
          ? { hedgeAfterMs: 0 }
          : hedging
            ? { hedgeAfterMs: hedgeDelayMs(selection.entry, selection.predictedMs) }
            : {}),
      };
    },
    mayHedge: (request, now) => warmingFor.has(request) || fleetUtilization(registry, now) <= hedgeMaxUtilization,
    onSend(attempt, now) {
      sentTo[attempt.agentId] = (sentTo[attempt.agentId] ?? 0) + 1;
      onSend(registry, attempt.agentId, attempt.request.data.model, now);
    },
    onTimeout(attempt, now) {
      const timeoutMs = timeoutOf(attempt);
      if (now - attempt.sentAt - timeoutMs > STALLED_TIMER_FRACTION * timeoutMs) return;
      charged.add(attempt);
      // Counted as a failure at once: an attempt this late costs as much as one that failed.
      onFailure(registry, attempt.agentId, attempt.request.data.model, now, {
        predictedMs: attempt.plan.predictedMs ?? 0,
        timeoutMs,
        load: true,
      });
      onAttemptResult?.({
        model: attempt.request.data.model,
        agentId: attempt.agentId,
        ok: false,
        code: 'MESH_TIMEOUT',
        e2eMs: now - attempt.sentAt,
      });
    },
    onAttemptEnd(attempt, end: AttemptEnd<Rep>, now) {
      const { agentId } = attempt;
      const { model, bytesUp } = attempt.request.data;
      const e2eMs = now - attempt.sentAt;
      if (end.kind === 'reply') {
        // A timed-out attempt was counted as failed already (which ended it as outstanding); its answer still teaches.
        if (charged.has(attempt)) {
          const agent = registry.agents.get(agentId);
          if (agent) agent.outstanding++;
        }
        const r = end.reply;
        onReply(
          registry,
          agentId,
          model,
          {
            queueMs: r.queueMs,
            execMs: r.execMs,
            e2eMs,
            bytes: bytesUp + (attempt.request.data.bytesDown ?? 0),
            ...(attempt.plan.predictedMs !== undefined ? { predictedMs: attempt.plan.predictedMs } : {}),
            ...(r.loadMs !== undefined ? { loadMs: r.loadMs } : {}),
            ...(r.rif !== undefined ? { rif: r.rif } : {}),
            ...(r.workMs !== undefined ? { workMs: r.workMs } : {}),
          },
          now,
        );
        onAttemptResult?.({ model, agentId, ok: true, e2eMs });
      } else if (end.kind === 'error') {
        const lost = end.error.code === 'MESH_AGENT_LOST';
        const claim = end.error.details;
        if (typeof claim?.rif === 'number') {
          onQueueClaim(registry, agentId, claim.rif, typeof claim.workMs === 'number' ? claim.workMs : undefined, now);
        }
        if (!charged.has(attempt)) {
          // An error costs what a timeout would have: a node that fails fast must not look fast.
          onFailure(registry, agentId, model, now, {
            lost,
            load: end.error.code === 'MESH_BUSY' || end.error.code === 'MESH_OVERLOADED',
            predictedMs: attempt.plan.predictedMs ?? 0,
            timeoutMs: timeoutOf(attempt),
          });
          onAttemptResult?.({ model, agentId, ok: false, code: end.error.code, e2eMs });
        } else if (lost) {
          const agent = registry.agents.get(agentId);
          if (agent) markDown(agent, now);
        }
      } else if (!charged.has(attempt)) onCancel(registry, agentId, now);
    },
  };
}
