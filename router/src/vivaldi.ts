/**
 * Vivaldi network coordinates (Dabek et al., SIGCOMM 2004) in 2 dimensions plus a height, the model the
 * routing notes use for the fleet (RTT = 2-D distance + access-link heights). Constants follow the paper and
 * Serf: c_c = c_e = 0.25, error starts at (and is capped to) 1.5, heights never fall below 0.01 ms.
 * Pure: a sample moves the local coordinate in place; randomness (only needed when two coordinates
 * coincide) is an argument.
 */

export interface VivaldiCoord {
  /** Plane position, ms. */
  x: number;
  y: number;
  /** Height: the access-link latency that every path through this node pays, ms. */
  h: number;
  /** Relative error estimate; 1.5 means "knows nothing yet". */
  error: number;
}

export interface VivaldiOptions {
  /** c_c: how far one sample moves the coordinate (timestep). */
  cc?: number;
  /** c_e: weight of one sample in the error estimate. */
  ce?: number;
  maxError?: number;
  minHeightMs?: number;
}

export const VIVALDI_DEFAULTS = Object.freeze({ cc: 0.25, ce: 0.25, maxError: 1.5, minHeightMs: 0.01 });

export function newCoord(): VivaldiCoord {
  return { x: 0, y: 0, h: VIVALDI_DEFAULTS.minHeightMs, error: VIVALDI_DEFAULTS.maxError };
}

/** Predicted round-trip time between two coordinates, ms. */
export function vivaldiDistanceMs(a: VivaldiCoord, b: VivaldiCoord): number {
  return Math.hypot(a.x - b.x, a.y - b.y) + a.h + b.h;
}

/** True once a coordinate has learned from at least a few samples (its error fell well below the start). */
export function isCoordKnown(c: VivaldiCoord, maxError = 1): boolean {
  return c.error < maxError;
}

/**
 * One Vivaldi step: `local` measured `rttMs` to a node whose coordinate is `remote`. Moves `local` (in place)
 * along the height vector away from / towards `remote` by c_c · w · (rtt − predicted), w = e_l / (e_l + e_r),
 * and updates its error as the paper's moving average. Returns `local`.
 */
export function applyVivaldiSample(
  local: VivaldiCoord,
  remote: VivaldiCoord,
  rttMs: number,
  rng: () => number = Math.random,
  {
    cc = VIVALDI_DEFAULTS.cc,
    ce = VIVALDI_DEFAULTS.ce,
    maxError = VIVALDI_DEFAULTS.maxError,
    minHeightMs = VIVALDI_DEFAULTS.minHeightMs,
  }: VivaldiOptions = {},
): VivaldiCoord {
  if (!(rttMs > 0) || !Number.isFinite(rttMs)) return local;
  const predicted = vivaldiDistanceMs(local, remote);
  const totalError = Math.max(local.error + remote.error, 1e-9);
  const w = local.error / totalError;
  const relativeError = Math.abs(predicted - rttMs) / rttMs;
  local.error = Math.min(maxError, ce * w * relativeError + local.error * (1 - ce * w));
  const force = cc * w * (rttMs - predicted);

  let dx = local.x - remote.x;
  let dy = local.y - remote.y;
  let planar = Math.hypot(dx, dy);
  if (planar < 1e-9) {
    // Coincident points: the paper picks a random direction so nodes can separate.
    const angle = 2 * Math.PI * rng();
    dx = Math.cos(angle);
    dy = Math.sin(angle);
    planar = 1;
  }
  // Height-vector arithmetic: [x_l, h_l] − [x_r, h_r] = [x_l − x_r, h_l + h_r], norm = ‖Δx‖ + h_l + h_r.
  const heights = local.h + remote.h;
  const norm = Math.hypot(dx, dy) + heights;
  local.x += (force * dx) / norm;
  local.y += (force * dy) / norm;
  local.h = Math.max(minHeightMs, local.h + (force * heights) / norm);
  return local;
}
