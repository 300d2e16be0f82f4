/**
 * The two peak-EWMA load metrics the baselines use. Both keep a latency cost that jumps to any higher
 * sample at once and decays toward lower ones with w = e^(−Δt/τ); load = cost × (pending + 1).
 */

/** Finagle's `Long.MaxValue >> 16`: the load of a node with requests pending and no latency history. */
export const FINAGLE_PENALTY = Number(BigInt('9223372036854775807') >> 16n);

/**
 * Finagle's metric (finagle-core `com/twitter/finagle/loadbalancer/PeakEwma.scala`, class Metric):
 * cost starts at 0; observe(rtt) blends with the time since the last observation; load() first
 * observes 0 (so an idle node's cost decays), then returns Penalty + pending when there is no history
 * but requests are pending, else cost × (pending + 1). Every end, success or failure, is observed.
 */
export class FinaglePeakEwma {
  stamp: number;
  pending = 0;
  cost = 0;

  constructor(
    readonly decayMs = 10_000,
    epochMs = 0,
  ) {
    this.stamp = epochMs;
  }

  private observe(rttMs: number, nowMs: number): void {
    const w = Math.exp(-Math.max(nowMs - this.stamp, 0) / this.decayMs);
    this.cost = rttMs > this.cost ? rttMs : this.cost * w + rttMs * (1 - w);
    this.stamp = nowMs;
  }

  start(nowMs: number): number {
    this.pending++;
    return nowMs;
  }

  end(startedMs: number, nowMs: number): void {
    this.pending--;
    this.observe(Math.max(nowMs - startedMs, 0), nowMs);
  }

  load(nowMs: number): number {
    this.observe(0, nowMs);
    if (this.cost === 0 && this.pending !== 0) return FINAGLE_PENALTY + this.pending;
    return this.cost * (this.pending + 1);
  }
}

/**
 * tower's metric (`tower/src/load/peak_ewma.rs`), which linkerd2-proxy uses: the estimate starts at a
 * default RTT (linkerd2-proxy: 30 ms, `linkerd/app/outbound/src/lib.rs` EWMA_DEFAULT_RTT) instead of 0,
 * decays toward 0 on every load() (an update with a zero-length sample), and a completion updates
 * with (sent, received). Cost = estimate × (pending + 1); no penalty term.
 */
export class TowerPeakEwma {
  rttMs: number;
  updatedAt: number;
  pending = 0;

  constructor(
    defaultRttMs = 30,
    readonly decayMs = 10_000,
    nowMs = 0,
  ) {
    this.rttMs = defaultRttMs;
    this.updatedAt = nowMs;
  }

  private update(sampleMs: number, nowMs: number): number {
    if (this.rttMs < sampleMs) this.rttMs = sampleMs;
    else {
      const decay = Math.exp(-Math.max(0, nowMs - this.updatedAt) / this.decayMs);
      this.rttMs = this.rttMs * decay + sampleMs * (1 - decay);
    }
    this.updatedAt = nowMs;
    return this.rttMs;
  }

  start(): void {
    this.pending++;
  }

  end(sentAtMs: number, nowMs: number): void {
    this.pending--;
    this.update(Math.max(0, nowMs - sentAtMs), nowMs);
  }

  load(nowMs: number): number {
    return this.update(0, nowMs) * (this.pending + 1);
  }
}
