/**
 * The request engine on a fake clock: every rule in docs/routing.md ("The request engine"), and one
 * test per row of the table of behaviours the SDK and the router used to disagree on.
 */
import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import { ERROR_CODES, MeshError, type MeshErrorCode } from '@edge-mesh/protocol';
import {
  type Attempt,
  type AttemptEnd,
  type AttemptPlan,
  createRequestEngine,
  type EngineClock,
  type EnginePolicy,
  type Outcome,
  TailBudget,
} from '../src/index.ts';

/** Timers on virtual time: `advance` runs every timer due, in order. */
class FakeClock implements EngineClock {
  t = 0;
  private seq = 0;
  private timers = new Map<number, { at: number; fire: () => void }>();
  now = () => this.t;
  setTimer = (delayMs: number, fire: () => void) => {
    const id = ++this.seq;
    this.timers.set(id, { at: this.t + delayMs, fire });
    return id;
  };
  clearTimer = (id: unknown) => {
    this.timers.delete(id as number);
  };
  timersPending() {
    return this.timers.size;
  }
  advance(ms: number) {
    const until = this.t + ms;
    for (;;) {
      let next: [number, { at: number; fire: () => void }] | undefined;
      for (const entry of this.timers) if (entry[1].at <= until && (!next || entry[1].at < next[1].at)) next = entry;
      if (!next) break;
      this.timers.delete(next[0]);
      this.t = Math.max(this.t, next[1].at);
      next[1].fire();
    }
    this.t = until;
  }
}

type Req = { model: string };
type Rep = { value: string };

interface Rig {
  clock: FakeClock;
  engine: ReturnType<typeof createRequestEngine<Req, Rep>>;
  sent: Attempt<Req>[];
  cancelled: string[];
  ends: { agentId: string; end: AttemptEnd<Rep> }[];
  outcomes: Outcome<Req, Rep>[];
  start(key?: string, deadlineMs?: number, maxAttempts?: number): void;
}

/** Agents are picked in the order given, skipping those tried; `plan` adds timeouts and hedge delays. */
function rig(
  agents: string[],
  {
    plan = {},
    budget,
    maxAttempts,
    maxHedges,
    mayHedge,
    sendThrows,
    retrySameAfter,
    silent,
    floorMs,
  }: {
    plan?: Omit<AttemptPlan, 'agentId'>;
    budget?: TailBudget;
    maxAttempts?: number;
    maxHedges?: number;
    mayHedge?: () => boolean;
    sendThrows?: (a: Attempt<Req>) => boolean;
    retrySameAfter?: EnginePolicy<Req, Rep>['retrySameAfter'];
    /** Agents the liveness check calls silent. */
    silent?: Set<string>;
    /** The policy's floorMs: the fastest untried agent's service time. */
    floorMs?: (tried: ReadonlySet<string>) => number | undefined;
  } = {},
): Rig {
  const clock = new FakeClock();
  const sent: Attempt<Req>[] = [];
  const cancelled: string[] = [];
  const ends: Rig['ends'] = [];
  const outcomes: Outcome<Req, Rep>[] = [];
  const policy: EnginePolicy<Req, Rep> = {
    pick: (_r, tried) => {
      const agentId = agents.find((a) => !tried.has(a));
      return agentId === undefined ? undefined : { agentId, ...plan };
    },
    onAttemptEnd: (a, end) => ends.push({ agentId: a.agentId, end }),
    ...(mayHedge ? { mayHedge } : {}),
    ...(retrySameAfter ? { retrySameAfter } : {}),
    ...(floorMs ? { floorMs: (_r: unknown, tried: ReadonlySet<string>) => floorMs(tried) } : {}),
  };
  const engine = createRequestEngine<Req, Rep>({
    policy,
    transport: {
      send: (a) => {
        if (sendThrows?.(a)) throw new Error('socket closed');
        sent.push(a);
      },
      cancel: (a) => cancelled.push(a.agentId),
    },
    clock,
    ...(budget ? { budget } : {}),
    ...(maxAttempts !== undefined ? { maxAttempts } : {}),
    ...(maxHedges !== undefined ? { maxHedges } : {}),
    ...(silent ? { liveness: { isSilent: (agentId: string) => silent.has(agentId), checkEveryMs: 100 } } : {}),
  });
  return {
    clock,
    engine,
    sent,
    cancelled,
    ends,
    outcomes,
    start(key = 'r1', deadlineMs = 1_000, perRequest) {
      engine.start(
        { key, deadlineAt: clock.now() + deadlineMs, data: { model: 'kws' }, ...(perRequest ? { maxAttempts: perRequest } : {}) },
        (o) => outcomes.push(o),
      );
    },
  };
}

const coded = (code: MeshErrorCode) => new MeshError(code, `agent said ${code}`);

describe('the drift table, settled in one rule each', () => {
  test('per-try timeout: an attempt over its timeout is retried elsewhere and its late answer may still win', () => {
    const r = rig(['a', 'b', 'c'], { plan: { timeoutMs: 50 } });
    r.start();
    assert.deepEqual(
      r.sent.map((a) => a.agentId),
      ['a'],
    );
    r.clock.advance(49);
    assert.equal(r.sent.length, 1);
    r.clock.advance(1);
    assert.deepEqual(
      r.sent.map((a) => [a.agentId, a.kind]),
      [
        ['a', 'first'],
        ['b', 'retry'],
      ],
    );
    assert.equal(r.engine.counters.timeouts, 1);
    assert.equal(r.cancelled.length, 0, 'the slow attempt keeps running');
    r.engine.answer('r1', 'a', { value: 'late but first' });
    assert.equal(r.outcomes.length, 1);
    const o = r.outcomes[0]!;
    assert.ok(o.ok);
    assert.equal(o.reply.value, 'late but first');
    assert.equal(o.attempt.timedOut, true);
    assert.deepEqual(r.cancelled, ['b'], 'the retry lost and was cancelled');
  });

  test('codes retried on another agent: exactly those the error table marks retryable', () => {
    for (const code of Object.keys(ERROR_CODES) as MeshErrorCode[]) {
      const r = rig(['a', 'b']);
      r.start();
      r.engine.fail('r1', 'a', coded(code));
      if (ERROR_CODES[code].retryable) {
        assert.deepEqual(
          r.sent.map((a) => a.agentId),
          ['a', 'b'],
          `${code} is retryable: the request moves to b`,
        );
        assert.equal(r.outcomes.length, 0);
      } else {
        assert.equal(r.sent.length, 1, `${code} is final: no second attempt`);
        assert.equal(r.outcomes.length, 1);
        const o = r.outcomes[0]!;
        assert.ok(!o.ok);
        assert.equal(o.error.code, code);
      }
    }
  });

  test("a failed publish is the sender's connection, not the agent: the attempt waits and goes to the same agent again when the connection is back", () => {
    let down = true;
    const r = rig(['a', 'b'], { sendThrows: () => down });
    r.start('r1', 5_000);
    assert.equal(r.sent.length, 0, 'nothing went out');
    assert.equal(r.ends.length, 0, 'the attempt at a is not ended: a is not used up');
    assert.equal(r.engine.pending, 1);
    down = false;
    assert.equal(r.engine.resendInFlight(), 1);
    assert.deepEqual(
      r.sent.map((a) => [a.agentId, a.kind]),
      [['a', 'first']],
    );
    r.engine.answer('r1', 'a', { value: 'ok' });
    assert.equal(r.outcomes[0]?.ok, true);
    assert.equal(r.engine.counters.resent, 1);

    // A publish that fails later (the callback of an MQTT publish) is reported the same way; a request in flight
    // when the connection came back is sent again too (its reply may have been lost with the old connection).
    const r2 = rig(['a', 'b'], { plan: { timeoutMs: 1_000 } });
    r2.start('r1', 5_000);
    r2.start('r2', 5_000);
    r2.engine.unsent('r1', 'a', new MeshError('MESH_NOT_CONNECTED', 'publish failed'));
    assert.deepEqual(
      r2.sent.map((a) => a.agentId),
      ['a', 'a'],
    );
    assert.equal(r2.engine.resendInFlight(), 2);
    assert.deepEqual(
      r2.sent.map((a) => [a.request.key, a.agentId]),
      [
        ['r1', 'a'],
        ['r2', 'a'],
        ['r1', 'a'],
        ['r2', 'a'],
      ],
    );
    // Still bounded by its timers: no answer from a after the resend, so the per-try timeout moves r1 on to b.
    r2.clock.advance(1_000);
    assert.ok(r2.sent.some((a) => a.request.key === 'r1' && a.agentId === 'b'));
    // And by its deadline when nothing comes back at all.
    r2.clock.advance(5_000);
    assert.ok(r2.outcomes.every((o) => !o.ok && o.error.code === 'MESH_DEADLINE_EXCEEDED'));
  });

  test('hedges per request: at most one by default, however many attempts are allowed', () => {
    const r = rig(['a', 'b', 'c', 'd', 'e'], { plan: { hedgeAfterMs: 10 }, maxAttempts: 5 });
    r.start();
    r.clock.advance(100);
    assert.deepEqual(
      r.sent.map((a) => [a.agentId, a.kind]),
      [
        ['a', 'first'],
        ['b', 'hedge'],
      ],
    );
    // A retry after the hedge arms no second hedge.
    r.engine.fail('r1', 'a', coded('MESH_BUSY'));
    r.clock.advance(100);
    assert.deepEqual(
      r.sent.map((a) => a.kind),
      ['first', 'hedge', 'retry'],
    );
    assert.equal(r.engine.counters.hedges, 1);
    // maxHedges raises the cap explicitly.
    const r2 = rig(['a', 'b', 'c', 'd'], { plan: { hedgeAfterMs: 10 }, maxAttempts: 4, maxHedges: 2 });
    r2.start();
    r2.engine.fail('r1', 'a', coded('MESH_BUSY'));
    r2.clock.advance(30);
    assert.equal(r2.engine.counters.hedges, 1, 'a hedge backs up the retry');
  });
});

describe('the request engine', () => {
  test('the deadline fails the request with MESH_DEADLINE_EXCEEDED, the last error as cause, and cancels what runs', () => {
    const r = rig(['a', 'b'], { plan: { timeoutMs: 100 } });
    r.start('r1', 300);
    r.clock.advance(300);
    assert.equal(r.outcomes.length, 1);
    const o = r.outcomes[0]!;
    assert.ok(!o.ok);
    assert.equal(o.error.code, 'MESH_DEADLINE_EXCEEDED');
    assert.equal((o.error.cause as MeshError).code, 'MESH_TIMEOUT');
    assert.deepEqual(r.cancelled.sort(), ['a', 'b']);
    assert.equal(r.engine.pending, 0);
  });

  test('the first answer wins; the others are cancelled; answers from agents not asked are ignored', () => {
    const r = rig(['a', 'b'], { plan: { hedgeAfterMs: 10 } });
    r.start();
    r.clock.advance(10);
    r.engine.answer('r1', 'zz', { value: 'forged' });
    assert.equal(r.outcomes.length, 0);
    r.engine.answer('r1', 'b', { value: 'hedge won' });
    r.engine.answer('r1', 'a', { value: 'too late' });
    assert.equal(r.outcomes.length, 1);
    const o = r.outcomes[0]!;
    assert.ok(o.ok && o.reply.value === 'hedge won' && o.hedged);
    assert.deepEqual(r.cancelled, ['a']);
    assert.deepEqual(
      r.ends.map((e) => [e.agentId, e.end.kind]),
      [
        ['b', 'reply'],
        ['a', 'cancelled'],
      ],
    );
  });

  test('failover is free, a retry is paid: with the budget spent, a lost agent still fails over but a busy one is not retried', () => {
    const budget = new TailBudget({ ratio: 0, cap: 0, minPerS: 0, hedgeRatio: 0, hedgeCap: 0 }, 0);
    const r = rig(['a', 'b', 'c'], { budget });
    r.start();
    r.engine.agentLost('a');
    assert.deepEqual(
      r.sent.map((a) => [a.agentId, a.kind]),
      [
        ['a', 'first'],
        ['b', 'failover'],
      ],
    );
    r.engine.fail('r1', 'b', coded('MESH_BUSY'));
    assert.equal(r.sent.length, 2, 'no retry without budget');
    const o = r.outcomes[0]!;
    assert.ok(!o.ok && o.error.code === 'MESH_BUSY');
    assert.equal(r.engine.counters.refused, 1);
  });

  test('never twice to one agent, and at most maxAttempts agents', () => {
    const r = rig(['a', 'b', 'c', 'd']);
    r.start();
    for (const id of ['a', 'b', 'c']) r.engine.fail('r1', id, coded('MESH_BUSY'));
    assert.deepEqual(
      r.sent.map((a) => a.agentId),
      ['a', 'b', 'c'],
    );
    const o = r.outcomes[0]!;
    assert.ok(!o.ok && o.error.code === 'MESH_BUSY');
    // A policy that offers an agent already tried gets no second attempt there.
    const engine = createRequestEngine<Req, Rep>({
      policy: { pick: () => ({ agentId: 'same' }) },
      transport: { send: () => {}, cancel: () => {} },
      clock: new FakeClock(),
    });
    const outcomes: Outcome<Req, Rep>[] = [];
    engine.start({ key: 'k', deadlineAt: 1_000, data: { model: 'm' } }, (x) => outcomes.push(x));
    engine.fail('k', 'same', coded('MESH_BUSY'));
    assert.equal(outcomes.length, 1);
    assert.equal(engine.counters.retries, 0);
  });

  test('a request pinned to one attempt is neither retried nor hedged', () => {
    const r = rig(['a', 'b'], { plan: { hedgeAfterMs: 5, timeoutMs: 10 } });
    r.start('r1', 1_000, 1);
    r.clock.advance(50);
    r.engine.fail('r1', 'a', coded('MESH_BUSY'));
    assert.equal(r.sent.length, 1);
    assert.equal(r.outcomes[0]!.ok, false);
  });

  test("a hedge waits for the policy's permission", () => {
    let allowed = false;
    const r = rig(['a', 'b'], { plan: { hedgeAfterMs: 10 }, mayHedge: () => allowed });
    r.start();
    r.clock.advance(20);
    assert.equal(r.sent.length, 1);
    assert.equal(r.engine.counters.refused, 1);
    allowed = true;
    r.start('r2');
    r.clock.advance(20);
    assert.equal(r.sent.filter((a) => a.request.key === 'r2').length, 2);
  });

  test('retrySameAfter: the same agent again once its wait is over, once per agent', async () => {
    let release!: () => void;
    const voucherSent = new Promise<void>((resolve) => (release = resolve));
    const r = rig(['a', 'b'], { retrySameAfter: (_a, e) => (e.code === 'MESH_CREDIT_EXCEEDED' ? voucherSent : undefined) });
    r.start();
    r.engine.fail('r1', 'a', coded('MESH_CREDIT_EXCEEDED'));
    assert.equal(r.sent.length, 1, 'nothing sent while the voucher is on its way');
    release();
    await voucherSent;
    await new Promise((resolve) => setImmediate(resolve));
    assert.deepEqual(
      r.sent.map((a) => [a.agentId, a.kind]),
      [
        ['a', 'first'],
        ['a', 'failover'],
      ],
    );
    r.engine.fail('r1', 'a', coded('MESH_CREDIT_EXCEEDED'));
    assert.deepEqual(
      r.sent.map((a) => a.agentId),
      ['a', 'a', 'b'],
      'the second refusal moves on',
    );
  });

  test('no agent at all: MESH_NO_AGENT at once; a policy that says why: its error', () => {
    const r = rig([]);
    r.start();
    const o = r.outcomes[0]!;
    assert.ok(!o.ok && o.error.code === 'MESH_NO_AGENT');
    const engine = createRequestEngine<Req, Rep>({
      policy: {
        pick: () => {
          throw new MeshError('MESH_DEADLINE_EXCEEDED', 'no agent can finish in time');
        },
      },
      transport: { send: () => {}, cancel: () => {} },
      clock: new FakeClock(),
    });
    const outcomes: Outcome<Req, Rep>[] = [];
    engine.start({ key: 'k', deadlineAt: 100, data: { model: 'm' } }, (x) => outcomes.push(x));
    const o2 = outcomes[0]!;
    assert.ok(!o2.ok && o2.error.message === 'no agent can finish in time');
  });

  test('close fails every pending request and leaves no timer behind', () => {
    const r = rig(['a'], { plan: { timeoutMs: 10, hedgeAfterMs: 5 } });
    r.start('r1');
    r.start('r2');
    r.engine.close();
    assert.equal(r.outcomes.length, 2);
    assert.ok(r.outcomes.every((o) => !o.ok && o.error.code === 'MESH_NOT_CONNECTED'));
    r.clock.advance(10_000);
    assert.equal(r.outcomes.length, 2);
    assert.equal(r.engine.pending, 0);
  });
});

describe('dead agents', () => {
  test('an attempt at an agent gone silent fails over at once, free, and its late answer may still win', () => {
    const silent = new Set<string>();
    const budget = new TailBudget({}, 0);
    // A per-try timeout far away: only the liveness check can move the request before it.
    const r = rig(['a', 'b'], { plan: { timeoutMs: 5_000 }, budget, silent });
    r.start('r1', 10_000);
    r.clock.advance(150);
    assert.equal(r.sent.length, 1, 'nothing moves while the agent is heard from');
    silent.add('a');
    r.clock.advance(100);
    assert.deepEqual(
      r.sent.map((a) => [a.agentId, a.kind]),
      [
        ['a', 'first'],
        ['b', 'failover'],
      ],
    );
    assert.equal(r.engine.counters.silent, 1);
    assert.equal(budget.activeExtras, 0, 'free, like the failover after a last will');
    assert.equal(r.cancelled.length, 0, 'the silent attempt keeps running');
    r.clock.advance(1_000);
    assert.equal(r.sent.length, 2, 'judged once');
    r.engine.answer('r1', 'a', { value: 'back from the silence' });
    const o = r.outcomes[0]!;
    assert.ok(o.ok && o.reply.value === 'back from the silence');
    assert.deepEqual(r.cancelled, ['b']);
  });

  test('a silent agent: nothing more is sent while another attempt covers the request; with no budget left it still fails over', () => {
    const silent = new Set<string>();
    const covered = rig(['a', 'b', 'c'], { plan: { hedgeAfterMs: 50 }, silent });
    covered.start();
    covered.clock.advance(60);
    assert.deepEqual(
      covered.sent.map((a) => a.agentId),
      ['a', 'b'],
      'hedged on b',
    );
    silent.add('a');
    covered.clock.advance(100);
    assert.equal(covered.sent.length, 2, 'b still runs: nothing more is sent');
    assert.equal(covered.engine.counters.silent, 1);

    const spent = new TailBudget({ ratio: 0, cap: 0, minPerS: 0, hedgeRatio: 0, hedgeCap: 0 }, 0);
    const broke = rig(['a', 'b'], { budget: spent, silent: new Set(['a']) });
    broke.start('r1', 1_000);
    broke.clock.advance(100);
    assert.deepEqual(
      broke.sent.map((a) => [a.agentId, a.kind]),
      [
        ['a', 'first'],
        ['b', 'failover'],
      ],
    );
    assert.equal(broke.engine.counters.refused, 0);
    broke.clock.advance(1_000);
    const o = broke.outcomes[0]!;
    assert.ok(!o.ok && o.error.code === 'MESH_DEADLINE_EXCEEDED');
    assert.equal((o.error.cause as MeshError).code, 'MESH_TIMEOUT', 'the silence is the cause');
  });

  test('an attempt whose per-try timeout fired, its retry refused by the budget, moves on once its agent is silent', () => {
    const silent = new Set<string>();
    const spent = new TailBudget({ ratio: 0, cap: 0, minPerS: 0, hedgeRatio: 0, hedgeCap: 0 }, 0);
    const r = rig(['a', 'b'], { plan: { timeoutMs: 50 }, budget: spent, silent });
    r.start('r1', 10_000);
    r.clock.advance(60);
    assert.equal(r.engine.counters.timeouts, 1);
    assert.equal(r.engine.counters.refused, 1, 'the retry was refused');
    assert.equal(r.sent.length, 1);
    silent.add('a');
    r.clock.advance(45); // the check at 100 ms
    assert.deepEqual(
      r.sent.map((a) => [a.agentId, a.kind]),
      [
        ['a', 'first'],
        ['b', 'failover'],
      ],
    );
    assert.equal(r.engine.counters.timeouts, 1, 'not timed out twice');
    r.engine.answer('r1', 'b', { value: 'ok' });
    assert.ok(r.outcomes[0]!.ok);
  });

  test('a fake death: the silent agent answers late after its request moved on, and the answer counts once', () => {
    const r = rig(['a', 'b'], { silent: new Set(['a']) });
    r.start('r1', 10_000);
    r.clock.advance(100);
    assert.deepEqual(
      r.sent.map((a) => a.agentId),
      ['a', 'b'],
    );
    r.engine.answer('r1', 'b', { value: 'from b' });
    // The liar answers after all, twice, and fails too: the request is over, none of it counts.
    r.engine.answer('r1', 'a', { value: 'late' });
    r.engine.answer('r1', 'a', { value: 'late again' });
    r.engine.fail('r1', 'a', new MeshError('MESH_BUSY', 'busy'));
    assert.equal(r.outcomes.length, 1);
    const o = r.outcomes[0]!;
    assert.ok(o.ok && o.reply.value === 'from b');
    assert.equal(r.engine.counters.ok, 1);
    assert.deepEqual(r.cancelled, ['a'], 'the silent attempt is cancelled with the request');
  });

  test('a liveness check that runs a whole period late judges nobody; the next one judges, however late it runs', () => {
    const silent = new Set(['a']);
    const r = rig(['a', 'b'], { silent });
    r.start('r1', 10_000);
    // Time jumps past the check without running it, as a blocked event loop does.
    r.clock.t += 500;
    r.clock.advance(0);
    assert.equal(r.sent.length, 1, 'the late check passed');
    // a's heartbeat, which waited through the stall, is read: the next check finds a alive.
    silent.delete('a');
    r.clock.advance(100);
    assert.equal(r.sent.length, 1, 'a was heard: nothing moved');
    assert.equal(r.engine.counters.silent, 0);
    // Stalled again, nothing from a was waiting, and the next check runs late too: it judges.
    silent.add('a');
    r.clock.t += 500;
    r.clock.advance(0);
    assert.equal(r.sent.length, 1);
    r.clock.t += 400;
    r.clock.advance(0);
    assert.deepEqual(
      r.sent.map((x) => [x.agentId, x.kind]),
      [
        ['a', 'first'],
        ['b', 'failover'],
      ],
    );
  });

  test('a loop that lags a whole period on every turn still finds a silent agent', () => {
    const r = rig(['a', 'b'], { silent: new Set(['a']) });
    r.start('r1', 10_000);
    // Every timer fires 300 ms after it was due (checks every 100 ms), as in a process busy 300 ms a turn.
    for (let turn = 0; turn < 4 && r.sent.length < 2; turn++) {
      r.clock.t += 400;
      r.clock.advance(0);
      r.clock.t += 300;
      r.clock.advance(0);
    }
    assert.deepEqual(
      r.sent.map((x) => x.agentId),
      ['a', 'b'],
      'moved on although no check ran on time',
    );
    assert.equal(r.engine.counters.silent, 1);
  });

  test('a last will ends the attempts at once, a free failover each, and the liveness timer stops with the last request', () => {
    const r = rig(['a', 'b'], { silent: new Set() });
    r.start();
    r.engine.agentLost('a');
    assert.deepEqual(
      r.sent.map((a) => [a.agentId, a.kind]),
      [
        ['a', 'first'],
        ['b', 'failover'],
      ],
    );
    r.engine.answer('r1', 'b', { value: 'ok' });
    assert.equal(r.engine.pending, 0);
    assert.equal(r.clock.timersPending(), 0, 'no timer left behind');
  });
});

describe('shedding what cannot meet its deadline', () => {
  const empty = () => new TailBudget({ ratio: 0, cap: 0, minPerS: 0, hedgeRatio: 0, hedgeCap: 0 }, 0);

  test('less time left than the fastest agent takes: refused at once, coded, nothing sent, no timer left', () => {
    const r = rig(['a', 'b'], { floorMs: () => 300 });
    r.start('r1', 200);
    assert.equal(r.sent.length, 0);
    const o = r.outcomes[0]!;
    assert.ok(!o.ok && o.error.code === 'MESH_OVERLOADED', 'refused before the deadline, not at it');
    assert.deepEqual(o.ok ? undefined : o.error.details, { floorMs: 300, remainingMs: 200 });
    assert.equal(r.engine.counters.shed, 1);
    assert.equal(r.clock.timersPending(), 0);
    // Enough time: sent as usual; an unknown floor sheds nothing.
    r.start('r2', 400);
    assert.equal(r.sent.length, 1);
    const unknown = rig(['a'], { floorMs: () => undefined });
    unknown.start('r1', 1);
    assert.equal(unknown.sent.length, 1);
  });

  test("an agent's admission refusal moves on for free while the deadline allows, then ends at once with it", () => {
    // b is fast, c slow: after a's refusal b is tried with an empty retry budget; c is not, with too little time left.
    const service: Record<string, number> = { a: 10, b: 10, c: 500 };
    const floorMs = (tried: ReadonlySet<string>) =>
      Math.min(
        ...Object.keys(service)
          .filter((id) => !tried.has(id))
          .map((id) => service[id]!),
      );
    const r = rig(['a', 'b', 'c'], { budget: empty(), floorMs });
    r.start('r1', 300);
    r.clock.advance(5);
    r.engine.fail('r1', 'a', coded('MESH_OVERLOADED'));
    assert.deepEqual(
      r.sent.map((a) => [a.agentId, a.kind]),
      [
        ['a', 'first'],
        ['b', 'failover'],
      ],
    );
    assert.equal(r.engine.counters.refused, 0, 'a failover: the budget was not asked');
    r.clock.advance(5);
    r.engine.fail('r1', 'b', coded('MESH_OVERLOADED'));
    assert.equal(r.sent.length, 2, 'c cannot answer in the 290 ms left');
    const o = r.outcomes[0]!;
    assert.ok(!o.ok && o.error.code === 'MESH_OVERLOADED' && o.error.message === 'agent said MESH_OVERLOADED');
    assert.equal(r.clock.now(), 10, 'ended at once, not at the deadline');
  });

  test('agents that refuse everything (lying or full) cost at most maxAttempts sends per request, never a storm', () => {
    const r = rig(['a', 'b', 'c', 'd', 'e'], { budget: empty(), floorMs: () => 1, maxAttempts: 3 });
    for (let i = 0; i < 50; i++) {
      const key = `r${i}`;
      r.start(key, 1_000);
      for (const id of ['a', 'b', 'c', 'd', 'e']) r.engine.fail(key, id, coded('MESH_OVERLOADED'));
    }
    assert.equal(r.sent.length, 150);
    assert.equal(r.outcomes.length, 50);
    assert.ok(r.outcomes.every((o) => !o.ok && o.error.code === 'MESH_OVERLOADED'));
    assert.equal(r.engine.pending, 0);
  });
});
