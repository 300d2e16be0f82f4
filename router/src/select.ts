/**
 * Selection (docs/routing.md, "How the router decides"): expected completion time per candidate, d candidates (default 4)
 * sampled in proportion to capacity from a nearby pool plus an exploration slot, the lower score wins; refusal
 * at once when nothing can make the deadline. Pure: time and randomness are arguments. The only state it
 * touches is the pool cache, rebuilt when the model's membership or health changes and every poolRefreshMs.
 */
import { hedgeAfterMs, perTryTimeoutMs as perTryRule } from '@edge-mesh/client';
import type { MeshErrorCode } from '@edge-mesh/protocol';
import {
  type AgentEntry,
  coldLoadMsOf,
  isAlive,
  isEjected,
  isOnProbation,
  kappaAt,
  type ModelEntry,
  type ModelPool,
  type PoolCache,
  p95E2eMs,
  pFailAt,
  priorRttMs,
  type Registry,
  type Rng,
  serviceMsAt,
  slowStartFactor,
} from './estimates.ts';
import { isCoordKnown, type VivaldiCoord, vivaldiDistanceMs } from './vivaldi.ts';

export interface RouteRequest {
  model: string;
  /** Request payload, bytes. */
  bytesUp?: number;
  /** Expected reply payload, bytes. */
  bytesDown?: number;
  /** Absolute deadline on the same clock as nowMs; none = no refusal. */
  deadlineMs?: number;
  /** Where the requester sits when it is not the router itself (the SDK's lease mode). */
  clientSite?: string;
  clientCoord?: VivaldiCoord;
  /** Agents not to use (previous attempts: retries and hedges go to a different node). */
  exclude?: ReadonlySet<string>;
  /** Hedges go to warm nodes only. */
  warmOnly?: boolean;
}

export type Selection =
  | {
      ok: true;
      agentId: string;
      entry: ModelEntry;
      /** κ-calibrated ECT of the chosen node, ms: the base for the per-try timeout, the hedge delay and κ. */
      predictedMs: number;
      /** The chosen node came from the exploration slot. */
      explored: boolean;
    }
  | { ok: false; code: Extract<MeshErrorCode, 'MESH_NO_AGENT' | 'MESH_DEADLINE_EXCEEDED'>; message: string; bestMs?: number };

const EMPTY_REQUEST: RouteRequest = { model: '' };

/** RTT from the requester to the agent: measured where known, else Vivaldi, else site labels, else a default. */
export function networkRttMs(agent: AgentEntry, request: RouteRequest = EMPTY_REQUEST): number {
  const c = agent.registry.config;
  const remoteClient = request.clientCoord !== undefined || (request.clientSite !== undefined && request.clientSite !== c.site);
  if (remoteClient) {
    if (request.clientCoord && isCoordKnown(agent.coord)) return vivaldiDistanceMs(request.clientCoord, agent.coord);
    if (request.clientSite !== undefined && agent.site !== undefined)
      return request.clientSite === agent.site ? c.sameSiteRttMs : c.crossSiteRttMs;
    return c.defaultRttMs;
  }
  if (!Number.isNaN(agent.rttMs)) return agent.rttMs;
  return priorRttMs(agent);
}

function coldMs(entry: ModelEntry, nowMs: number): number {
  if (entry.warm) return 0;
  // A model already being loaded there costs only the rest of its load time (its ETA), not a whole cold load.
  if (entry.loadingUntilMs > 0) return Math.max(0, entry.loadingUntilMs - nowMs);
  return coldLoadMsOf(entry);
}

/**
 * ECT = κ · (T_net + T_wait + S + T_cold), ms, where T_net = RTT + bytes / rate, ahead = q + W · os and
 * T_wait = max(0, work ahead + S − c · S) / c with work ahead = q · S + W · os · S, or the agent's own
 * per-model Σ (queued + in flight) × S_model in place of q · S when its load report or reply gives it: that is
 * S · max(0, ahead + 1 − c) / c when one model is served (shortest expected delay; × ((ahead + 1)/c)^(b − 1) when b > 1).
 *
 * The agent's part of the queue (q) is its claim: once the router has its own latency history for the
 * node, the wait that claim adds is capped at the node's p99 attempt time, so an agent that says it is
 * busier than it is repels no more traffic than its measured latency does. A claim of less than the truth
 * shows up in the measured latency, and κ (observed ÷ predicted) prices it back in.
 */
export function expectedCompletionMs(entry: ModelEntry, request: RouteRequest, nowMs: number): number {
  const agent = entry.agent;
  const c = agent.registry.config;
  const bytes = (request.bytesUp ?? 0) + (request.bytesDown ?? 0);
  const netMs = networkRttMs(agent, request) + bytes / agent.bytesPerMs;
  const serviceMs = serviceMsAt(entry, nowMs);
  const slots = entry.slots ?? agent.slots;
  const ahead = agent.reportedRif + c.routers * agent.outstanding;
  // Work ahead in ms: the agent's per-model breakdown when it sent one, else the count × this model's S.
  let claimedMs = Number.isNaN(agent.reportedWorkMs) ? agent.reportedRif * serviceMs : agent.reportedWorkMs;
  const p99 = entry.latency.p99();
  if (p99 > 0) claimedMs = Math.min(claimedMs, slots * p99);
  const aheadMs = claimedMs + c.routers * agent.outstanding * serviceMs;
  let waitMs = Math.max(0, aheadMs + serviceMs - slots * serviceMs) / slots;
  if (c.queueExponent !== 1) waitMs *= ((ahead + 1) / slots) ** (c.queueExponent - 1);
  return kappaAt(agent, nowMs) * (netMs + waitMs + serviceMs + coldMs(entry, nowMs));
}

/** Unloaded ECT₀ = T_net + S + T_cold: the proximity order the pool is cut from. */
function unloadedEctMs(entry: ModelEntry, request: RouteRequest, nowMs: number): number {
  const agent = entry.agent;
  return networkRttMs(agent, request) + (request.bytesUp ?? 0) / agent.bytesPerMs + serviceMsAt(entry, nowMs) + coldMs(entry, nowMs);
}

/**
 * Per-try timeout (client/src/quantiles.ts): with the node's own latency history for the model,
 * max(1.5 × its p99, 2 × predicted), no less than 50 ms and no more than the rule without one,
 * clamp(5 × predicted, 250 ms, …); never past the remaining deadline.
 */
export function perTryTimeoutMs(
  registry: Registry,
  predictedMs: number,
  remainingMs = Number.POSITIVE_INFINITY,
  entry?: ModelEntry,
): number {
  const c = registry.config;
  return perTryRule(predictedMs, remainingMs, {
    factor: c.perTryTimeoutFactor,
    minMs: c.minPerTryTimeoutMs,
    quantileFactor: c.perTryQuantileFactor,
    floorMs: c.minQuantileTimeoutMs,
    ...(entry ? { p99Ms: entry.latency.p99() } : {}),
  });
}

/** Hedge delay = max(p95 of the node's own attempts for the model, else of its (class, model), 2 × predicted). */
export function hedgeDelayMs(entry: ModelEntry, predictedMs: number): number {
  return hedgeAfterMs(predictedMs, entry.latency.p95(), p95E2eMs(entry.stats));
}

/**
 * Fleet utilisation: requests in flight over worker slots, across live agents, from what the agents
 * report (on every reply, and in their load reports), or this router's own outstanding count where no
 * report is fresh. The router's own count runs from send to reply, so it also counts requests on the
 * wire: on a busy fleet it read about 2 where the agents reported 0.6, and kept hedging off. Each agent
 * counts for at most its slots busy and at most `maxUtilizationSlots` slots, so one agent's claim moves
 * the figure by no more than its share of the fleet. Above ~0.8 a hedge mostly adds queueing.
 */
export function fleetUtilization(reg: Registry, nowMs: number): number {
  const c = reg.config;
  let busy = 0;
  let slots = 0;
  for (const agent of reg.agents.values()) {
    if (!agent.up || isEjected(agent, nowMs)) continue;
    const agentSlots = Math.min(c.maxUtilizationSlots, Math.max(1, agent.slots));
    const fresh = nowMs - agent.reportedAtMs <= c.claimStaleMs;
    const held = fresh ? agent.reportedRif : agent.outstanding;
    busy += agentSlots * Math.min(1, held / Math.max(1, agent.slots));
    slots += agentSlots;
  }
  return slots === 0 ? 1 : busy / slots;
}

/**
 * Score = ECT_f = (1 − p_fail) · ECT + p_fail · (T_detect + ECT_alt): a node that fails fast never looks fast.
 */
export function failureAwareScoreMs(entry: ModelEntry, ectMs: number, altMs: number, remainingMs: number, nowMs: number): number {
  const p = pFailAt(entry.agent, nowMs);
  if (p <= 0) return ectMs;
  return (1 - p) * ectMs + p * (perTryTimeoutMs(entry.agent.registry, ectMs, remainingMs, entry) + altMs);
}

function isEligible(agent: AgentEntry, nowMs: number): boolean {
  return isAlive(agent, nowMs) && !isEjected(agent, nowMs) && !isOnProbation(agent, nowMs);
}

/** Sampling weight: capacity c / S, scaled down during slow start. */
function capacityWeight(entry: ModelEntry, nowMs: number): number {
  const slots = entry.slots ?? entry.agent.slots;
  return (slots / Math.max(0.001, serviceMsAt(entry, nowMs))) * slowStartFactor(entry.agent, nowMs);
}

function newCache(): PoolCache {
  return {
    builtVersion: -1,
    builtAtMs: Number.NEGATIVE_INFINITY,
    pool: [],
    cumulativeWeight: new Float64Array(0),
    totalWeight: 0,
    inPool: new Set(),
    minEct0Ms: Number.POSITIVE_INFINITY,
    medianEct0Ms: Number.POSITIVE_INFINITY,
    eligibleCount: 0,
    panic: false,
  };
}

/**
 * Rebuilds the pool: eligible entries in ECT₀ order, at least K of them, grown further while the pool lacks
 * free slots (free = Σ max(0, c − ahead) < max(d, 25 % of Σ c)), so a busy near pool spills over to farther or
 * slower capacity instead of queueing. Panic mode (eligible < 50 % of live) ignores ejection and probation.
 */
function buildPool(reg: Registry, p: ModelPool, cache: PoolCache, request: RouteRequest, nowMs: number): void {
  const c = reg.config;
  let candidates: ModelEntry[] = [];
  let alive = 0;
  for (const e of p.entries) {
    if (!isAlive(e.agent, nowMs)) continue;
    alive++;
    if (!isEjected(e.agent, nowMs) && !isOnProbation(e.agent, nowMs)) candidates.push(e);
  }
  cache.eligibleCount = candidates.length;
  cache.panic = alive > 0 && candidates.length < c.panicThreshold * alive;
  if (cache.panic) candidates = p.entries.filter((e) => isAlive(e.agent, nowMs));

  const n = candidates.length;
  const ect0 = new Float64Array(n);
  for (let i = 0; i < n; i++) ect0[i] = unloadedEctMs(candidates[i]!, request, nowMs);
  const order = Array.from({ length: n }, (_, i) => i).sort((a, b) => ect0[a]! - ect0[b]!);

  const pool: ModelEntry[] = [];
  const poolEct0: number[] = [];
  let slotsTotal = 0;
  let slotsFree = 0;
  for (const i of order) {
    const e = candidates[i]!;
    const slots = e.slots ?? e.agent.slots;
    pool.push(e);
    poolEct0.push(ect0[i]!);
    slotsTotal += slots;
    slotsFree += Math.max(0, slots - (e.agent.reportedRif + c.routers * e.agent.outstanding));
    if (pool.length >= c.poolSize && slotsFree >= Math.max(c.choices, 0.25 * slotsTotal)) break;
  }
  const cumulative = new Float64Array(pool.length);
  let total = 0;
  for (let i = 0; i < pool.length; i++) {
    total += capacityWeight(pool[i]!, nowMs);
    cumulative[i] = total;
  }
  cache.pool = pool;
  cache.cumulativeWeight = cumulative;
  cache.totalWeight = total;
  cache.inPool = new Set(pool);
  cache.minEct0Ms = poolEct0.length ? poolEct0[0]! : Number.POSITIVE_INFINITY;
  cache.medianEct0Ms = poolEct0.length ? poolEct0[poolEct0.length >> 1]! : Number.POSITIVE_INFINITY;
  cache.builtVersion = p.version;
  cache.builtAtMs = nowMs;
}

function poolKey(reg: Registry, request: RouteRequest): string {
  return request.clientSite !== undefined && request.clientSite !== reg.config.site ? request.clientSite : '';
}

/** The current pool for a request (rebuilding it if stale); exposed for tests, the simulator and stats. */
export function currentPool(reg: Registry, request: RouteRequest, nowMs: number): PoolCache | undefined {
  const p = reg.pools.get(request.model);
  if (!p || p.entries.length === 0) return undefined;
  const key = poolKey(reg, request);
  let cache = p.caches.get(key);
  if (!cache) {
    cache = newCache();
    p.caches.set(key, cache);
  }
  if (cache.builtVersion !== p.version || nowMs - cache.builtAtMs >= reg.config.poolRefreshMs || nowMs < cache.builtAtMs) {
    buildPool(
      reg,
      p,
      cache,
      poolKey(reg, request) === '' ? EMPTY_REQUEST : { model: request.model, clientSite: request.clientSite },
      nowMs,
    );
  }
  return cache;
}

/** Index of the first cumulative weight above u (binary search). */
function weightedIndex(cumulative: Float64Array, u: number): number {
  let lo = 0;
  let hi = cumulative.length - 1;
  while (lo < hi) {
    const mid = (lo + hi) >> 1;
    if (cumulative[mid]! > u) hi = mid;
    else lo = mid + 1;
  }
  return lo;
}

/** Draws `first` ∝ weight, then a distinct second ∝ weight among the rest (exact, no rejection loop). */
function samplePair(cache: PoolCache, rng: Rng): [number, number] {
  const cum = cache.cumulativeWeight;
  const first = weightedIndex(cum, rng() * cache.totalWeight);
  if (cum.length < 2) return [first, -1];
  const before = first === 0 ? 0 : cum[first - 1]!;
  const w1 = cum[first]! - before;
  let u = rng() * (cache.totalWeight - w1);
  if (u >= before) u += w1;
  let second = weightedIndex(cum, u);
  if (second === first) second = first + 1 < cum.length ? first + 1 : first - 1;
  return [first, second];
}

function usable(entry: ModelEntry, request: RouteRequest, nowMs: number, panic: boolean): boolean {
  const a = entry.agent;
  if (!isAlive(a, nowMs)) return false;
  if (!panic && isEjected(a, nowMs)) return false;
  if (request.exclude?.has(a.agentId)) return false;
  if (request.warmOnly && !entry.warm && !(entry.loadingUntilMs > 0)) return false;
  return true;
}

/**
 * Whether some usable agent could finish the request in time with an empty queue (network, transfer,
 * service, cold load). The queue wait in the ECT is an estimate, and the agent runs the earliest deadline
 * among its queue heads first (edge-agent/src/scheduler.ts), so other models' work queued there need not
 * come before this request: the router refuses up front only what no agent could finish at all.
 */
function anyCouldFinish(pool: readonly ModelEntry[], request: RouteRequest, nowMs: number, panic: boolean, remainingMs: number): boolean {
  for (const e of pool) if (usable(e, request, nowMs, panic) && unloadedEctMs(e, request, nowMs) <= remainingMs) return true;
  return false;
}

export interface SelectOptions {
  /** d: candidates compared; default the registry's `choices` (2). Values > 2 add further weighted draws. */
  choices?: number;
  /** Turn capacity weighting off (uniform sampling over the pool): an ablation for the simulator. */
  uniform?: boolean;
}

/**
 * Picks the agent for one attempt. Candidates: d (default 4) sampled ∝ capacity from the nearby pool, plus with
 * probability ε one random eligible node outside it; the lowest failure-aware ECT wins. If the winner cannot
 * make the deadline the whole pool is scanned for a better one, and if no agent in it could make it even
 * with an empty queue, the request is refused at once with MESH_DEADLINE_EXCEEDED. Does not count the send: call onSend when the attempt goes out.
 */
export function selectAgent(registry: Registry, request: RouteRequest, nowMs: number, rng: Rng, options: SelectOptions = {}): Selection {
  const c = registry.config;
  const cache = currentPool(registry, request, nowMs);
  if (!cache || cache.pool.length === 0) {
    return { ok: false, code: 'MESH_NO_AGENT', message: `no live agent serves model ${request.model}` };
  }
  const remainingMs = request.deadlineMs === undefined ? Number.POSITIVE_INFINITY : request.deadlineMs - nowMs;
  const altMs = cache.medianEct0Ms;
  const pool = cache.pool;

  let best: ModelEntry | undefined;
  let bestScore = Number.POSITIVE_INFINITY;
  let bestEct = Number.POSITIVE_INFINITY;
  let explored = false;
  const consider = (e: ModelEntry, fromExploration: boolean) => {
    if (!usable(e, request, nowMs, cache.panic)) return;
    const ect = expectedCompletionMs(e, request, nowMs);
    const score = failureAwareScoreMs(e, ect, altMs, remainingMs, nowMs);
    if (score < bestScore) {
      best = e;
      bestScore = score;
      bestEct = ect;
      explored = fromExploration;
    }
  };

  const d = options.choices ?? c.choices;
  if (options.uniform) {
    const i = Math.floor(rng() * pool.length);
    consider(pool[i]!, false);
    if (pool.length > 1) consider(pool[(i + 1 + Math.floor(rng() * (pool.length - 1))) % pool.length]!, false);
  } else {
    const [i, j] = samplePair(cache, rng);
    consider(pool[i]!, false);
    if (j >= 0) consider(pool[j]!, false);
  }
  for (let k = 2; k < d && k < pool.length; k++) {
    const i = options.uniform ? Math.floor(rng() * pool.length) : weightedIndex(cache.cumulativeWeight, rng() * cache.totalWeight);
    consider(pool[i]!, false);
  }

  if (c.exploreRate > 0 && rng() < c.exploreRate) {
    const entries = registry.pools.get(request.model)!.entries;
    // A few tries suffice: when almost every node is in the pool there is little to explore.
    for (let t = 0; t < 4; t++) {
      const e = entries[Math.floor(rng() * entries.length)]!;
      if (cache.inPool.has(e)) continue;
      if (!cache.panic && isOnProbation(e.agent, nowMs) === false && !isEligible(e.agent, nowMs)) continue;
      consider(e, true);
      break;
    }
  }

  if (best === undefined || bestEct > remainingMs) {
    // The sampled pair is unusable or too slow: the best of the whole pool decides between a pick and a refusal.
    for (const e of pool) consider(e, false);
  }
  if (best === undefined && (request.exclude || request.warmOnly)) {
    for (const e of registry.pools.get(request.model)!.entries) consider(e, false);
  }
  if (best === undefined) {
    return { ok: false, code: 'MESH_NO_AGENT', message: `no usable agent serves model ${request.model}` };
  }
  if (bestEct > remainingMs && !anyCouldFinish(pool, request, nowMs, cache.panic, remainingMs)) {
    return {
      ok: false,
      code: 'MESH_DEADLINE_EXCEEDED',
      message: `no agent can finish ${request.model} within ${Math.max(0, Math.round(remainingMs))} ms (best ${Math.round(bestEct)} ms)`,
      bestMs: bestEct,
    };
  }
  const chosen: ModelEntry = best;
  return { ok: true, agentId: chosen.agent.agentId, entry: chosen, predictedMs: bestEct, explored };
}
