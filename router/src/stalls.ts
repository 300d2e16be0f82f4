/**
 * The router's own stalls (docs/routing.md, "The router's own stalls"): a timer that should fire every `tickMs` and
 * fires late by the time the event loop was blocked (a large JSON body parsed, a GC pause, a busy core). Each stall
 * is kept with when it happened, so a reply that arrives across one can have the stall taken out of its round trip
 * before the registry learns from it: the router's stall is not the agent's latency.
 *
 * Node's `perf_hooks.monitorEventLoopDelay` measures the same delay, but as a histogram with no times in it; which
 * attempt overlapped which stall needs the times, so this keeps its own ring of them.
 */

/** What the registry asks: how long the router's event loop was stalled between two times of its clock. */
export interface StallSource {
  stalledMs(fromMs: number, toMs: number): number;
}

export interface StallMonitorOptions {
  /** How often the timer is due. Default 10 ms. */
  tickMs?: number;
  /** A late timer counts as a stall from this lateness on. Default 20 ms. */
  minStallMs?: number;
  /** How many stalls are remembered (the oldest are forgotten). Default 256. */
  keep?: number;
}

export class StallMonitor implements StallSource {
  private readonly tickMs: number;
  private readonly minStallMs: number;
  private readonly keep: number;
  /** Start and end times of past stalls, oldest first. */
  private readonly starts: number[] = [];
  private readonly ends: number[] = [];
  private last: number;
  private timer: NodeJS.Timeout | undefined;

  constructor(
    private readonly now: () => number,
    options: StallMonitorOptions = {},
  ) {
    this.tickMs = options.tickMs ?? 10;
    this.minStallMs = options.minStallMs ?? 20;
    this.keep = options.keep ?? 256;
    this.last = now();
  }

  start(): this {
    if (this.timer) return this;
    this.last = this.now();
    this.timer = setInterval(() => this.tick(), this.tickMs);
    this.timer.unref();
    return this;
  }

  stop(): void {
    clearInterval(this.timer);
    this.timer = undefined;
  }

  /** One tick of the timer: a tick this late closes a stall. Public so a test can drive it. */
  tick(): void {
    const t = this.now();
    const late = t - this.last - this.tickMs;
    if (late >= this.minStallMs) this.record(t - late, t);
    this.last = t;
  }

  /** Records a stall from `startMs` to `endMs`. */
  record(startMs: number, endMs: number): void {
    this.starts.push(startMs);
    this.ends.push(endMs);
    if (this.starts.length > this.keep) {
      this.starts.shift();
      this.ends.shift();
    }
  }

  /**
   * Stalled time within [fromMs, toMs]: the stalls recorded, and one still under way (no tick for longer than a
   * stall), which happens when the reply is handled in the same turn of the loop that ends the stall, before the
   * timer could fire.
   */
  stalledMs(fromMs: number, toMs: number): number {
    let total = 0;
    for (let i = this.ends.length - 1; i >= 0; i--) {
      const end = this.ends[i]!;
      if (end <= fromMs) break;
      total += overlap(this.starts[i]!, end, fromMs, toMs);
    }
    if (this.timer !== undefined) {
      const due = this.last + this.tickMs;
      const t = this.now();
      if (t - due >= this.minStallMs) total += overlap(due, t, fromMs, toMs);
    }
    return total;
  }
}

function overlap(a0: number, a1: number, b0: number, b1: number): number {
  return Math.max(0, Math.min(a1, b1) - Math.max(a0, b0));
}
