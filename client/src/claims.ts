/**
 * What an agent's reply claims about itself, cut to what its receiver can check (docs/routing.md,
 * "What a reply may claim"). An agent wants traffic, so every figure it reports is a claim. The schema
 * already refuses what is not a number in range (protocol/src/messages.ts); these rules bound what is
 * left by what the receiver measured or was told before, so that no claim moves an estimate further
 * than the agent's own measured latency would, and none can crash a receiver.
 */

export interface ClaimedTimes {
  queueMs: number;
  execMs: number;
  loadMs?: number | undefined;
}

/**
 * The queue, run and load times of one attempt, scaled down together to fit inside the attempt as the
 * sender measured it: an agent cannot have spent longer on a request than its sender waited for it.
 * Left as they are when the attempt time is unknown.
 */
export function fitTimesToAttempt(times: ClaimedTimes, attemptMs: number | undefined): Required<ClaimedTimes> {
  const queueMs = Math.max(0, times.queueMs);
  const execMs = Math.max(0, times.execMs);
  const loadMs = Math.max(0, times.loadMs ?? 0);
  const total = queueMs + execMs + loadMs;
  if (attemptMs === undefined || !(attemptMs >= 0) || total <= attemptMs) return { queueMs, execMs, loadMs };
  const scale = attemptMs / total;
  return { queueMs: queueMs * scale, execMs: execMs * scale, loadMs: loadMs * scale };
}

/** When an agent's status does not say how much it may hold, no claim above this many requests counts. */
export const DEFAULT_MAX_CLAIMED_RIF = 4_096;
/** Jobs a worker may hold at once, at most, for the bound below (the agent's pipeline depth is not on the wire). */
const JOBS_PER_WORKER = 4;

/**
 * The most requests an agent can hold at once by its own status: what its workers run plus a full
 * queue per model (beyond that it answers MESH_BUSY).
 */
export function maxHeldRequests(workers: number | undefined, queueLimit: number | undefined, models: number): number {
  if (queueLimit === undefined) return DEFAULT_MAX_CLAIMED_RIF;
  return Math.max(1, workers ?? 1) * JOBS_PER_WORKER + queueLimit * Math.max(1, models);
}

export interface QueueClaimLimits {
  /** See maxHeldRequests. */
  maxRif: number;
  /** The fastest and slowest service time the receiver knows for the agent's models, ms. */
  minServiceMs?: number;
  maxServiceMs?: number;
}

/** A claimed queue within bounds: `workMs` is NaN when the claim gave none. */
export interface BoundedQueue {
  rif: number;
  workMs: number;
}

/** How far the claimed work per request may stray from the service times the receiver knows. */
const WORK_SLACK = 4;

/**
 * A claimed queue (requests held, and that as work in ms), bounded: the count by what the agent can
 * hold, the work by the count times the slowest known service time (× 4) above and the fastest (÷ 4)
 * below. A count past the bound is the agent saying it is full, not more; work outside the band
 * is a claim the service times the receiver measured do not support.
 */
export function boundQueueClaim(rif: number, workMs: number | undefined, limits: QueueClaimLimits): BoundedQueue {
  const count = Math.min(Math.max(0, Math.floor(rif)), Math.max(0, limits.maxRif));
  if (workMs === undefined || !Number.isFinite(workMs)) return { rif: count, workMs: Number.NaN };
  let work = Math.max(0, workMs);
  if (limits.maxServiceMs !== undefined && Number.isFinite(limits.maxServiceMs))
    work = Math.min(work, count * limits.maxServiceMs * WORK_SLACK);
  if (limits.minServiceMs !== undefined && Number.isFinite(limits.minServiceMs))
    work = Math.max(work, (count * limits.minServiceMs) / WORK_SLACK);
  return { rif: count, workMs: work };
}
