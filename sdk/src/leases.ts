/**
 * Route leases from a router (docs/routing.md, "Two ways in"): the SDK asks the router which agents to
 * use for a model and sends to them itself. A lease is used while fresh, kept for a while longer while
 * a fresh one is on its way, and dropped when the router does not answer in time (the SDK then routes by
 * itself). One question per model is in flight at a time. After a question the router left unanswered, or
 * answered with no agent, it is not asked about that model again for a while (1–2 s, doubling on each miss
 * in a row up to 15–30 s, jittered; a lease with agents ends it): a router that is down would otherwise cost
 * every request the whole wait.
 */
import { type MeshLogger, reconnectDelayMs } from '@edge-mesh/client';
import { DEFAULT_MAX_MESSAGE_BYTES, decodeMessage, type Lease, newRequestId, requestIdHex } from '@edge-mesh/protocol';
import type { LeaseState } from './policy.ts';

/** A lease stays usable this many times its ttl while a fresh one is on its way. */
const LEASE_STALE_FACTOR = 4;
/** How long the router is left alone after misses in a row: the upper half of 2 s doubled per miss, capped at 30 s. */
const MISS_BACKOFF = { baseMs: 2_000, maxMs: 30_000 };

export interface LeaseBookOptions {
  router: string;
  /** How long to wait for a lease before routing without one, ms. */
  timeoutMs: number;
  now: () => number;
  logger: MeshLogger;
  maxMessageBytes?: number;
  /** Sends the route question; false when it could not be sent (not connected). */
  ask(id: Uint8Array, model: string, budgetMs: number, bytes: number, sent: (ok: boolean) => void): void;
  onLease?: () => void;
  /** Jitter of the wait after a miss (default Math.random). */
  random?: () => number;
}

export interface LeaseBook {
  /** A usable lease for `model`: a fresh one at once, a stale one while a fresh one is fetched, else waits for one. */
  leaseFor(model: string, budgetMs: number, bytes: number): Promise<LeaseState | undefined>;
  /** Applies a payload from the router's lease topic. */
  onLeaseMessage(payload: Uint8Array): void;
  /** Answers every question in flight with "no lease". */
  close(): void;
}

export function createLeaseBook(options: LeaseBookOptions): LeaseBook {
  const { router, timeoutMs, now, logger, maxMessageBytes = DEFAULT_MAX_MESSAGE_BYTES } = options;
  const leases = new Map<string, LeaseState>();
  const waiters = new Map<string, (lease: Lease | undefined) => void>();
  const coming = new Map<string, Promise<LeaseState | undefined>>();
  /** Per model: the router's misses in a row, and until when it is not asked. */
  const misses = new Map<string, { count: number; until: number }>();

  /** The router left a question unanswered or had no agent: no question about the model until the wait is over. */
  const missed = (model: string) => {
    const count = (misses.get(model)?.count ?? 0) + 1;
    const waitMs = reconnectDelayMs(count - 1, MISS_BACKOFF, options.random);
    misses.set(model, { count, until: now() + waitMs });
    logger.debug({ model, router, misses: count, waitMs }, 'not asking the router for a while');
  };

  const fetchLease = (model: string, budgetMs: number, bytes: number): Promise<LeaseState | undefined> => {
    const inFlight = coming.get(model);
    if (inFlight) return inFlight;
    const id = newRequestId();
    const key = requestIdHex(id);
    // `unanswered`: the router did not answer in time (a question that could not be sent says nothing of the router).
    let answer!: (lease: Lease | undefined, unanswered?: boolean) => void;
    const promise = new Promise<LeaseState | undefined>((resolve) => {
      answer = (lease, unanswered = false) => {
        clearTimeout(timer);
        waiters.delete(key);
        // Only this question's own entry: an answer that comes synchronously must not leave it behind.
        if (coming.get(model) === promise) coming.delete(model);
        if (!lease || lease.agents.length === 0) {
          if (lease) logger.debug({ model, code: lease.code, err: lease.message }, 'router has no route');
          else logger.debug({ model, router }, 'no lease in time');
          if (lease || unanswered) missed(model);
          resolve(undefined);
          return;
        }
        options.onLease?.();
        misses.delete(model);
        const t = now();
        const state: LeaseState = {
          router,
          agents: lease.agents,
          freshUntil: t + lease.ttlMs,
          usableUntil: t + lease.ttlMs * LEASE_STALE_FACTOR,
        };
        leases.set(model, state);
        resolve(state);
      };
    });
    const timer = setTimeout(() => answer(undefined, true), timeoutMs);
    coming.set(model, promise);
    waiters.set(key, (lease) => answer(lease));
    options.ask(id, model, budgetMs, bytes, (ok) => {
      if (!ok) answer(undefined);
    });
    return promise;
  };

  return {
    async leaseFor(model, budgetMs, bytes) {
      const t = now();
      const held = leases.get(model);
      if (held && t < held.freshUntil) return held;
      const resting = t < (misses.get(model)?.until ?? 0);
      if (held && t < held.usableUntil) {
        if (!resting) void fetchLease(model, budgetMs, bytes);
        return held;
      }
      return resting ? undefined : fetchLease(model, budgetMs, bytes);
    },
    onLeaseMessage(payload) {
      let lease: Lease;
      try {
        lease = decodeMessage(payload, ['lease'], maxMessageBytes);
      } catch (err) {
        logger.debug({ err: (err as Error).message }, 'ignoring bad lease');
        return;
      }
      // A lease counts only from the router asked, for a question in flight.
      if (lease.router !== router) return;
      waiters.get(requestIdHex(lease.id))?.(lease);
    },
    close() {
      for (const waiter of [...waiters.values()]) waiter(undefined);
    },
  };
}
