/**
 * Statistics across seeds: medians, and bootstrap confidence intervals of paired ratios (resampling
 * seeds, docs/routing.md "The simulator"). Infinite percentiles (failures count as +∞) are kept as
 * Infinity; a ratio of two infinities is undefined (NaN) and one of finite over infinite is 0.
 */
import { Rng } from './rng.ts';

export function median(xs: readonly number[]): number {
  const a = xs.filter((x) => !Number.isNaN(x)).sort((p, q) => p - q);
  if (a.length === 0) return Number.NaN;
  const mid = a.length >> 1;
  if (a.length % 2 === 1) return a[mid]!;
  const lo = a[mid - 1]!;
  const hi = a[mid]!;
  if (!Number.isFinite(lo) || !Number.isFinite(hi)) return Number.isFinite(lo) ? hi : lo === hi ? lo : hi;
  return (lo + hi) / 2;
}

export const mean = (xs: readonly number[]) => xs.reduce((s, x) => s + x, 0) / Math.max(1, xs.length);

export function ratio(a: number, b: number): number {
  if (!Number.isFinite(a) && !Number.isFinite(b)) return Number.NaN;
  if (!Number.isFinite(a)) return Number.POSITIVE_INFINITY;
  if (!Number.isFinite(b)) return 0;
  return b > 0 ? a / b : Number.POSITIVE_INFINITY;
}

/** [median, 2.5 %, 97.5 %] of the median of per-seed values, by resampling seeds `rounds` times. */
export function bootstrapMedian(values: readonly number[], rounds = 2_000, seed = 12_345): [number, number, number] {
  const v = values.filter((x) => !Number.isNaN(x));
  if (v.length === 0) return [Number.NaN, Number.NaN, Number.NaN];
  const rng = new Rng(seed, 'bootstrap');
  const meds = new Float64Array(rounds);
  const sample = new Array<number>(v.length);
  for (let r = 0; r < rounds; r++) {
    for (let i = 0; i < v.length; i++) sample[i] = v[rng.int(v.length)]!;
    meds[r] = median(sample);
  }
  meds.sort();
  const at = (q: number) => meds[Math.min(rounds - 1, Math.max(0, Math.floor(q * rounds)))]!;
  return [median(v), at(0.025), at(0.975)];
}
