/**
 * Per-node latency quantiles and the per-try timeout and hedge delay rules built on them
 * (client/src/quantiles.ts). No sockets, no clock; the router applying them per (agent, model) is in
 * test/router-timing.test.ts.
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { hedgeAfterMs, LatencyQuantiles, mulberry32, perTryTimeoutMs, QUANTILE_MIN_SAMPLES } from '../src/index.ts';

/** Lognormal latencies, median `medianMs`, σ = 0.3 (exp of a Box–Muller normal). */
function lognormal(seed: number, medianMs: number) {
  const rng = mulberry32(seed);
  return () => medianMs * Math.exp(0.3 * Math.sqrt(-2 * Math.log(1 - rng())) * Math.cos(2 * Math.PI * rng()));
}

test('streaming p95 and p99 converge on a lognormal, and climb when the node slows', () => {
  const q = new LatencyQuantiles();
  const next = lognormal(1, 10);
  assert.ok(Number.isNaN(q.p99()), 'no estimate before any sample');
  for (let i = 0; i < QUANTILE_MIN_SAMPLES - 1; i++) q.add(next());
  assert.ok(Number.isNaN(q.p99()), `no estimate before ${QUANTILE_MIN_SAMPLES} samples`);
  for (let i = 0; i < 5_000; i++) q.add(next());
  // True values: 10 · e^(0.3 · 1.645) = 16.4 and 10 · e^(0.3 · 2.326) = 20.1.
  assert.ok(Math.abs(q.p95() - 16.4) / 16.4 < 0.1, `p95 ${q.p95()}`);
  assert.ok(Math.abs(q.p99() - 20.1) / 20.1 < 0.15, `p99 ${q.p99()}`);
  const slower = lognormal(2, 40);
  for (let i = 0; i < 100; i++) q.add(slower());
  assert.ok(q.p99() > 40, `after 100 samples at 4× the median, p99 ${q.p99()}`);
  q.add(Number.NaN);
  q.add(-1);
  assert.ok(Number.isFinite(q.p99()), 'bad samples are ignored');
});

test('per-try timeout: the old rule without a node p99; with one, 1.5 × p99 bounded by a floor and by the old rule', () => {
  // [predicted, remaining, p99, expected]
  const rows: [number, number, number | undefined, number][] = [
    [10, Number.POSITIVE_INFINITY, undefined, 250], // no history: max(250, 5 × 10)
    [100, Number.POSITIVE_INFINITY, undefined, 500], // no history: 5 × 100
    [100, 120, undefined, 120], // never past the deadline
    [2, Number.POSITIVE_INFINITY, 5, 50], // a fast node: the 50 ms floor, not 250
    [20, Number.POSITIVE_INFINITY, 100, 150], // 1.5 × p99
    [90, Number.POSITIVE_INFINITY, 40, 180], // a queue the p99 has not seen: 2 × predicted
    [20, Number.POSITIVE_INFINITY, 1_000, 250], // a long tail waits no longer than the old rule
    [20, 100, 100, 100], // and never past the deadline
  ];
  for (const [predicted, remaining, p99, expected] of rows) {
    assert.equal(
      perTryTimeoutMs(predicted, remaining, p99 === undefined ? {} : { p99Ms: p99 }),
      expected,
      JSON.stringify({ predicted, p99 }),
    );
  }
  assert.equal(perTryTimeoutMs(2, Number.POSITIVE_INFINITY, { p99Ms: Number.NaN }), 250, 'NaN is no history');
});

test('hedge delay: the node p95, else the fallback, and never before 2 × predicted', () => {
  assert.equal(hedgeAfterMs(10, 35), 35);
  assert.equal(hedgeAfterMs(30, 35), 60);
  assert.equal(hedgeAfterMs(10, Number.NaN, 80), 80);
  assert.equal(hedgeAfterMs(10, Number.NaN), 20);
});
