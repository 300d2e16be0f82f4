/**
 * Route leases from a router (docs/routing.md, "Two ways in"): the SDK asks the router which agents to
 * use for a model and sends to them itself. A lease is used while fresh, kept for a while longer while
 * a fresh one is on its way, and dropped when the router does not answer in time (the SDK then routes by
 * itself). One question per model is in flight at a time.
 */
import type { MeshLogger } from '@edge-mesh/client';
import { DEFAULT_MAX_MESSAGE_BYTES, decodeMessage, type Lease, newRequestId, requestIdHex } from '@edge-mesh/protocol';
import type { LeaseState } from './policy.ts';

/** A lease stays usable this many times its ttl while a fresh one is on its way. */
const LEASE_STALE_FACTOR = 4;

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

  const fetchLease = (model: string, budgetMs: number, bytes: number): Promise<LeaseState | undefined> => {
    const inFlight = coming.get(model);
    if (inFlight) return inFlight;
    const id = newRequestId();
    const key = requestIdHex(id);
    let answer!: (lease: Lease | undefined) => void;
    const promise = new Promise<LeaseState | undefined>((resolve) => {
      answer = (lease) => {
        clearTimeout(timer);
        waiters.delete(key);
        // Only this question's own entry: an answer that comes synchronously must not leave it behind.
        if (coming.get(model) === promise) coming.delete(model);
        if (!lease || lease.agents.length === 0) {
          if (lease) logger.debug({ model, code: lease.code, err: lease.message }, 'router has no route');
          else logger.debug({ model, router }, 'no lease in time');
          resolve(undefined);
          return;
        }
        options.onLease?.();
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
    const timer = setTimeout(() => answer(undefined), timeoutMs);
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
      if (held && t < held.usableUntil) {
        void fetchLease(model, budgetMs, bytes);
        return held;
      }
      return fetchLease(model, budgetMs, bytes);
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
