/**
 * What every baseline balancer shares (docs/routing.md, "Baselines"): the engine policy shape, the
 * fleet as the wire announces it, and the token retry budget that Finagle and tower both ship.
 *
 * A baseline sees only what the protocol carries: the agents' statuses (birth, online, the LWT's
 * offline), their periodic load reports, and its own sends and replies (queue and execution times).
 * Each one is a request-engine policy, so the live router could run it in place of its own.
 */
import type { AttemptBudget, EnginePolicy } from '@edge-mesh/client';
import type { AgentLoad, AgentStatus, MeshErrorCode } from '@edge-mesh/protocol';
import type { RouterAsk } from '../policy.ts';

/** What a baseline reads from an answer: the reply's queue and execution times (both on the wire). */
export interface BaselineReply {
  queueMs: number;
  execMs: number;
}

export interface BaselinePolicy<Rep extends BaselineReply = BaselineReply> extends EnginePolicy<RouterAsk, Rep> {
  readonly name: string;
  /** A retained status or LWT as the broker delivers it. */
  onStatus(status: AgentStatus, nowMs: number): void;
  /** A periodic load report. */
  onLoad(load: AgentLoad, nowMs: number): void;
  /** Agents per request (first attempt, retries and backups together). */
  readonly maxAttempts: number;
  /** Which failures the source retries on another agent. */
  retryable(code: MeshErrorCode): boolean;
  /** The source's budget for retries and backups, or undefined for none. */
  readonly budget: AttemptBudget | undefined;
}

/** Lost work (the agent went offline: the request never ran) moves on in every balancer, as the engine does it. */
export const LOST: ReadonlySet<MeshErrorCode> = new Set<MeshErrorCode>(['MESH_AGENT_LOST', 'MESH_SHUTTING_DOWN']);

/** One agent serving one model, as a balancer's endpoint. */
export interface Endpoint {
  readonly agentId: string;
  /** Announced capacity for this model: workers ÷ latencyMs (requests per ms). */
  weight: number;
  workers: number;
  /** The agent's announced latency for the model, ms. */
  latencyMs: number;
}

/**
 * Per model, the endpoints that are online, kept from status messages alone (service discovery): an
 * agent enters a model's set with its `online` status and leaves it with `offline` (LWT) or `draining`.
 * `make` builds a baseline's per-endpoint state; a returning agent gets fresh state, as a re-resolved
 * address does.
 */
export class Membership<E extends Endpoint> {
  readonly byModel = new Map<string, E[]>();
  private readonly index = new Map<string, Map<string, E>>();
  /** Bumped on every change, so samplers can cache per version. */
  version = 0;

  constructor(private readonly make: (agentId: string, model: string, info: { workers: number; latencyMs: number }) => E) {}

  endpoints(model: string): readonly E[] {
    return this.byModel.get(model) ?? [];
  }

  get(model: string, agentId: string): E | undefined {
    return this.index.get(model)?.get(agentId);
  }

  onStatus(status: AgentStatus): void {
    const online = status.state === 'online';
    const served = new Set<string>();
    if (online) {
      const workers = Math.max(1, status.workers ?? 1);
      for (const m of status.models ?? []) {
        served.add(m.name);
        let idx = this.index.get(m.name);
        if (!idx) {
          idx = new Map();
          this.index.set(m.name, idx);
          this.byModel.set(m.name, []);
        }
        const latencyMs = Math.max(0.001, m.latencyMs);
        const existing = idx.get(status.agent);
        if (existing) {
          existing.workers = workers;
          existing.latencyMs = latencyMs;
          existing.weight = workers / latencyMs;
          continue;
        }
        const e = this.make(status.agent, m.name, { workers, latencyMs });
        idx.set(status.agent, e);
        this.byModel.get(m.name)!.push(e);
        this.version++;
      }
    }
    for (const [model, idx] of this.index) {
      if (served.has(model) || !idx.has(status.agent)) continue;
      idx.delete(status.agent);
      const list = this.byModel.get(model)!;
      list.splice(
        list.findIndex((e) => e.agentId === status.agent),
        1,
      );
      this.version++;
    }
  }
}

/**
 * The retry budget of Finagle (`com/twitter/finagle/service/RetryBudget.scala`, TokenRetryBudget over a
 * leaky TokenBucket) and of tower (`tower/src/retry/budget/tps_budget.rs`): every request deposits one
 * token that expires after `ttlMs`; a retry withdraws 1 ÷ `percentCanRetry` tokens; a reserve of
 * `minRetriesPerSec` × ttl retries is always there, so a quiet client can still retry.
 */
export class TokenRetryBudget {
  private readonly slots: Float64Array;
  private readonly slotMs: number;
  private slotStart: number;
  private head = 0;
  private readonly reserve: number;
  private readonly withdrawCost: number;

  constructor(
    readonly options: { ttlMs?: number; minRetriesPerSec?: number; percentCanRetry?: number } = {},
    nowMs = 0,
  ) {
    const { ttlMs = 10_000, minRetriesPerSec = 10, percentCanRetry = 0.2 } = options;
    this.slots = new Float64Array(10);
    this.slotMs = ttlMs / this.slots.length;
    this.slotStart = nowMs;
    this.withdrawCost = percentCanRetry > 0 ? 1 / percentCanRetry : Number.POSITIVE_INFINITY;
    this.reserve = minRetriesPerSec * (ttlMs / 1000) * this.withdrawCost;
  }

  /** Expires the slots older than the ttl. */
  private advance(nowMs: number): void {
    const n = this.slots.length;
    const steps = Math.floor((nowMs - this.slotStart) / this.slotMs);
    if (steps <= 0) return;
    for (let i = 0; i < Math.min(steps, n); i++) {
      this.head = (this.head + 1) % n;
      this.slots[this.head] = 0;
    }
    this.slotStart += steps * this.slotMs;
  }

  balance(nowMs: number): number {
    this.advance(nowMs);
    let sum = this.reserve;
    for (const v of this.slots) sum += v;
    return sum;
  }

  deposit(nowMs: number): void {
    this.advance(nowMs);
    this.slots[this.head]! += 1;
  }

  tryWithdraw(nowMs: number): boolean {
    if (this.balance(nowMs) < this.withdrawCost) return false;
    this.slots[this.head]! -= this.withdrawCost;
    return true;
  }
}

/** Samples an index in proportion to `weights` (cumulative table, binary search). */
export class WeightedSampler {
  private cumulative = new Float64Array(0);
  private total = 0;
  builtVersion = -1;

  rebuild(weights: readonly number[], version: number): void {
    if (this.cumulative.length !== weights.length) this.cumulative = new Float64Array(weights.length);
    let s = 0;
    for (let i = 0; i < weights.length; i++) {
      s += Math.max(0, weights[i]!);
      this.cumulative[i] = s;
    }
    this.total = s;
    this.builtVersion = version;
  }

  draw(u: number): number {
    const c = this.cumulative;
    if (c.length === 0) return -1;
    if (this.total <= 0) return Math.min(c.length - 1, Math.floor(u * c.length));
    const x = u * this.total;
    let lo = 0;
    let hi = c.length - 1;
    while (lo < hi) {
      const mid = (lo + hi) >> 1;
      if (c[mid]! > x) hi = mid;
      else lo = mid + 1;
    }
    return lo;
  }
}
