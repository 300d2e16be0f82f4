/**
 * `linkerd`: linkerd2-proxy's HTTP balancer, per model.
 *
 * - P2C over the ready endpoints, uniform: two distinct endpoints, the lower load wins, ties to the
 *   first (`tower/src/balance/p2c/service.rs`, p2c_ready_index). An endpoint is ready while the
 *   discovery (here: the agent's status) lists it; the agents already tried by this request are not.
 * - Load: tower's PeakEwma (`tower/src/load/peak_ewma.rs`) with linkerd2-proxy's constants, a 30 ms
 *   default RTT and a 10 s decay (`linkerd/app/outbound/src/lib.rs`, EWMA_DEFAULT_RTT and EWMA_DECAY).
 * - Retries on a failed response (the error table's retryable codes) paid from Linkerd's default
 *   retry budget: 20 % of requests, at least 10 retries/s, 10 s ttl (the ServiceProfile retryBudget
 *   defaults, enforced by tower's `tower/src/retry/budget/tps_budget.rs`). No per-try timeout, no
 *   backup requests: the request's deadline is its timeout. Failure accrual is opt-in in Linkerd and
 *   off by default, so it is off here.
 */
import type { Attempt, AttemptBudget, AttemptEnd, EngineRequest } from '@edge-mesh/client';
import { ERROR_CODES } from '@edge-mesh/protocol';
import type { RouterAsk } from '../policy.ts';
import { type BaselinePolicy, type BaselineReply, type Endpoint, Membership, TokenRetryBudget } from './common.ts';
import { TowerPeakEwma } from './peak-ewma.ts';

interface LinkerdEndpoint extends Endpoint {
  ewma: TowerPeakEwma;
}

export interface LinkerdOptions {
  name?: string;
  random: () => number;
  defaultRttMs?: number;
  decayMs?: number;
  maxAttempts?: number;
  nowMs?: number;
}

export function createLinkerdPolicy<Rep extends BaselineReply = BaselineReply>(options: LinkerdOptions): BaselinePolicy<Rep> {
  const { random, defaultRttMs = 30, decayMs = 10_000, maxAttempts = 3, nowMs: t0 = 0 } = options;
  const members = new Membership<LinkerdEndpoint>((agentId, _model, info) => ({
    agentId,
    workers: info.workers,
    latencyMs: info.latencyMs,
    weight: info.workers / info.latencyMs,
    ewma: new TowerPeakEwma(defaultRttMs, decayMs, t0),
  }));
  const ofAttempt = new WeakMap<Attempt<RouterAsk>, LinkerdEndpoint>();
  const retryBudget = new TokenRetryBudget({ ttlMs: 10_000, minRetriesPerSec: 10, percentCanRetry: 0.2 }, t0);
  const budget: AttemptBudget = {
    onRequest: (nowMs) => retryBudget.deposit(nowMs),
    onRequestDone() {},
    take: (purpose, nowMs) => purpose === 'retry' && retryBudget.tryWithdraw(nowMs),
    onExtraDone() {},
  };

  return {
    name: options.name ?? 'linkerd',
    maxAttempts,
    budget,
    retryable: (code) => ERROR_CODES[code].retryable,
    onStatus: (status) => members.onStatus(status),
    onLoad() {},
    pick(request: EngineRequest<RouterAsk>, tried, _kind, nowMs) {
      const all = members.endpoints(request.data.model);
      const ready = tried.size === 0 ? all : all.filter((e) => !tried.has(e.agentId));
      if (ready.length === 0) return undefined;
      if (ready.length === 1) return { agentId: ready[0]!.agentId };
      // Two distinct indices, uniform (Floyd's sampling of two from n).
      const i = Math.floor(random() * ready.length);
      let j = Math.floor(random() * (ready.length - 1));
      if (j >= i) j++;
      const a = ready[i]!;
      const b = ready[j]!;
      return { agentId: (a.ewma.load(nowMs) <= b.ewma.load(nowMs) ? a : b).agentId };
    },
    onSend(attempt) {
      const e = members.get(attempt.request.data.model, attempt.agentId);
      if (!e) return;
      ofAttempt.set(attempt, e);
      e.ewma.start();
    },
    onAttemptEnd(attempt, _end: AttemptEnd<Rep>, nowMs) {
      // The handle drops however the attempt ended: answer, error or cancellation.
      const e = ofAttempt.get(attempt);
      if (!e) return;
      ofAttempt.delete(attempt);
      e.ewma.end(attempt.sentAt, nowMs);
    },
  };
}
