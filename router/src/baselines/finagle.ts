/**
 * `finagle`: a Finagle client as it ships, per model, without aperture.
 *
 * - Balancer: weighted P2C on peak EWMA. Two endpoints drawn in proportion to their weight; the one
 *   with the better status wins, else the lower load ÷ weight (plain load when the weights are within
 *   1e-4), ties to the first (finagle-core `loadbalancer/aperture/WeightedP2CPick.scala`). The pick is
 *   repeated up to MaxEffort = 5 times while the winner is not Open (`loadbalancer/Balancer.scala`).
 *   Load is Finagle's PeakEwma with its default 10 s decay (`loadbalancer/PeakEwma.scala`). The weight
 *   is what the agent's status announces: workers ÷ latency of the model.
 * - Failure accrual (`liveness/FailureAccrualFactory.scala`, `liveness/FailureAccrualPolicy.scala`),
 *   the default policy: a success rate below 0.8 within 30 s (at least 5 requests), or else 5
 *   consecutive failures, marks the endpoint dead (status Busy) for an equal-jittered backoff from 5 s
 *   to 300 s; then one probe request decides between Alive and Dead again.
 * - Retry budget (`service/RetryBudget.scala`): 20 % of requests, at least 10 retries/s, 10 s ttl;
 *   requeues only failures that never reached the agent's model (lost, busy, not connected), as
 *   Finagle's RequeueFilter retries only write failures and nacks.
 * - Backup requests (`client/BackupRequestFilter.scala`): a backup after the (1 − maxExtraLoad)
 *   quantile of recent attempt latencies (a 30 s window in three 10 s buckets, re-read every 3 s;
 *   successes, timeouts and superseded attempts are recorded), paid from a budget of maxExtraLoad of
 *   requests (10 s ttl, 10/s reserve) and from the retry budget. The loser is interrupted.
 *
 * No per-try timeout: Finagle's TimeoutFilter is the request's one deadline.
 */
import type { Attempt, AttemptBudget, AttemptEnd, EngineRequest } from '@edge-mesh/client';
import type { AgentStatus, MeshErrorCode } from '@edge-mesh/protocol';
import type { RouterAsk } from '../policy.ts';
import { type BaselinePolicy, type BaselineReply, type Endpoint, LOST, Membership, TokenRetryBudget, WeightedSampler } from './common.ts';
import { FinaglePeakEwma } from './peak-ewma.ts';

type Status = 0 | 1 | 2; // Open, Busy, Closed: lower is better (Status.best)
const OPEN: Status = 0;
const BUSY: Status = 1;
const CLOSED: Status = 2;

/**
 * Finagle's default failure-accrual policy and its Alive → Dead → ProbeOpen → ProbeClosed machine.
 * Two policies, either of which marks the endpoint dead: the success rate (a time-weighted EMA over
 * 30 s) below 0.8 once 30 s have passed since start or revival with at least 5 requests in the last
 * 30 s; or 5 consecutive failures (the count resets only on a success or a revival, so a failed
 * probe marks it dead again at once). Each marking takes the next equal-jittered backoff.
 */
export class FailureAccrual {
  state: 'alive' | 'dead' | 'probe-open' | 'probe-closed' = 'alive';
  deadUntilMs = 0;
  /** How many times it was marked dead since the last revival (indexes the backoff). */
  marks = 0;
  consecutive = 0;
  /** Ema(window) of success (1) and failure (0), stamped with the time since start or revival. */
  successEma = Number.NaN;
  private emaStamp = 0;
  private startMs: number;
  private readonly recent: number[] = [];

  constructor(
    private readonly random: () => number,
    nowMs = 0,
    readonly options = {
      consecutiveFailures: 5,
      successRate: 0.8,
      windowMs: 30_000,
      minRequests: 5,
      backoffMinMs: 5_000,
      backoffMaxMs: 300_000,
    },
  ) {
    this.startMs = nowMs;
  }

  status(nowMs: number): Status {
    if (this.state === 'dead' && nowMs >= this.deadUntilMs) this.state = 'probe-open';
    return this.state === 'alive' || this.state === 'probe-open' ? OPEN : BUSY;
  }

  /** A request goes out through this endpoint: a revived endpoint takes just the one probe. */
  onApply(nowMs: number): void {
    this.status(nowMs);
    if (this.state === 'probe-open') this.state = 'probe-closed';
  }

  /** Ema.update: the first point sets it, later ones blend with w = e^(−Δstamp/window). */
  private record(ok: boolean, nowMs: number): number {
    const stamp = nowMs - this.startMs;
    const x = ok ? 1 : 0;
    if (Number.isNaN(this.successEma)) this.successEma = x;
    else {
      const w = Math.exp(-Math.max(0, stamp - this.emaStamp) / this.options.windowMs);
      this.successEma = x * (1 - w) + this.successEma * w;
    }
    this.emaStamp = stamp;
    this.recent.push(nowMs);
    if (this.recent.length > this.options.minRequests) this.recent.shift();
    return stamp;
  }

  success(nowMs: number): void {
    this.record(true, nowMs);
    this.consecutive = 0;
    if (this.state === 'probe-closed') {
      // revived(): both policies start afresh.
      this.state = 'alive';
      this.marks = 0;
      this.successEma = Number.NaN;
      this.emaStamp = 0;
      this.startMs = nowMs;
      this.recent.length = 0;
    }
  }

  failure(nowMs: number): void {
    const stamp = this.record(false, nowMs);
    this.consecutive++;
    this.status(nowMs);
    if (this.state !== 'alive' && this.state !== 'probe-closed') return;
    const o = this.options;
    const enough = this.recent.length >= o.minRequests && nowMs - this.recent[0]! <= o.windowMs;
    const lowRate = stamp >= o.windowMs && this.successEma < o.successRate && enough;
    if (this.consecutive >= o.consecutiveFailures || lowRate) this.markDead(nowMs);
    else if (this.state === 'probe-closed') this.state = 'probe-open';
  }

  /** Backoff.equalJittered(5 s, 300 s): 5 s first, then half of min(max, 5 s × 2^k) plus a random share of that half. */
  private markDead(nowMs: number): void {
    const o = this.options;
    let ms = o.backoffMinMs;
    if (this.marks > 0) {
      const full = Math.min(o.backoffMaxMs, o.backoffMinMs * 2 ** this.marks);
      ms = full / 2 + this.random() * (full / 2);
    }
    this.marks++;
    this.state = 'dead';
    this.deadUntilMs = nowMs + ms;
  }
}

/** A windowed latency histogram: buckets of `bucketMs`, the last `buckets` of them count. */
export class WindowedLatencies {
  private readonly data: number[][];
  private start: number;
  private head = 0;

  constructor(
    private readonly buckets = 3,
    private readonly bucketMs = 10_000,
    nowMs = 0,
  ) {
    this.data = Array.from({ length: buckets }, () => []);
    this.start = nowMs;
  }

  private advance(nowMs: number): void {
    const steps = Math.floor((nowMs - this.start) / this.bucketMs);
    if (steps <= 0) return;
    for (let i = 0; i < Math.min(steps, this.buckets); i++) {
      this.head = (this.head + 1) % this.buckets;
      this.data[this.head] = [];
    }
    this.start += steps * this.bucketMs;
  }

  add(ms: number, nowMs: number): void {
    this.advance(nowMs);
    this.data[this.head]!.push(ms);
  }

  /** Nearest-rank percentile (p in 0–100) over the window; 0 with no data. */
  percentile(p: number, nowMs: number): number {
    this.advance(nowMs);
    const all = Float64Array.from(this.data.flat()).sort();
    if (all.length === 0) return 0;
    return all[Math.min(all.length - 1, Math.max(0, Math.ceil((p / 100) * all.length) - 1))]!;
  }
}

interface FinagleEndpoint extends Endpoint {
  ewma: FinaglePeakEwma;
  accrual: FailureAccrual;
}

export interface FinagleOptions {
  name?: string;
  random: () => number;
  decayMs?: number;
  maxEffort?: number;
  /** BackupRequestFilter's maxExtraLoad; 0 turns backups off. */
  maxExtraLoad?: number;
  maxAttempts?: number;
  nowMs?: number;
}

/** The codes Finagle's RequeueFilter retries: the request never reached the model (nacks and write failures). */
const FINAGLE_REQUEUE: ReadonlySet<MeshErrorCode> = new Set<MeshErrorCode>([...LOST, 'MESH_BUSY', 'MESH_NOT_CONNECTED']);

export function createFinaglePolicy<Rep extends BaselineReply = BaselineReply>(options: FinagleOptions): BaselinePolicy<Rep> {
  const { random, decayMs = 10_000, maxEffort = 5, maxExtraLoad = 0.05, maxAttempts = 3, nowMs: t0 = 0 } = options;
  const members = new Membership<FinagleEndpoint>((agentId, _model, info) => ({
    agentId,
    workers: info.workers,
    latencyMs: info.latencyMs,
    weight: info.workers / info.latencyMs,
    ewma: new FinaglePeakEwma(decayMs, t0),
    accrual: new FailureAccrual(random, t0),
  }));
  const samplers = new Map<string, WeightedSampler>();
  const ofAttempt = new WeakMap<Attempt<RouterAsk>, FinagleEndpoint>();
  const retryBudget = new TokenRetryBudget({}, t0);
  const backupBudget = maxExtraLoad > 0 ? new TokenRetryBudget({ percentCanRetry: maxExtraLoad }, t0) : undefined;
  const latencies = new WindowedLatencies(3, 10_000, t0);
  let backupAfterMs = 0;
  let refreshedAt = t0;

  const budget: AttemptBudget = {
    onRequest(nowMs) {
      retryBudget.deposit(nowMs);
      backupBudget?.deposit(nowMs);
    },
    onRequestDone() {},
    take(purpose, nowMs) {
      if (purpose === 'retry') return retryBudget.tryWithdraw(nowMs);
      // canIssueBackup: the backup budget, then the client's retry budget.
      return backupBudget?.tryWithdraw(nowMs) === true && retryBudget.tryWithdraw(nowMs);
    },
    onExtraDone() {},
  };

  const statusOf = (e: FinagleEndpoint, tried: ReadonlySet<string>, nowMs: number): Status =>
    tried.has(e.agentId) ? CLOSED : e.accrual.status(nowMs);

  const better = (a: FinagleEndpoint, b: FinagleEndpoint, tried: ReadonlySet<string>, nowMs: number): FinagleEndpoint => {
    const sa = statusOf(a, tried, nowMs);
    const sb = statusOf(b, tried, nowMs);
    if (sa !== sb) return sa < sb ? a : b;
    const aw = a.weight === 0 ? 1 : a.weight;
    const bw = b.weight === 0 ? 1 : b.weight;
    if (Math.abs(aw - bw) < 0.0001) return a.ewma.load(nowMs) <= b.ewma.load(nowMs) ? a : b;
    return a.ewma.load(nowMs) / aw <= b.ewma.load(nowMs) / bw ? a : b;
  };

  return {
    name: options.name ?? 'finagle',
    maxAttempts,
    budget,
    retryable: (code) => FINAGLE_REQUEUE.has(code),
    onStatus: (status: AgentStatus) => members.onStatus(status),
    onLoad() {},
    pick(request: EngineRequest<RouterAsk>, tried, kind, nowMs) {
      const model = request.data.model;
      const eps = members.endpoints(model);
      if (eps.length === 0) return undefined;
      if (nowMs - refreshedAt >= 3_000) {
        refreshedAt = nowMs;
        backupAfterMs = latencies.percentile((1 - maxExtraLoad) * 100, nowMs);
      }
      let sampler = samplers.get(model);
      if (!sampler) {
        sampler = new WeightedSampler();
        samplers.set(model, sampler);
      }
      if (sampler.builtVersion !== members.version)
        sampler.rebuild(
          eps.map((e) => e.weight),
          members.version,
        );
      let chosen = eps[0]!;
      for (let effort = 0; effort < maxEffort; effort++) {
        const a = sampler.draw(random());
        let b = a;
        for (let t = 0; t < 8 && b === a && eps.length > 1; t++) b = sampler.draw(random());
        chosen = better(eps[a]!, eps[b]!, tried, nowMs);
        if (statusOf(chosen, tried, nowMs) === OPEN) break;
      }
      if (tried.has(chosen.agentId)) {
        // The engine never sends one request twice to an agent; Finagle could, so take the best other status.
        let best: FinagleEndpoint | undefined;
        const off = Math.floor(random() * eps.length);
        for (let k = 0; k < eps.length; k++) {
          const e = eps[(off + k) % eps.length]!;
          if (!tried.has(e.agentId) && (best === undefined || statusOf(e, tried, nowMs) < statusOf(best, tried, nowMs))) best = e;
        }
        if (!best) return undefined;
        chosen = best;
      }
      const hedge = kind === 'first' && backupBudget !== undefined && backupAfterMs > 0;
      return { agentId: chosen.agentId, ...(hedge ? { hedgeAfterMs: backupAfterMs } : {}) };
    },
    onSend(attempt, nowMs) {
      const e = members.get(attempt.request.data.model, attempt.agentId);
      if (!e) return;
      ofAttempt.set(attempt, e);
      e.ewma.start(nowMs);
      e.accrual.onApply(nowMs);
    },
    onAttemptEnd(attempt, end: AttemptEnd<Rep>, nowMs) {
      const e = ofAttempt.get(attempt);
      if (!e) return;
      ofAttempt.delete(attempt);
      e.ewma.end(attempt.sentAt, nowMs);
      const elapsed = nowMs - attempt.sentAt;
      if (end.kind === 'reply') {
        e.accrual.success(nowMs);
        latencies.add(elapsed, nowMs);
      } else if (end.kind === 'error') e.accrual.failure(nowMs);
      else if (end.reason === 'answered-elsewhere') latencies.add(elapsed, nowMs);
      else if (end.reason === 'request-failed') {
        e.accrual.failure(nowMs);
        latencies.add(elapsed, nowMs);
      }
    },
  };
}
