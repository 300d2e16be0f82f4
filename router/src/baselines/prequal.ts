/**
 * `prequal` and `prequal-weighted`: Prequal as the paper describes it (Wydrowski, Kleinberg, Rumble,
 * Vahdat, "Load is not what you should balance: Introducing Prequal", NSDI 2024, §3–4), per model.
 *
 * - Asynchronous probes: each query sends `probesPerQuery` (3) probes to distinct replicas drawn at
 *   random; a probe's answer (the replica's requests in flight and its own latency estimate for a
 *   query arriving now) enters a pool of at most `poolSize` (16), replacing an older answer from the
 *   same replica, the oldest leaving a full pool. Answers older than `maxAgeMs` are dropped.
 * - Hot-cold lexicographic selection: a replica is hot when its RIF is above the Q_RIF quantile (0.84)
 *   of the RIFs in the pool; among cold replicas the lowest latency estimate wins, and when every
 *   replica is hot the lowest RIF does. The chosen answer's RIF goes up by one (it now carries this query).
 * - Reuse budget: an answer serves at most b_reuse queries, with
 *   b_reuse = max(1, (1 + δ) ÷ ((1 − m/n) · r_probe − r_remove)), m the pool size, n the replicas,
 *   δ = 0.5: probe supply covers demand (our reading of the paper's rule).
 * - Remove-worst: after each query, `removePerQuery` (1) answers leave the pool, the worst first (the
 *   hottest while any is hot, else the highest latency).
 * - With an empty pool, a random replica.
 *
 * The weighted variant draws probe targets in proportion to announced capacity (workers ÷ latency) and
 * compares RIF per worker, so a four-worker node is not hot at RIF 2.
 *
 * The mesh's protocol carries no probe message: this baseline needs a probe channel (`probe`), which the
 * simulator supplies with a network round trip per probe. It retries nothing (the paper names no retry
 * rule); lost work moves on as the engine does it for every policy.
 */
import type { AttemptBudget, EngineRequest } from '@edge-mesh/client';
import type { RouterAsk } from '../policy.ts';
import { type BaselinePolicy, type BaselineReply, type Endpoint, LOST, Membership, WeightedSampler } from './common.ts';

export interface ProbeAnswer {
  /** Requests in flight at the replica (queued and running, all models). */
  rif: number;
  /** The replica's estimate of the latency of this model's query arriving now, ms. */
  latencyMs: number;
}

export type ProbeChannel = (agentId: string, model: string, answer: (reply: ProbeAnswer, nowMs: number) => void) => void;

interface PoolEntry {
  endpoint: Endpoint;
  rif: number;
  latencyMs: number;
  atMs: number;
  uses: number;
}

export interface PrequalOptions {
  name?: string;
  random: () => number;
  probe: ProbeChannel;
  weighted?: boolean;
  probesPerQuery?: number;
  removePerQuery?: number;
  poolSize?: number;
  maxAgeMs?: number;
  qRif?: number;
  reuseSlack?: number;
}

/** b_reuse for a pool of m answers over n replicas at r_probe probes and r_remove removals per query. */
export function reuseBudget(poolSize: number, replicas: number, probesPerQuery: number, removePerQuery: number, slack = 0.5): number {
  const supply = (1 - Math.min(1, poolSize / Math.max(1, replicas))) * probesPerQuery - removePerQuery;
  if (supply <= 0) return poolSize;
  return Math.max(1, Math.min(poolSize, Math.ceil((1 + slack) / supply)));
}

/** Hot-cold lexicographic choice among pool entries (RIF optionally per worker). */
export function hotColdPick<T extends { rif: number; latencyMs: number }>(
  entries: readonly T[],
  qRif: number,
  rifOf: (e: T) => number,
): T | undefined {
  if (entries.length === 0) return undefined;
  const rifs = entries.map(rifOf).sort((a, b) => a - b);
  const threshold = rifs[Math.min(rifs.length - 1, Math.max(0, Math.ceil(qRif * rifs.length) - 1))]!;
  let best: T | undefined;
  for (const e of entries) if (rifOf(e) <= threshold && (best === undefined || e.latencyMs < best.latencyMs)) best = e;
  if (best) return best;
  for (const e of entries) if (best === undefined || rifOf(e) < rifOf(best)) best = e;
  return best;
}

export function createPrequalPolicy<Rep extends BaselineReply = BaselineReply>(options: PrequalOptions): BaselinePolicy<Rep> {
  const {
    random,
    probe,
    weighted = false,
    probesPerQuery = 3,
    removePerQuery = 1,
    poolSize = 16,
    maxAgeMs = 1_000,
    qRif = 0.84,
    reuseSlack = 0.5,
  } = options;
  const members = new Membership<Endpoint>((agentId, _model, info) => ({
    agentId,
    workers: info.workers,
    latencyMs: info.latencyMs,
    weight: info.workers / info.latencyMs,
  }));
  const pools = new Map<string, PoolEntry[]>();
  const samplers = new Map<string, WeightedSampler>();
  const rifOf = (e: PoolEntry) => (weighted ? e.rif / e.endpoint.workers : e.rif);
  const budget: AttemptBudget = { onRequest() {}, onRequestDone() {}, take: () => false, onExtraDone() {} };

  const poolOf = (model: string): PoolEntry[] => {
    let p = pools.get(model);
    if (!p) {
      p = [];
      pools.set(model, p);
    }
    return p;
  };

  const sendProbes = (model: string, eps: readonly Endpoint[]) => {
    const n = Math.min(probesPerQuery, eps.length);
    const chosen = new Set<number>();
    let sampler: WeightedSampler | undefined;
    if (weighted) {
      sampler = samplers.get(model);
      if (!sampler) {
        sampler = new WeightedSampler();
        samplers.set(model, sampler);
      }
      if (sampler.builtVersion !== members.version)
        sampler.rebuild(
          eps.map((e) => e.weight),
          members.version,
        );
    }
    for (let t = 0; chosen.size < n && t < 8 * n; t++) chosen.add(sampler ? sampler.draw(random()) : Math.floor(random() * eps.length));
    for (const i of chosen) {
      const endpoint = eps[i]!;
      probe(endpoint.agentId, model, (reply, nowMs) => {
        if (members.get(model, endpoint.agentId) !== endpoint) return;
        const pool = poolOf(model);
        const same = pool.findIndex((e) => e.endpoint === endpoint);
        if (same >= 0) pool.splice(same, 1);
        pool.push({ endpoint, rif: reply.rif, latencyMs: reply.latencyMs, atMs: nowMs, uses: 0 });
        if (pool.length > poolSize) pool.shift();
      });
    }
  };

  const removeWorst = (pool: PoolEntry[]) => {
    if (pool.length === 0) return;
    const rifs = pool.map(rifOf).sort((a, b) => a - b);
    const threshold = rifs[Math.min(rifs.length - 1, Math.max(0, Math.ceil(qRif * rifs.length) - 1))]!;
    let worst = -1;
    for (let i = 0; i < pool.length; i++) {
      const e = pool[i]!;
      if (rifOf(e) <= threshold) continue;
      if (worst < 0 || rifOf(e) > rifOf(pool[worst]!)) worst = i;
    }
    if (worst < 0) for (let i = 0; i < pool.length; i++) if (worst < 0 || pool[i]!.latencyMs > pool[worst]!.latencyMs) worst = i;
    pool.splice(worst, 1);
  };

  let removeCredit = 0;

  return {
    name: options.name ?? (weighted ? 'prequal-weighted' : 'prequal'),
    maxAttempts: 3,
    budget,
    retryable: (code) => LOST.has(code),
    onStatus: (status) => {
      members.onStatus(status);
      if (status.state !== 'online')
        for (const pool of pools.values())
          for (let i = pool.length - 1; i >= 0; i--) if (pool[i]!.endpoint.agentId === status.agent) pool.splice(i, 1);
    },
    onLoad() {},
    pick(request: EngineRequest<RouterAsk>, tried, kind, nowMs) {
      const model = request.data.model;
      const eps = members.endpoints(model);
      if (eps.length === 0) return undefined;
      if (kind === 'first') sendProbes(model, eps);
      const pool = poolOf(model);
      for (let i = pool.length - 1; i >= 0; i--) {
        const e = pool[i]!;
        if (nowMs - e.atMs > maxAgeMs || members.get(model, e.endpoint.agentId) !== e.endpoint) pool.splice(i, 1);
      }
      const usable = tried.size === 0 ? pool : pool.filter((e) => !tried.has(e.endpoint.agentId));
      const chosen = hotColdPick(usable, qRif, rifOf);
      let agentId: string;
      if (chosen) {
        agentId = chosen.endpoint.agentId;
        chosen.rif++;
        chosen.uses++;
        if (chosen.uses >= reuseBudget(poolSize, eps.length, probesPerQuery, removePerQuery, reuseSlack))
          pool.splice(pool.indexOf(chosen), 1);
      } else {
        const rest = tried.size === 0 ? eps : eps.filter((e) => !tried.has(e.agentId));
        if (rest.length === 0) return undefined;
        agentId = rest[Math.floor(random() * rest.length)]!.agentId;
      }
      if (kind === 'first') {
        removeCredit += removePerQuery;
        while (removeCredit >= 1) {
          removeCredit--;
          removeWorst(pool);
        }
      }
      return { agentId };
    },
  };
}
