/**
 * Network time to one agent as a line: network ms = RTT + bytes / rate, fitted from every reply at once
 * (docs/routing.md, "What it learns"). Pure: no clock of its own, every sample says when it was taken.
 *
 * Why a joint fit: a learner that splits each sample between RTT and transfer with the other one held
 * fixed never corrects the one it holds. Fed only large payloads, it seeded the RTT from the first reply
 * with the prior rate (often leaving the 0.01 ms floor) and then blamed every millisecond on the rate,
 * so it predicted 723 ms for a 1 MB transfer that takes 160 ms (test/router-learner.test.ts). A
 * least-squares line through samples of different sizes separates the two.
 *
 * - **Time-decayed least squares.** The sums behind the normal equations decay with τ (e^(−Δt/τ), as the
 *   other estimates do), so the fit follows a link that changes.
 * - **Priors as ridge terms.** The RTT is pulled toward its prior, and the transfer time of `refBytes`
 *   toward the prior rate's, each with the weight of a fifth of a sample (so the first reply moves the
 *   RTT most of the way from a guessed prior). Where the sizes do
 *   not spread, the data fix the line's height at the sizes seen and the priors decide only what the
 *   data cannot: small payloads teach the RTT and leave the rate at its prior, a single large size
 *   teaches the transfer and leaves the RTT near its prior. With sizes that spread, the data decide both.
 * - **Winsorised samples.** Once the fit has a few samples, a sample further than three residual scales
 *   from the line is pulled in to that distance before it is added (a broker stall, a GC pause), and the
 *   scale widens with every pulled sample, so a real change still comes through within a few dozen.
 */

/** The state of one fit: decayed sums of weight, x = bytes, y = network ms, x², x·y. */
export interface NetFit {
  w: number;
  x: number;
  y: number;
  xx: number;
  xy: number;
  atMs: number;
  samples: number;
  /** Decayed mean absolute residual, ms: the scale outliers are judged by. */
  residualMs: number;
  readonly priorRttMs: number;
  /** Prior transfer time per byte, ms (1 / prior rate). */
  readonly priorMsPerByte: number;
  /** Current solution. */
  rttMs: number;
  msPerByte: number;
}

export interface NetFitOptions {
  /** Decay time constant of the sums, ms. */
  tauMs: number;
  /** Size at which the prior rate weighs as one sample, bytes. */
  refBytes: number;
}

/** The RTT never goes below this (ms): a zero RTT would make an agent look infinitely close. */
export const MIN_RTT_MS = 0.01;
/** The rate never goes above 1 TB/s (10⁹ bytes/ms): the transfer term never reaches exactly 0. */
const MIN_MS_PER_BYTE = 1e-9;
/** Samples before outliers are pulled in: the first few set the scale. */
const SAMPLES_BEFORE_CLIPPING = 8;
const CLIP_SCALES = 3;
const RESIDUAL_ALPHA = 0.1;
/** Weight of each prior, in samples. */
const PRIOR_WEIGHT = 0.2;

export function newNetFit(priorRttMs: number, priorBytesPerMs: number, nowMs: number): NetFit {
  const priorMsPerByte = 1 / Math.max(priorBytesPerMs, 1e-6);
  return {
    w: 0,
    x: 0,
    y: 0,
    xx: 0,
    xy: 0,
    atMs: nowMs,
    samples: 0,
    residualMs: 0,
    priorRttMs: Math.max(MIN_RTT_MS, priorRttMs),
    priorMsPerByte,
    rttMs: Math.max(MIN_RTT_MS, priorRttMs),
    msPerByte: priorMsPerByte,
  };
}

/** The fitted network time for a payload of `bytes`, ms. */
export function netFitMs(fit: NetFit, bytes: number): number {
  return fit.rttMs + bytes * fit.msPerByte;
}

/**
 * Adds one sample (`networkMs` spent outside the agent's queue and runtime on a round trip that moved
 * `bytes`) and solves again. Returns the sample as added (after winsorising).
 */
export function addNetSample(fit: NetFit, bytes: number, networkMs: number, nowMs: number, options: NetFitOptions): number {
  if (!(networkMs >= 0) || !Number.isFinite(networkMs) || !(bytes >= 0) || !Number.isFinite(bytes)) return Number.NaN;
  let y = networkMs;
  if (fit.samples >= SAMPLES_BEFORE_CLIPPING) {
    const predicted = netFitMs(fit, bytes);
    // The width never shrinks below a tenth of the prediction (plus 0.1 ms): tight fits stay open to jitter.
    const width = CLIP_SCALES * Math.max(fit.residualMs, 0.1 + 0.1 * predicted);
    y = Math.min(predicted + width, Math.max(predicted - width, y));
    fit.residualMs += RESIDUAL_ALPHA * (Math.abs(y - predicted) - fit.residualMs);
  } else {
    fit.residualMs += (Math.abs(y - netFitMs(fit, bytes)) - fit.residualMs) / (fit.samples + 1);
  }
  const decay = nowMs > fit.atMs ? Math.exp(-(nowMs - fit.atMs) / options.tauMs) : 1;
  fit.w = decay * fit.w + 1;
  fit.x = decay * fit.x + bytes;
  fit.y = decay * fit.y + y;
  fit.xx = decay * fit.xx + bytes * bytes;
  fit.xy = decay * fit.xy + bytes * y;
  fit.atMs = Math.max(fit.atMs, nowMs);
  fit.samples++;
  solve(fit, options.refBytes);
  return y;
}

/**
 * Minimises Σ w (y − a − b·x)² + λ (a − a₀)² + λ refBytes² (b − b₀)², λ = PRIOR_WEIGHT, with a ≥ MIN_RTT_MS and b ≥ MIN_MS_PER_BYTE:
 * the 2 × 2 normal equations, then the constrained optimum on the boundary when the free one leaves it.
 */
function solve(fit: NetFit, refBytes: number): void {
  const lambdaA = PRIOR_WEIGHT;
  const lambdaB = PRIOR_WEIGHT * refBytes * refBytes;
  const a0 = fit.priorRttMs;
  const b0 = fit.priorMsPerByte;
  const saa = fit.w + lambdaA;
  const sab = fit.x;
  const sbb = fit.xx + lambdaB;
  const ra = fit.y + lambdaA * a0;
  const rb = fit.xy + lambdaB * b0;
  const det = saa * sbb - sab * sab;
  let a = (ra * sbb - sab * rb) / det;
  let b = (saa * rb - sab * ra) / det;
  if (!Number.isFinite(a) || !Number.isFinite(b)) return;
  if (a < MIN_RTT_MS) {
    a = MIN_RTT_MS;
    b = (rb - sab * a) / sbb;
  }
  if (b < MIN_MS_PER_BYTE) {
    b = MIN_MS_PER_BYTE;
    a = Math.max(MIN_RTT_MS, (ra - sab * b) / saa);
  }
  fit.rttMs = a;
  fit.msPerByte = b;
}
