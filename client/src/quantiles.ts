/**
 * Per-node latency quantiles and the timing rules built on them (docs/routing.md, "Per-try timeouts and
 * hedge delays"): the router and the SDK give each attempt a per-try timeout and a hedge delay from the
 * node's own recent latencies, bounded below and above, instead of one constant for every node.
 */

/**
 * Streaming estimates of the 95th and 99th percentiles of one node's attempt latency, in O(1) memory
 * and time per sample: stochastic approximation of a quantile (Robbins–Monro), q ← q + η (p − 1[x ≤ q]),
 * taken on log q so each step is relative (a 1 ms node and a 1 s node move alike). At equilibrium a
 * fraction 1 − p of samples lies above q. A step up is η·p (5 % with η = 0.05), a step down η·(1 − p),
 * so the estimate climbs within a few dozen samples when a node slows, and comes down slowly: the rules
 * below err toward waiting.
 */
export class LatencyQuantiles {
  /** Samples seen. */
  count = 0;
  private logQ95 = 0;
  private logQ99 = 0;

  constructor(private readonly stepSize = 0.05) {}

  add(latencyMs: number): void {
    if (!(latencyMs > 0) || !Number.isFinite(latencyMs)) return;
    const x = Math.log(latencyMs);
    if (this.count === 0) {
      this.logQ95 = x;
      this.logQ99 = x;
    } else {
      this.logQ95 += this.stepSize * (x > this.logQ95 ? 0.95 : -0.05);
      this.logQ99 += this.stepSize * (x > this.logQ99 ? 0.99 : -0.01);
    }
    this.count++;
  }

  /** The estimates once `minSamples` have been seen, else NaN. */
  p95(minSamples = QUANTILE_MIN_SAMPLES): number {
    return this.count >= minSamples ? Math.exp(this.logQ95) : Number.NaN;
  }

  p99(minSamples = QUANTILE_MIN_SAMPLES): number {
    return this.count >= minSamples ? Math.exp(this.logQ99) : Number.NaN;
  }
}

/** Samples before a node's quantiles are used: from its first sample the p99 needs a few dozen to climb. */
export const QUANTILE_MIN_SAMPLES = 40;

export interface PerTryTimeoutRule {
  /** Without a node p99: `factor` × predicted, at least `minMs`. This is also the upper bound with one. */
  factor?: number;
  minMs?: number;
  /** The node's p99 of attempt latency, ms; NaN or absent when not known yet. */
  p99Ms?: number;
  /** With a node p99: `quantileFactor` × p99 (and at least 2 × predicted), never below `floorMs`. */
  quantileFactor?: number;
  floorMs?: number;
}

/**
 * Per-try timeout for an attempt predicted to take `predictedMs`, never past the deadline.
 * - No p99 for the node yet: max(minMs, factor × predicted), the rule before per-node quantiles.
 * - With one: max(quantileFactor × p99, 2 × predicted), clamped to [floorMs, the rule above]. An answer
 *   later than 1.5 × the node's own p99 is one in far more than a hundred: waiting longer only delays the
 *   retry, while a node whose tail is long still gets no less than the old rule gave it.
 */
export function perTryTimeoutMs(
  predictedMs: number,
  remainingMs = Number.POSITIVE_INFINITY,
  { factor = 5, minMs = 250, p99Ms, quantileFactor = 1.5, floorMs = 50 }: PerTryTimeoutRule = {},
): number {
  const ruleMs = Math.max(minMs, factor * predictedMs);
  let timeoutMs = ruleMs;
  if (p99Ms !== undefined && p99Ms > 0 && Number.isFinite(p99Ms)) {
    timeoutMs = Math.min(ruleMs, Math.max(floorMs, quantileFactor * p99Ms, 2 * predictedMs));
  }
  return Math.min(remainingMs, timeoutMs);
}

/**
 * Hedge delay: the p95 of the node's own attempt latency when known (else `fallbackP95Ms`, a wider
 * population's), and never before 2 × predicted, so a request that waits in a queue the prediction
 * already counted is not backed up for it.
 */
export function hedgeAfterMs(predictedMs: number, nodeP95Ms: number, fallbackP95Ms = Number.NaN): number {
  const p95 = Number.isFinite(nodeP95Ms) && nodeP95Ms > 0 ? nodeP95Ms : fallbackP95Ms;
  return Number.isFinite(p95) ? Math.max(p95, 2 * predictedMs) : 2 * predictedMs;
}
