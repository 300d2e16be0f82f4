/**
 * The one request engine (docs/routing.md, "The request engine"): everything that happens to one
 * request between its first attempt and its answer, the same for the SDK, the router and the
 * simulator. Which agent to try and how long to wait is the policy's to say; the engine owns the rules:
 *
 * - **One deadline.** The request fails with MESH_DEADLINE_EXCEEDED (its last error as the cause) when
 *   no answer came in time; every attempt still running is then cancelled.
 * - **Failover and retries.** An attempt that fails with a code the error table marks `retryable`
 *   moves to another agent: for free when the work was lost with its agent (MESH_AGENT_LOST,
 *   MESH_SHUTTING_DOWN: it never ran), else as a retry paid from the budget. Any other code ends the
 *   request, at once when no other attempt of it is running; else the request launches no more attempts
 *   and waits for those (one agent's word cannot fail a request another agent is answering). A failed
 *   publish is MESH_NOT_CONNECTED, retryable like any other.
 * - **Per-try timeouts.** An attempt the policy gives a timeout counts as failed (MESH_TIMEOUT) when it
 *   runs over; a retry goes out, and the slow attempt keeps running: its late answer still wins.
 * - **Hedges.** After the policy's hedge delay, a slow attempt is backed up on another agent; the
 *   first answer wins and the loser is cancelled. At most `maxHedges` per request (default one, as a
 *   backup request is one request), paid from the budget, and only when the policy allows it now.
 * - **Shed what cannot be met.** When the policy says how fast the quickest agent left could answer (`floorMs`) and
 *   less time than that is left, no attempt goes out: the request fails at once with MESH_OVERLOADED (or the last
 *   agent's error) instead of waiting for a deadline it cannot meet. An agent's own admission refusal
 *   (MESH_OVERLOADED) moves the request on as a free failover, like MESH_SHUTTING_DOWN: the work never started.
 * - **Never twice to one agent**, at most `maxAttempts` agents per request, all retries and hedges
 *   within the budget.
 * - **Dead agents.** An agent's last will (or a new session) ends its attempts at once, a free failover
 *   each (`agentLost`). An agent gone silent, whose will may not come for a keep-alive and a half, is
 *   presumed dead as soon as the `liveness` check says so: each of its attempts moves on as a free
 *   failover too, but keeps running, so a late answer from it still wins (once).
 *
 * No I/O and no clock of its own: `transport` sends and cancels, `clock` says the time and runs the
 * timers (real ones in the SDK and the router, virtual ones in the simulator). Callbacks, not promises,
 * so a discrete-event simulation can run it synchronously.
 */
import { ERROR_CODES, encodeMessage, MeshError, type MeshErrorCode, PROTOCOL_VERSION, topics } from '@edge-mesh/protocol';
import type { MqttClient } from 'mqtt';
import { extraAttemptAfter } from './budget.ts';

export type AttemptKind = 'first' | 'failover' | 'retry' | 'hedge';

/** The policy's choice for one attempt. Times are milliseconds from the moment it is sent. */
export interface AttemptPlan {
  agentId: string;
  /** What the policy expects the attempt to take (for its own bookkeeping and the caller's timings). */
  predictedMs?: number;
  /** Count the attempt as failed after this long (and retry); absent: no per-try timeout. */
  timeoutMs?: number;
  /** Back the attempt up on another agent after this long; absent: never hedge it. */
  hedgeAfterMs?: number;
}

export interface EngineRequest<Req> {
  /** Unique per request (the hex request id on the wire). */
  readonly key: string;
  /** Absolute, in the engine clock's milliseconds. */
  readonly deadlineAt: number;
  readonly startedAt: number;
  /** What the policy and the transport need to know about the request. */
  readonly data: Req;
  /** Agents per request for this one (default: the engine's `maxAttempts`). */
  readonly maxAttempts: number;
  /** The model, for error messages and details. */
  readonly model: string | undefined;
}

export interface Attempt<Req> {
  readonly request: EngineRequest<Req>;
  readonly agentId: string;
  readonly kind: AttemptKind;
  /** 0 for the request's first attempt, then 1, 2, … in the order they were sent. */
  readonly index: number;
  /** A retry or hedge, paid from the budget (a failover is free). */
  readonly paid: boolean;
  readonly sentAt: number;
  readonly plan: AttemptPlan;
  /** The per-try timeout fired; the attempt still runs and may still win. */
  timedOut: boolean;
}

/** How an attempt ended, as the policy learns it. */
export type AttemptEnd<Rep> =
  | { kind: 'reply'; reply: Rep }
  | { kind: 'error'; error: MeshError }
  | { kind: 'cancelled'; reason: 'answered-elsewhere' | 'request-failed' | 'closed' };

export interface EnginePolicy<Req, Rep> {
  /**
   * An agent not in `tried` for this attempt, or undefined when there is none. May throw a MeshError
   * that says why (it becomes the request's error if nothing else answers).
   */
  pick(request: EngineRequest<Req>, tried: ReadonlySet<string>, kind: AttemptKind, now: number): AttemptPlan | undefined;
  /**
   * The least time, ms, any agent not in `tried` could take to answer (its service time with no queue); undefined
   * when not known. With less than this left before the deadline, no attempt is sent (see "Shed what cannot be met").
   */
  floorMs?(request: EngineRequest<Req>, tried: ReadonlySet<string>, now: number): number | undefined;
  /** Whether a hedge may start now (for example: not while the fleet is nearly saturated). */
  mayHedge?(request: EngineRequest<Req>, now: number): boolean;
  onSend?(attempt: Attempt<Req>, now: number): void;
  onTimeout?(attempt: Attempt<Req>, now: number): void;
  onAttemptEnd?(attempt: Attempt<Req>, end: AttemptEnd<Rep>, now: number): void;
  /**
   * After this error, try the same agent again once the returned promise settles, instead of moving
   * on (once per agent and request): the SDK uses it when an agent waits for a voucher that is on its way.
   */
  retrySameAfter?(attempt: Attempt<Req>, error: MeshError): Promise<unknown> | undefined;
}

export interface EngineTransport<Req> {
  /** Sends the attempt. A failure to send is reported back with `engine.fail(key, agentId, error)`. */
  send(attempt: Attempt<Req>): void;
  /** Tells the agent to drop the attempt (best effort). */
  cancel(attempt: Attempt<Req>): void;
}

export interface EngineClock {
  /** Milliseconds; any origin, but the deadlines passed in must use the same one. */
  now(): number;
  setTimer(delayMs: number, fire: () => void): unknown;
  clearTimer(timer: unknown): void;
}

/** What pays for retries and hedges (TailBudget in budget.ts, or a baseline's own rule in the simulator). */
export interface AttemptBudget {
  onRequest(nowMs: number): void;
  onRequestDone(): void;
  take(purpose: 'retry' | 'hedge', nowMs: number): boolean;
  onExtraDone(): void;
}

export type Outcome<Req, Rep> =
  | { ok: true; reply: Rep; attempt: Attempt<Req>; tried: readonly string[]; hedged: boolean }
  | { ok: false; error: MeshError; tried: readonly string[]; hedged: boolean };

export interface EngineCounters {
  requests: number;
  ok: number;
  failed: number;
  failovers: number;
  retries: number;
  hedges: number;
  timeouts: number;
  cancels: number;
  /** Retries and hedges refused by the budget or by the policy's `mayHedge`. */
  refused: number;
  /** Attempts given up because their agent went silent (the `liveness` check); each moved on as a failover. */
  silent: number;
  /** Attempts not sent because less time was left than the policy's `floorMs` (first attempts, failovers, retries, hedges). */
  shed: number;
  /** Attempts sent again to the same agent after the sender's connection came back (resendInFlight). */
  resent: number;
}

/** Which agents are presumed dead before their last will arrives (see RequestEngineOptions.liveness). */
export interface EngineLiveness {
  /** For example the fleet view's `silent`: no heartbeat or reply for a few heartbeat periods. */
  isSilent(agentId: string, now: number): boolean;
  /** How often attempts in flight are checked, ms (default 250). */
  checkEveryMs?: number;
}

export interface RequestEngineOptions<Req, Rep> {
  policy: EnginePolicy<Req, Rep>;
  transport: EngineTransport<Req>;
  clock: EngineClock;
  /** Without one, retries and hedges are never refused for want of budget. */
  budget?: AttemptBudget;
  /** Agents per request, the first included (default 3). */
  maxAttempts?: number;
  /** Hedges per request (default 1). */
  maxHedges?: number;
  /** Whether another agent may succeed after this code (default: the error table's `retryable`). */
  retryable?: (code: MeshErrorCode) => boolean;
  /**
   * Heartbeat silence. While attempts are in flight, every `checkEveryMs` each agent holding one is
   * asked about: an attempt at a silent agent counts as failed at once (MESH_TIMEOUT; it keeps running
   * and its late answer still wins) and, unless another attempt of its request is still running, a
   * failover goes out, free like the one after a last will: an agent could get that one by dropping its
   * connection anyway, so faking death by silence earns a liar nothing more, while charging the budget
   * would fail the work of an agent that really died with more requests than the budget holds. A check
   * that runs a whole period late (this process stalled, and what agents sent meanwhile may not be read yet)
   * judges nobody; the next one, a period later, judges however late it runs. So a process whose loop lags a
   * period on every turn (a busy router) still finds silent agents, a period later.
   */
  liveness?: EngineLiveness;
}

export interface StartOptions<Req> {
  key: string;
  /** Absolute deadline in the clock's milliseconds. */
  deadlineAt: number;
  data: Req;
  /** Agents for this request (1 pins it to the first choice: no failover, retry or hedge). */
  maxAttempts?: number;
  /** The model, for error messages and details. */
  model?: string;
}

export interface RequestEngine<Req, Rep> {
  /** Starts a request; `done` is called exactly once, possibly before `start` returns. */
  start(request: StartOptions<Req>, done: (outcome: Outcome<Req, Rep>) => void): void;
  /** An agent's answer. Ignored unless the request is pending and has an attempt at that agent. */
  answer(key: string, agentId: string, reply: Rep): void;
  /** An attempt's failure: the agent's coded error, or the transport's. Same rule as `answer`. */
  fail(key: string, agentId: string, error: MeshError): void;
  /**
   * The sender could not publish the attempt (its own connection is down): the attempt is kept for resendInFlight, and
   * its agent is not used up; its timers and the deadline still bound it.
   */
  unsent(key: string, agentId: string, error: MeshError): void;
  /** Fails every pending attempt at this agent (it went offline or restarted): a free failover each. */
  agentLost(agentId: string, error?: MeshError): void;
  /** Ends a pending request with `error` at once, as its sender gave up on it: every attempt still running is cancelled. */
  abort(key: string, error: MeshError): void;
  /** Pending requests with an attempt at this agent. */
  attemptsAt(agentId: string): number;
  /**
   * The sender's own connection is back (and subscribed): every attempt still in flight is sent again, to the same agent
   * with the same request id, since its request or its reply may have been lost with the connection. An agent answers a
   * request it already served with the same reply, so nothing runs or is billed twice. Returns how many were sent.
   */
  resendInFlight(): number;
  readonly pending: number;
  readonly counters: Readonly<EngineCounters>;
  /** Fails every pending request with `error` (MESH_NOT_CONNECTED by default). */
  close(error?: MeshError): void;
}

const defaultRetryable = (code: MeshErrorCode): boolean => ERROR_CODES[code].retryable;

interface MutableAttempt<Req> extends Attempt<Req> {
  timer: unknown;
  /** Its agent was judged silent (once per attempt). */
  silent?: boolean;
  /** Its publish failed with the sender's connection: kept, to be sent again when the connection is back. */
  unsent?: boolean;
}

interface RequestState<Req, Rep> {
  request: EngineRequest<Req>;
  attempts: Map<string, MutableAttempt<Req>>;
  tried: Set<string>;
  order: string[];
  sent: number;
  hedges: number;
  hedgeTimer: unknown;
  deadlineTimer: unknown;
  lastError: MeshError | undefined;
  /**
   * The first final (not retryable) error an agent answered while another attempt of the request was still
   * running: the request waits for those attempts, launches no more, and fails with it when none answers.
   */
  refusal: MeshError | undefined;
  retriedSame: Set<string>;
  done: boolean;
  finish: (outcome: Outcome<Req, Rep>) => void;
}

export function createRequestEngine<Req, Rep>(options: RequestEngineOptions<Req, Rep>): RequestEngine<Req, Rep> {
  const { policy, transport, clock, budget, maxAttempts = 3, maxHedges = 1, retryable = defaultRetryable, liveness } = options;
  if (!Number.isInteger(maxAttempts) || maxAttempts < 1)
    throw new MeshError('MESH_CONFIG', `maxAttempts must be a positive integer, got ${maxAttempts}`);
  if (!Number.isInteger(maxHedges) || maxHedges < 0)
    throw new MeshError('MESH_CONFIG', `maxHedges must be a non-negative integer, got ${maxHedges}`);
  const pending = new Map<string, RequestState<Req, Rep>>();
  const counters: EngineCounters = {
    requests: 0,
    ok: 0,
    failed: 0,
    failovers: 0,
    retries: 0,
    hedges: 0,
    timeouts: 0,
    cancels: 0,
    refused: 0,
    silent: 0,
    shed: 0,
    resent: 0,
  };
  /** Runs while requests are pending, when there is a `liveness` check. */
  let livenessTimer: unknown;

  const clear = (timer: unknown) => {
    if (timer !== undefined) clock.clearTimer(timer);
  };

  /** Removes an attempt from its request; the caller tells the policy how it ended. */
  const endAttempt = (state: RequestState<Req, Rep>, attempt: MutableAttempt<Req>) => {
    state.attempts.delete(attempt.agentId);
    clear(attempt.timer);
    attempt.timer = undefined;
    if (attempt.paid) budget?.onExtraDone();
  };

  const finish = (
    state: RequestState<Req, Rep>,
    result: { ok: true; reply: Rep; attempt: Attempt<Req> } | { ok: false; error: MeshError },
  ) => {
    if (state.done) return;
    state.done = true;
    pending.delete(state.request.key);
    if (pending.size === 0 && livenessTimer !== undefined) {
      clock.clearTimer(livenessTimer);
      livenessTimer = undefined;
    }
    budget?.onRequestDone();
    clear(state.deadlineTimer);
    clear(state.hedgeTimer);
    const now = clock.now();
    for (const attempt of [...state.attempts.values()]) {
      endAttempt(state, attempt);
      counters.cancels++;
      transport.cancel(attempt);
      policy.onAttemptEnd?.(attempt, { kind: 'cancelled', reason: result.ok ? 'answered-elsewhere' : 'request-failed' }, now);
    }
    const hedged = state.hedges > 0;
    if (result.ok) {
      counters.ok++;
      state.finish({ ok: true, reply: result.reply, attempt: result.attempt, tried: state.order, hedged });
    } else {
      counters.failed++;
      state.finish({ ok: false, error: result.error, tried: state.order, hedged });
    }
  };

  /** Ends the request with the error that best says why nothing answered. */
  const failNow = (state: RequestState<Req, Rep>, deadlinePassed = false) => {
    const { request, lastError } = state;
    const what = request.model ?? 'the request';
    const details = { ...(request.model !== undefined ? { model: request.model } : {}), tried: [...state.order] };
    // The deadline timer may fire a fraction of a millisecond before the clock reads the deadline.
    if (deadlinePassed || clock.now() >= request.deadlineAt) {
      const last = lastError ? ` (last: ${lastError.code})` : '';
      const budgetMs = Math.round(request.deadlineAt - request.startedAt);
      finish(state, {
        ok: false,
        error: new MeshError('MESH_DEADLINE_EXCEEDED', `no result for ${what} within ${budgetMs} ms${last}`, { cause: lastError, details }),
      });
    } else if (state.refusal ?? lastError) finish(state, { ok: false, error: (state.refusal ?? lastError)! });
    else
      finish(state, {
        ok: false,
        error: new MeshError('MESH_NO_AGENT', `no live agent serves ${request.model === undefined ? 'the request' : `model ${what}`}`, {
          details,
        }),
      });
  };

  /** Starts one attempt; false when there is no agent left, no budget, no time or no attempts left. */
  const launch = (state: RequestState<Req, Rep>, kind: AttemptKind): boolean => {
    const { request } = state;
    const now = clock.now();
    if (state.done || state.refusal || state.tried.size >= request.maxAttempts || now >= request.deadlineAt) return false;
    const remainingMs = request.deadlineAt - now;
    const floorMs = policy.floorMs?.(request, state.tried, now);
    if (floorMs !== undefined && floorMs > remainingMs) {
      counters.shed++;
      if (kind !== 'hedge') {
        state.lastError ??= new MeshError(
          'MESH_OVERLOADED',
          `no agent can answer ${request.model ?? 'the request'} in the ${Math.floor(remainingMs)} ms left (the fastest takes about ${Math.ceil(floorMs)} ms)`,
          { details: { floorMs: Math.ceil(floorMs), remainingMs: Math.floor(remainingMs) } },
        );
      }
      return false;
    }
    let plan: AttemptPlan | undefined;
    try {
      plan = policy.pick(request, state.tried, kind, now);
    } catch (err) {
      if (kind !== 'hedge' && err instanceof MeshError) state.lastError ??= err;
      else if (!(err instanceof MeshError)) throw err;
      return false;
    }
    if (!plan || state.tried.has(plan.agentId)) return false;
    const paid = kind === 'retry' || kind === 'hedge';
    if (paid && budget && !budget.take(kind, now)) {
      counters.refused++;
      return false;
    }
    const attempt: MutableAttempt<Req> = {
      request,
      agentId: plan.agentId,
      kind,
      index: state.sent++,
      paid,
      sentAt: now,
      plan,
      timedOut: false,
      timer: undefined,
    };
    state.tried.add(plan.agentId);
    state.order.push(plan.agentId);
    state.attempts.set(plan.agentId, attempt);
    if (kind === 'failover') counters.failovers++;
    else if (kind === 'retry') counters.retries++;
    else if (kind === 'hedge') {
      counters.hedges++;
      state.hedges++;
    }
    const remaining = request.deadlineAt - now;
    if (plan.timeoutMs !== undefined && plan.timeoutMs < remaining) {
      attempt.timer = clock.setTimer(Math.max(0, plan.timeoutMs), () => onTimeout(state, attempt));
    }
    if (kind !== 'hedge' && state.hedges < maxHedges && plan.hedgeAfterMs !== undefined && plan.hedgeAfterMs < remaining) {
      clear(state.hedgeTimer);
      state.hedgeTimer = clock.setTimer(Math.max(0, plan.hedgeAfterMs), () => onHedgeDue(state, attempt));
    }
    policy.onSend?.(attempt, now);
    try {
      transport.send(attempt);
    } catch (err) {
      const error =
        err instanceof MeshError ? err : new MeshError('MESH_NOT_CONNECTED', `send failed: ${(err as Error).message}`, { cause: err });
      onFailure(state, attempt.agentId, error, true);
    }
    return true;
  };

  const onTimeout = (state: RequestState<Req, Rep>, attempt: MutableAttempt<Req>) => {
    attempt.timer = undefined;
    if (state.done || state.attempts.get(attempt.agentId) !== attempt) return;
    attempt.timedOut = true;
    counters.timeouts++;
    policy.onTimeout?.(attempt, clock.now());
    state.lastError = new MeshError(
      'MESH_TIMEOUT',
      `agent ${attempt.agentId} did not answer within ${Math.round(attempt.plan.timeoutMs ?? 0)} ms`,
      {
        details: { agentId: attempt.agentId },
      },
    );
    if (retryable('MESH_TIMEOUT')) launch(state, 'retry');
  };

  /**
   * The attempt's agent went silent: its per-try timeout, now (unless that fired already), and a failover
   * unless another attempt still runs. An attempt that timed out earlier and whose retry the budget
   * refused is moved on here too: its agent is presumed dead now, not merely slow.
   */
  const onSilent = (state: RequestState<Req, Rep>, attempt: MutableAttempt<Req>, now: number) => {
    attempt.silent = true;
    counters.silent++;
    if (!attempt.timedOut) {
      clear(attempt.timer);
      attempt.timer = undefined;
      attempt.timedOut = true;
      policy.onTimeout?.(attempt, now);
    }
    state.lastError = new MeshError('MESH_TIMEOUT', `agent ${attempt.agentId} went silent (no heartbeat) with the request`, {
      details: { agentId: attempt.agentId },
    });
    const covered = [...state.attempts.values()].some((a) => a !== attempt && !a.timedOut);
    if (!covered) launch(state, 'failover');
  };

  const checkEveryMs = liveness?.checkEveryMs ?? 250;
  /** When the armed check is due; infinite for the check after a late one, which judges however late it runs. */
  let livenessDueAt = 0;
  const armLiveness = () => {
    if (!liveness || livenessTimer !== undefined || pending.size === 0) return;
    livenessDueAt = clock.now() + checkEveryMs;
    livenessTimer = clock.setTimer(checkEveryMs, checkLiveness);
  };
  const checkLiveness = () => {
    livenessTimer = undefined;
    const now = clock.now();
    // Fired a whole period late: this process was stalled and the messages it missed may still be queued; the next
    // check, a period on, when they have been read, judges however late it fires. Skipping every late check left a
    // loop that lags a period on every turn judging nobody, ever.
    if (now - livenessDueAt > checkEveryMs) {
      armLiveness();
      livenessDueAt = Number.POSITIVE_INFINITY;
      return;
    }
    const verdicts = new Map<string, boolean>();
    for (const state of [...pending.values()]) {
      for (const attempt of [...state.attempts.values()]) {
        if (state.done || attempt.silent) continue;
        let silent = verdicts.get(attempt.agentId);
        if (silent === undefined) {
          silent = liveness!.isSilent(attempt.agentId, now);
          verdicts.set(attempt.agentId, silent);
        }
        if (silent) onSilent(state, attempt, now);
      }
    }
    armLiveness();
  };

  const onHedgeDue = (state: RequestState<Req, Rep>, slow: MutableAttempt<Req>) => {
    state.hedgeTimer = undefined;
    if (state.done || state.attempts.get(slow.agentId) !== slow) return;
    if (policy.mayHedge && !policy.mayHedge(state.request, clock.now())) {
      counters.refused++;
      return;
    }
    launch(state, 'hedge');
  };

  const onFailure = (state: RequestState<Req, Rep>, agentId: string, error: MeshError, unsent = false) => {
    const attempt = state.attempts.get(agentId);
    if (state.done || !attempt) return;
    // The sender's connection failed, not the agent: the attempt waits for the connection (resendInFlight), bounded by
    // its timers and the deadline, instead of using the agent up.
    if (unsent) {
      attempt.unsent = true;
      state.lastError = error;
      return;
    }
    endAttempt(state, attempt);
    policy.onAttemptEnd?.(attempt, { kind: 'error', error }, clock.now());
    state.lastError = error;
    if (!state.retriedSame.has(agentId)) {
      const wait = policy.retrySameAfter?.(attempt, error);
      if (wait) {
        state.retriedSame.add(agentId);
        state.tried.delete(agentId);
        const again = () => {
          if (!state.done && !launch(state, 'failover') && state.attempts.size === 0) failNow(state);
        };
        wait.then(again, again);
        return;
      }
    }
    if (!retryable(error.code) || state.refusal) {
      // One agent's final word does not end a request that another agent is still working on: an agent that
      // answered hedges with a made-up final code would otherwise fail requests an honest one was about to
      // answer. The request waits for the attempts still running and fails with that word if none answers.
      if (state.attempts.size > 0) {
        state.refusal ??= error;
        return;
      }
      finish(state, { ok: false, error: state.refusal ?? error });
      return;
    }
    if (!launch(state, extraAttemptAfter(error.code)) && state.attempts.size === 0) failNow(state);
  };

  const start = (options: StartOptions<Req>, done: (outcome: Outcome<Req, Rep>) => void): void => {
    if (pending.has(options.key)) throw new MeshError('MESH_BAD_REQUEST', `request ${options.key} is already in flight`);
    const now = clock.now();
    const request: EngineRequest<Req> = {
      key: options.key,
      deadlineAt: options.deadlineAt,
      startedAt: now,
      data: options.data,
      maxAttempts: Math.max(1, Math.min(options.maxAttempts ?? maxAttempts, maxAttempts)),
      model: options.model,
    };
    const state: RequestState<Req, Rep> = {
      request,
      attempts: new Map(),
      tried: new Set(),
      order: [],
      sent: 0,
      hedges: 0,
      hedgeTimer: undefined,
      deadlineTimer: undefined,
      lastError: undefined,
      refusal: undefined,
      retriedSame: new Set(),
      done: false,
      finish: done,
    };
    counters.requests++;
    pending.set(request.key, state);
    budget?.onRequest(now);
    state.deadlineTimer = clock.setTimer(Math.max(0, request.deadlineAt - now), () => {
      state.deadlineTimer = undefined;
      if (!state.done) failNow(state, true);
    });
    if (!launch(state, 'first') && state.attempts.size === 0) failNow(state);
    armLiveness();
  };

  return {
    start,
    answer(key, agentId, reply) {
      const state = pending.get(key);
      const attempt = state?.attempts.get(agentId);
      if (!state || !attempt) return;
      endAttempt(state, attempt);
      policy.onAttemptEnd?.(attempt, { kind: 'reply', reply }, clock.now());
      finish(state, { ok: true, reply, attempt });
    },
    fail(key, agentId, error) {
      const state = pending.get(key);
      if (state) onFailure(state, agentId, error);
    },
    unsent(key, agentId, error) {
      const state = pending.get(key);
      if (state) onFailure(state, agentId, error, true);
    },
    abort(key, error) {
      const state = pending.get(key);
      if (state) finish(state, { ok: false, error });
    },
    agentLost(agentId, error) {
      const lost = error ?? new MeshError('MESH_AGENT_LOST', `agent ${agentId} went offline`, { details: { agentId } });
      for (const state of [...pending.values()]) if (state.attempts.has(agentId)) onFailure(state, agentId, lost);
    },
    resendInFlight() {
      let n = 0;
      for (const state of [...pending.values()]) {
        for (const attempt of [...state.attempts.values()]) {
          if (state.done) break;
          attempt.unsent = false;
          n++;
          try {
            transport.send(attempt);
          } catch (err) {
            attempt.unsent = true;
            if (!(err instanceof MeshError)) throw err;
          }
        }
      }
      counters.resent += n;
      return n;
    },
    attemptsAt(agentId) {
      let n = 0;
      for (const state of pending.values()) if (state.attempts.has(agentId)) n++;
      return n;
    },
    get pending() {
      return pending.size;
    },
    counters,
    close(error) {
      const err = error ?? new MeshError('MESH_NOT_CONNECTED', 'the client closed');
      if (livenessTimer !== undefined) clock.clearTimer(livenessTimer);
      livenessTimer = undefined;
      for (const state of [...pending.values()]) {
        const now = clock.now();
        for (const attempt of [...state.attempts.values()]) {
          endAttempt(state, attempt);
          policy.onAttemptEnd?.(attempt, { kind: 'cancelled', reason: 'closed' }, now);
        }
        finish(state, { ok: false, error: err });
      }
    },
  };
}

/** The timers of this process for the engine: `now` is epoch-aligned and sub-millisecond. */
export const systemClock: EngineClock = {
  now: () => performance.timeOrigin + performance.now(),
  setTimer: (delayMs, fire) => setTimeout(fire, delayMs),
  clearTimer: (timer) => clearTimeout(timer as NodeJS.Timeout),
};

/**
 * The engine's transport over MQTT, the same for every sender: a request on the agent's request topic
 * in this sender's name (at `qos`, default 1; a failed publish fails the attempt with MESH_NOT_CONNECTED), a
 * cancel on the agent's cancel topic at the same QoS. `client` is read at each call, so it may be set after the engine is built.
 */
export function mqttTransport<Req>(options: {
  client: () => MqttClient;
  senderId: string;
  qos?: 0 | 1;
  payload: (attempt: Attempt<Req>) => Uint8Array;
  onSendFailed: (attempt: Attempt<Req>, error: MeshError) => void;
}): EngineTransport<Req> {
  const { senderId } = options;
  const qos = options.qos ?? 1;
  return {
    send(attempt) {
      const bytes = options.payload(attempt);
      options
        .client()
        .publish(
          topics.agentRequest(attempt.agentId, senderId),
          Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength),
          { qos },
          (err) => {
            if (err) options.onSendFailed(attempt, new MeshError('MESH_NOT_CONNECTED', `publish failed: ${err.message}`, { cause: err }));
          },
        );
    },
    cancel(attempt) {
      const client = options.client();
      if (!client.connected) return;
      const cancel = encodeMessage({ v: PROTOCOL_VERSION, kind: 'cancel', id: Buffer.from(attempt.request.key, 'hex') });
      client.publish(topics.agentCancel(attempt.agentId, senderId), cancel, { qos });
    },
  };
}
