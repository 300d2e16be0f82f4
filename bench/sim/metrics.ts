/** Exact percentiles with failures counted as +∞ (docs/routing.md, "The simulator"). */
export interface LatencySummary {
  p50_ms: number;
  p90_ms: number;
  p95_ms: number;
  p99_ms: number;
  p999_ms: number;
  max_ms: number;
  fail_rate: number;
}

/** Nearest-rank percentile of an ascending array (q in [0, 1]). */
export function percentile(sorted: Float64Array, q: number): number {
  if (sorted.length === 0) return NaN;
  const idx = Math.min(sorted.length - 1, Math.max(0, Math.ceil(q * sorted.length) - 1));
  return sorted[idx]!;
}

/** `latencies` holds one entry per request: ms, or Infinity for a failure. */
export function summarize(latencies: readonly number[]): LatencySummary {
  const a = Float64Array.from(latencies).sort();
  let fails = 0;
  for (const v of latencies) if (!Number.isFinite(v)) fails++;
  return {
    p50_ms: percentile(a, 0.5),
    p90_ms: percentile(a, 0.9),
    p95_ms: percentile(a, 0.95),
    p99_ms: percentile(a, 0.99),
    p999_ms: percentile(a, 0.999),
    max_ms: a.length ? a[a.length - 1]! : NaN,
    fail_rate: latencies.length ? fails / latencies.length : 0,
  };
}
