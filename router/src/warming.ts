/**
 * Warming cold agents ahead of demand (docs/routing.md, "How the router decides"). An agent loads a
 * model on its first request; a router that only picks the shortest expected completion never sends
 * that first request while warm agents have any queue at all, so the capacity of agents that announce
 * a model but have not loaded it stays unused while the warm ones drown (the cold-start scenario of
 * bench/sim). The warmer decides, at most once per `checkEveryMs` per model, whether one cold agent
 * should load it now:
 *
 * - the model is under pressure: at least `hotShare` of the agents that hold it warm (or are loading
 *   it) have no free slot, judged by what the wire says (the agent's reported queue plus this router's
 *   own requests there, counted `routers` times as in the expected-completion rule);
 * - the target is a cold agent drawn in proportion to its capacity for the model (slots ÷ service
 *   time), alive and not ejected, that this router has not asked to load it within its load time plus
 *   `retryMs`; drawn, so that several routers under the same pressure warm different agents.
 *
 * It only uses the model's state as the agent reports it (warm, loading with an ETA, cold), the queue
 * reports and the router's own counts. The policy (policy.ts) sends the warming request as an immediate
 * backup copy of an ordinary request, so the request's own answer never waits for a load.
 */
import { coldLoadMsOf, isAlive, isEjected, type ModelEntry, type Registry, serviceMsAt } from './estimates.ts';

export interface WarmingOptions {
  /** How often one model is looked at, ms (default 1,000). */
  checkEveryMs?: number;
  /** Share of the warm agents without a free slot that calls for one more (default 0.5). */
  hotShare?: number;
  /** After asking an agent to load a model, ask it again only after its load time plus this, ms (default 5,000). */
  retryMs?: number;
}

export interface Warmer {
  /** The cold agent a request for `model` should also go to now, so that it loads the model; or undefined. */
  target(model: string, nowMs: number): ModelEntry | undefined;
}

export function createWarmer(registry: Registry, options: WarmingOptions = {}, random: () => number = registry.rng): Warmer {
  const { checkEveryMs = 1_000, hotShare = 0.5, retryMs = 5_000 } = options;
  const checkedAt = new Map<string, number>();
  const askedUntil = new WeakMap<ModelEntry, number>();
  return {
    target(model, nowMs) {
      const last = checkedAt.get(model);
      if (last !== undefined && nowMs - last < checkEveryMs && nowMs >= last) return undefined;
      checkedAt.set(model, nowMs);
      const pool = registry.pools.get(model);
      if (!pool) return undefined;
      const routers = registry.config.routers;
      let warm = 0;
      let hot = 0;
      const cold: ModelEntry[] = [];
      const capacity: number[] = [];
      let total = 0;
      for (const e of pool.entries) {
        const agent = e.agent;
        if (!isAlive(agent, nowMs) || isEjected(agent, nowMs)) continue;
        const slots = e.slots ?? agent.slots;
        if (e.warm || e.loadingUntilMs > 0) {
          warm++;
          if (agent.reportedRif + routers * agent.outstanding >= slots) hot++;
          continue;
        }
        if ((askedUntil.get(e) ?? Number.NEGATIVE_INFINITY) > nowMs) continue;
        cold.push(e);
        capacity.push(slots / Math.max(0.001, serviceMsAt(e, nowMs)));
        total += capacity[capacity.length - 1]!;
      }
      if (cold.length === 0 || (warm > 0 && hot < hotShare * warm)) return undefined;
      let u = random() * total;
      let k = 0;
      while (k < cold.length - 1 && u >= capacity[k]!) u -= capacity[k++]!;
      const best = cold[k]!;
      askedUntil.set(best, nowMs + coldLoadMsOf(best) + retryMs);
      return best;
    },
  };
}
