/**
 * Route leases for SDK clients (docs/routing.md, "Two ways in"): a client asks which agents to use for a
 * model, and the router answers with a few distinct agents, best first, each with the numbers the
 * client's request engine needs (prediction, service time, per-try timeout, hedge delay). Pure: the
 * caller passes the registry and the time, and publishes the answer.
 */
import { type Lease, type LeaseAgent, MeshError, PROTOCOL_VERSION, type RouteRequest as RouteQuestion } from '@edge-mesh/protocol';
import { type Registry, serviceMsAt } from './estimates.ts';
import { hedgeDelayMs, perTryTimeoutMs, selectAgent } from './select.ts';

export interface LeaseOptions {
  /** Agents per lease (default 3). */
  agents?: number;
  /** How long the client may use the lease, ms (default 500). */
  ttlMs?: number;
}

/** Up to `agents` distinct agents for `model`, best first; throws the selection's MeshError when there is none. */
export function leaseAgents(
  registry: Registry,
  question: Pick<RouteQuestion, 'model' | 'budgetMs' | 'bytes' | 'exclude'>,
  nowMs: number,
  count = 3,
): LeaseAgent[] {
  const out: LeaseAgent[] = [];
  const skip = new Set(question.exclude ?? []);
  while (out.length < count) {
    const selection = selectAgent(
      registry,
      {
        model: question.model,
        ...(question.budgetMs !== undefined ? { deadlineMs: nowMs + question.budgetMs } : {}),
        ...(question.bytes !== undefined ? { bytesUp: question.bytes } : {}),
        exclude: skip,
      },
      nowMs,
      registry.rng,
    );
    if (!selection.ok) {
      if (out.length === 0) throw new MeshError(selection.code, selection.message, { details: { model: question.model } });
      break;
    }
    // selectAgent falls back to excluded nodes when nothing else is left: the lease is complete.
    if (skip.has(selection.agentId)) break;
    skip.add(selection.agentId);
    const entry = registry.agents.get(selection.agentId)?.models.get(question.model);
    out.push({
      agent: selection.agentId,
      predictedMs: selection.predictedMs,
      serviceMs: entry ? serviceMsAt(entry, nowMs) : selection.predictedMs,
      timeoutMs: perTryTimeoutMs(registry, selection.predictedMs, question.budgetMs, entry),
      hedgeAfterMs: entry ? hedgeDelayMs(entry, selection.predictedMs) : Number.MAX_SAFE_INTEGER,
    });
  }
  return out;
}

/** The router's answer to a route question: a lease, or an empty lease that carries the coded reason. */
export function answerRoute(
  registry: Registry,
  routerId: string,
  question: RouteQuestion,
  nowMs: number,
  options: LeaseOptions = {},
): Lease {
  const { agents = 3, ttlMs = 500 } = options;
  const lease = { v: PROTOCOL_VERSION, kind: 'lease', id: question.id, router: routerId, model: question.model } as const;
  try {
    return { ...lease, agents: leaseAgents(registry, question, nowMs, agents), ttlMs };
  } catch (err) {
    const e = err instanceof MeshError ? err : new MeshError('MESH_INTERNAL', (err as Error).message, { cause: err });
    return { ...lease, agents: [], ttlMs: 0, code: e.code, message: e.message.slice(0, 1024) };
  }
}
