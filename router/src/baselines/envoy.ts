/**
 * `envoy`: an Envoy cluster per model with the LEAST_REQUEST policy, outlier detection, retries and
 * per-try timeouts.
 *
 * - LEAST_REQUEST (`source/extensions/load_balancing_policies/least_request/least_request_lb.cc`,
 *   formerly `source/common/upstream/load_balancer_impl.cc`): when every host has the same weight, P2C
 *   (choice_count 2) on active requests; otherwise an earliest-deadline-first schedule
 *   (`source/common/upstream/edf_scheduler.h`) where a host's weight is
 *   load_balancing_weight ÷ (active requests + 1)^active_request_bias (bias 1.0), computed when the host
 *   is picked and put back. Weights are Envoy's integers 1–128, set from the agent's announced capacity
 *   (workers ÷ latency), scaled to the largest. Only healthy (not ejected) hosts are scheduled, unless
 *   fewer than 50 % are (panic mode, `healthy_panic_threshold`).
 * - Outlier detection (`source/common/upstream/outlier_detection_impl.cc`) with Envoy's defaults:
 *   consecutive_5xx 5 (a per-try timeout counts, as local-origin errors are not split by default),
 *   success-rate ejection every interval (10 s) for hosts with ≥ 100 requests when ≥ 5 hosts qualify,
 *   below mean − 1.9 σ; ejection for base_ejection_time (30 s) × times ejected, at most 300 s, the
 *   multiplier falling back while the host stays healthy; at most max_ejection_percent (10 %) ejected.
 * - Retries (the common route config): retry_on 5xx, reset, connect-failure, num_retries 2, the
 *   previous_hosts predicate (never the same host twice, as the engine does), per_try_timeout a third
 *   of the route timeout (the request's deadline), and a retry budget of 20 % of active requests with a
 *   minimum concurrency of 3 (`retry_budget` defaults). A timed-out try is reset (it stops counting as
 *   active), but the engine still takes its late answer; Envoy's 25 ms jittered retry back-off is not
 *   modelled. No hedging (hedge_on_per_try_timeout is off by default).
 */
import type { Attempt, AttemptBudget, AttemptEnd, EngineRequest } from '@edge-mesh/client';
import { ERROR_CODES } from '@edge-mesh/protocol';
import type { RouterAsk } from '../policy.ts';
import { type BaselinePolicy, type BaselineReply, type Endpoint, Membership } from './common.ts';

interface EnvoyHost extends Endpoint {
  active: number;
  consecutive5xx: number;
  ok: number;
  failed: number;
  ejected: boolean;
  ejectedAtMs: number;
  timesEjected: number;
  /** EDF deadline in the model's schedule. */
  deadline: number;
  seq: number;
}

interface Schedule {
  builtVersion: number;
  hosts: EnvoyHost[];
  weights: Map<EnvoyHost, number>;
  allEqual: boolean;
  current: number;
  seq: number;
}

export interface EnvoyOptions {
  name?: string;
  random: () => number;
  activeRequestBias?: number;
  numRetries?: number;
  consecutive5xx?: number;
  intervalMs?: number;
  baseEjectionMs?: number;
  maxEjectionMs?: number;
  maxEjectionPercent?: number;
  nowMs?: number;
}

export function createEnvoyPolicy<Rep extends BaselineReply = BaselineReply>(options: EnvoyOptions): BaselinePolicy<Rep> {
  const {
    random,
    activeRequestBias = 1,
    numRetries = 2,
    consecutive5xx = 5,
    intervalMs = 10_000,
    baseEjectionMs = 30_000,
    maxEjectionMs = 300_000,
    maxEjectionPercent = 10,
    nowMs: t0 = 0,
  } = options;
  const members = new Membership<EnvoyHost>((agentId, _model, info) => ({
    agentId,
    workers: info.workers,
    latencyMs: info.latencyMs,
    weight: info.workers / info.latencyMs,
    active: 0,
    consecutive5xx: 0,
    ok: 0,
    failed: 0,
    ejected: false,
    ejectedAtMs: 0,
    timesEjected: 0,
    deadline: 0,
    seq: 0,
  }));
  const schedules = new Map<string, Schedule>();
  const ofAttempt = new WeakMap<Attempt<RouterAsk>, EnvoyHost>();
  const reset = new WeakSet<Attempt<RouterAsk>>();
  let healthVersion = 0;
  let nextIntervalMs = t0 + intervalMs;

  let activeRequests = 0;
  let activeRetries = 0;
  const budget: AttemptBudget = {
    onRequest: () => {
      activeRequests++;
    },
    onRequestDone: () => {
      activeRequests = Math.max(0, activeRequests - 1);
    },
    take(purpose) {
      if (purpose !== 'retry') return false;
      if (activeRetries >= Math.max(3, 0.2 * activeRequests)) return false;
      activeRetries++;
      return true;
    },
    onExtraDone: () => {
      activeRetries = Math.max(0, activeRetries - 1);
    },
  };

  const eject = (host: EnvoyHost, model: string, nowMs: number): void => {
    const hosts = members.endpoints(model);
    const ejected = hosts.reduce((n, h) => n + (h.ejected ? 1 : 0), 0);
    if ((100 * ejected) / hosts.length >= maxEjectionPercent) return;
    host.ejected = true;
    host.ejectedAtMs = nowMs;
    host.timesEjected++;
    host.consecutive5xx = 0;
    healthVersion++;
  };

  /** The outlier detector's interval timer: unejections, success-rate ejections, counters reset. */
  const runIntervals = (nowMs: number): void => {
    while (nowMs >= nextIntervalMs) {
      const tick = nextIntervalMs;
      nextIntervalMs += intervalMs;
      for (const [model, hosts] of members.byModel) {
        for (const h of hosts) {
          if (h.ejected && tick >= h.ejectedAtMs + Math.min(maxEjectionMs, baseEjectionMs * h.timesEjected)) {
            h.ejected = false;
            healthVersion++;
          } else if (!h.ejected && h.timesEjected > 0) h.timesEjected--;
        }
        const rated = hosts.filter((h) => h.ok + h.failed >= 100);
        if (rated.length >= 5) {
          const rates = rated.map((h) => h.ok / (h.ok + h.failed));
          const mean = rates.reduce((s, r) => s + r, 0) / rates.length;
          const sd = Math.sqrt(rates.reduce((s, r) => s + (r - mean) ** 2, 0) / rates.length);
          rated.forEach((h, i) => {
            if (!h.ejected && rates[i]! < mean - 1.9 * sd) eject(h, model, tick);
          });
        }
        for (const h of hosts) {
          h.ok = 0;
          h.failed = 0;
        }
      }
    }
  };

  const scheduleFor = (model: string): Schedule => {
    let s = schedules.get(model);
    const version = members.version * 1_000_003 + healthVersion;
    if (s && s.builtVersion === version) return s;
    const all = members.endpoints(model);
    const healthy = all.filter((h) => !h.ejected);
    const hosts = healthy.length >= 0.5 * all.length ? healthy : [...all];
    const max = hosts.reduce((m, h) => Math.max(m, h.weight), 0);
    const weights = new Map<EnvoyHost, number>();
    for (const h of hosts) weights.set(h, Math.max(1, Math.min(128, Math.round((128 * h.weight) / max))));
    const first = hosts.length ? weights.get(hosts[0]!)! : 0;
    s = { builtVersion: version, hosts, weights, allEqual: hosts.every((h) => weights.get(h) === first), current: 0, seq: 0 };
    // A random start, so schedules built at the same moment do not pick in lockstep.
    for (const h of hosts) {
      h.deadline = random() / weights.get(h)!;
      h.seq = s.seq++;
    }
    schedules.set(model, s);
    return s;
  };

  /** EDF pick-and-add: the earliest deadline goes, and comes back at that time + 1 ÷ its weight now. */
  const edfPick = (s: Schedule): EnvoyHost => {
    let best = s.hosts[0]!;
    for (const h of s.hosts) if (h.deadline < best.deadline || (h.deadline === best.deadline && h.seq < best.seq)) best = h;
    s.current = best.deadline;
    const w = s.weights.get(best)! / (best.active + 1) ** activeRequestBias;
    best.deadline = s.current + 1 / w;
    best.seq = s.seq++;
    return best;
  };

  const p2cPick = (s: Schedule): EnvoyHost => {
    const n = s.hosts.length;
    let selected = s.hosts[Math.floor(random() * n)]!;
    const candidate = s.hosts[Math.floor(random() * n)]!;
    if (candidate.active < selected.active) selected = candidate;
    return selected;
  };

  const failure = (host: EnvoyHost, model: string, nowMs: number): void => {
    host.failed++;
    host.consecutive5xx++;
    if (!host.ejected && host.consecutive5xx >= consecutive5xx) eject(host, model, nowMs);
  };

  return {
    name: options.name ?? 'envoy',
    maxAttempts: numRetries + 1,
    budget,
    retryable: (code) => ERROR_CODES[code].retryable,
    onStatus: (status) => members.onStatus(status),
    onLoad() {},
    pick(request: EngineRequest<RouterAsk>, tried, _kind, nowMs) {
      runIntervals(nowMs);
      const model = request.data.model;
      const s = scheduleFor(model);
      if (s.hosts.length === 0) return undefined;
      const perTryTimeoutMs = (request.deadlineAt - request.startedAt) / (numRetries + 1);
      // host_selection_retry_max_attempts: re-pick while the previous_hosts predicate rejects the host.
      for (let t = 0; t < 5; t++) {
        const h = s.allEqual ? p2cPick(s) : edfPick(s);
        if (!tried.has(h.agentId)) return { agentId: h.agentId, timeoutMs: perTryTimeoutMs };
      }
      const rest = s.hosts.filter((h) => !tried.has(h.agentId));
      if (rest.length === 0) return undefined;
      return { agentId: rest[Math.floor(random() * rest.length)]!.agentId, timeoutMs: perTryTimeoutMs };
    },
    onSend(attempt) {
      const h = members.get(attempt.request.data.model, attempt.agentId);
      if (!h) return;
      ofAttempt.set(attempt, h);
      h.active++;
    },
    onTimeout(attempt, nowMs) {
      const h = ofAttempt.get(attempt);
      if (!h || reset.has(attempt)) return;
      reset.add(attempt);
      h.active = Math.max(0, h.active - 1);
      failure(h, attempt.request.data.model, nowMs);
    },
    onAttemptEnd(attempt, end: AttemptEnd<Rep>, nowMs) {
      const h = ofAttempt.get(attempt);
      if (!h) return;
      ofAttempt.delete(attempt);
      if (reset.has(attempt)) return;
      h.active = Math.max(0, h.active - 1);
      if (end.kind === 'reply') {
        h.ok++;
        h.consecutive5xx = 0;
      } else if (end.kind === 'error') failure(h, attempt.request.data.model, nowMs);
    },
  };
}
