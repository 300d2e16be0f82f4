/**
 * Overload (docs/operations.md, "Overload"): the agent's admission refuses at once what its queue cannot serve
 * before the deadline, whatever the sender claims; the router's adaptive concurrency limit (router/src/concurrency.ts)
 * shrinks when latency rises above its min-RTT baseline and grows when it does not.
 */
import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import { sampleInputs } from '@edge-mesh/demo';
import {
  decodeMessage,
  type ErrorReply,
  encodeMessage,
  encodeTensorMap,
  type InferReply,
  MeshError,
  newRequestId,
  type Tensor,
} from '@edge-mesh/protocol';
import { AdaptiveConcurrency, type AdaptiveConcurrencyOptions, addressCaller, makeApiKey, startRouterHttp } from '@edge-mesh/router';
import { kindOf, recoveryMs } from '../bench/contention.ts';
import type { Executor, JobCallback } from '../edge-agent/src/executor.ts';
import { Faults } from '../edge-agent/src/faults.ts';
import { AgentRequests, KEPT_REPLIES, ReplayGuard, SentReplies } from '../edge-agent/src/requests.ts';
import { type Job, Scheduler } from '../edge-agent/src/scheduler.ts';
import { newAgentCounters } from '../edge-agent/src/types.ts';
import { SentRequests } from '../sdk/src/payments.ts';
import { agentFor, brokerFor, quiet, routerFor } from './helpers.ts';

/** An executor whose runs end only when the test says, each taking `execMs` by its report. */
class HeldExecutor implements Executor {
  readonly runs: { model: string; callback: JobCallback }[] = [];
  handoffMs = 0;
  onIdle = () => {};
  constructor(
    readonly parallelism: number,
    private readonly slots = parallelism,
  ) {}
  get freeCapacity() {
    return this.slots - this.runs.length;
  }
  run(model: string, _inputs: Record<string, Tensor>, callback: JobCallback) {
    this.runs.push({ model, callback });
  }
  /** Ends the oldest run, reporting `execMs` (and `shareMs`, for a run that carried other jobs). */
  finishOne(execMs: number, shareMs?: number) {
    const run = this.runs.shift()!;
    run.callback(undefined, { outputs: {}, execMs, ...(shareMs !== undefined ? { shareMs } : {}) });
    this.onIdle();
  }
}

/** A job for the scheduler: `units` runs of the model when given, progress every `every` units. */
function testJob(key: string, model: string, deadline: number, senderId: string, units?: number, every = 1): Job {
  return {
    key,
    id: new Uint8Array(16),
    senderId,
    model,
    inputs: {},
    deadline,
    receivedAt: 0,
    ...(units ? { units: { total: units, every, done: 0, reported: 0, parts: [], execMs: 0 } } : {}),
  };
}

function rig(parallelism: number, serviceMs: number, queueLimit = 64) {
  let now = 1_000_000;
  const finished: { key: string; code: string | undefined }[] = [];
  const scheduler = new Scheduler(
    queueLimit,
    (job, err) => finished.push({ key: job.key, code: err?.code }),
    () => now,
  );
  const executor = new HeldExecutor(parallelism);
  scheduler.addModel('m', serviceMs, executor);
  let n = 0;
  const job = (deadlineInMs: number, senderId = 's'): Job => testJob(`j${n++}`, 'm', now + deadlineInMs, senderId);
  const refusal = (j: Job): MeshError | undefined => {
    try {
      scheduler.submit(j);
      return undefined;
    } catch (err) {
      return err as MeshError;
    }
  };
  return {
    scheduler,
    executor,
    finished,
    job,
    refusal,
    advance: (ms: number) => {
      now += ms;
    },
  };
}

describe('agent admission', () => {
  test('a deadline the queue cannot meet is refused at once (MESH_OVERLOADED), one it can is queued', () => {
    const r = rig(1, 10);
    // Idle: one service time is all it takes.
    assert.equal(r.refusal(r.job(10)), undefined);
    assert.equal(r.executor.runs.length, 1);
    // Busy: one running (half of 10 ms left, by the estimate) and three queued of 10 ms each ahead: 35 ms + 10 ms.
    for (let i = 0; i < 3; i++) assert.equal(r.refusal(r.job(1_000)), undefined);
    assert.equal(r.scheduler.estimateMs('m'), 45);
    const refused = r.refusal(r.job(44));
    assert.equal(refused?.code, 'MESH_OVERLOADED');
    assert.deepEqual(refused?.details, { estimatedMs: 45, remainingMs: 44 });
    assert.equal(r.refusal(r.job(45)), undefined);
    // The refused job was never queued: it neither holds a place nor finishes later.
    assert.equal(r.scheduler.pending, 5);
    assert.equal(r.finished.length, 0);
  });

  test('the wait is shared by the parallel runs, and measured service times move the estimate', () => {
    const r = rig(2, 10);
    r.refusal(r.job(1_000));
    r.refusal(r.job(1_000));
    for (let i = 0; i < 4; i++) r.refusal(r.job(1_000));
    // Two running (5 ms each left), four queued (40 ms), over two workers: 25 ms, plus 10.
    assert.equal(r.scheduler.estimateMs('m'), 35);
    // Runs that take 100 ms raise the service time (EWMA), and with it the estimate.
    for (let i = 0; i < 6; i++) r.executor.finishOne(100);
    assert.equal(r.scheduler.pending, 0);
    assert.ok(r.scheduler.estimateMs('m') > 70, `estimate ${r.scheduler.estimateMs('m')}`);
    r.refusal(r.job(1_000));
    r.refusal(r.job(1_000));
    assert.equal(r.refusal(r.job(60))?.code, 'MESH_OVERLOADED');
  });

  test('a job of a stacked run counts its share of the run, not the whole run, in the service time', () => {
    const r = rig(1, 10);
    // Fifteen jobs, each answered from a stacked run of 8 that took 40 ms: each cost the queue 5 ms.
    for (let i = 0; i < 15; i++) {
      r.refusal(r.job(1_000));
      r.executor.finishOne(40, 5);
    }
    assert.equal(r.scheduler.estimateMs('m'), 5, 'the median of the shares');
    assert.equal(r.scheduler.loadReport().models.m!.serviceMs < 10, true);
  });

  test('one run that took long (the process lost the CPU) does not refuse what follows; a slow spell does', () => {
    const r = rig(1, 10);
    for (let i = 0; i < 10; i++) {
      r.refusal(r.job(1_000));
      r.executor.finishOne(10);
    }
    r.refusal(r.job(1_000));
    r.executor.finishOne(2_000);
    assert.equal(r.scheduler.estimateMs('m'), 10, 'the median of the last runs');
    assert.equal(r.refusal(r.job(50)), undefined);
    r.executor.finishOne(10);
    // Eight slow runs of the last fifteen: the median moves, and a 50 ms deadline no longer fits.
    for (let i = 0; i < 8; i++) {
      r.refusal(r.job(100_000));
      r.executor.finishOne(200);
    }
    assert.equal(r.scheduler.estimateMs('m'), 200);
    assert.equal(r.refusal(r.job(50))?.code, 'MESH_OVERLOADED');
  });

  test('a lying sender: a deadline already past, a huge deadline, a flood', () => {
    const r = rig(1, 10, 8);
    assert.equal(r.refusal(r.job(-1))?.code, 'MESH_DEADLINE_EXCEEDED');
    assert.equal(r.refusal(r.job(0))?.code, 'MESH_DEADLINE_EXCEEDED');
    // A huge deadline is admitted, but buys no more than its place: the queue bound still holds.
    assert.equal(r.refusal(r.job(Number.MAX_SAFE_INTEGER)), undefined);
    const flood = Array.from({ length: 20 }, () => r.refusal(r.job(Number.MAX_SAFE_INTEGER))?.code);
    assert.equal(flood.filter((c) => c === undefined).length, 8);
    assert.ok(flood.slice(8).every((c) => c === 'MESH_BUSY'));
    // A flood of deadlines too tight for the queue: every one refused at once, none queued, none run.
    const tight = Array.from({ length: 100 }, () => r.refusal(r.job(20))?.code);
    assert.ok(tight.every((c) => c === 'MESH_OVERLOADED' || c === 'MESH_BUSY'));
    assert.equal(r.scheduler.pending, 9);
    assert.equal(r.executor.runs.length, 1);
  });

  test('a sender that filled a queue gives up its latest places to other senders, down to an even share', () => {
    const r = rig(1, 1, 8);
    // Mallory floods: one runs, eight queue, the rest are refused.
    const flood = Array.from({ length: 20 }, (_, i) => r.job(60_000 + i, 'mallory'));
    const codes = flood.map((j) => r.refusal(j)?.code);
    assert.equal(codes.filter((c) => c === undefined).length, 9);
    // Alice's request takes the place of Mallory's latest queued job, which is answered MESH_BUSY.
    const alice = r.job(5_000, 'alice');
    assert.equal(r.refusal(alice), undefined);
    assert.deepEqual(r.finished.at(-1), { key: flood[8]!.key, code: 'MESH_BUSY' });
    // Alice keeps taking places while she holds at least two fewer than Mallory: 4 of 8, then she is refused.
    const more = Array.from({ length: 6 }, () => r.refusal(r.job(5_000, 'alice'))?.code);
    assert.deepEqual(more, [undefined, undefined, undefined, 'MESH_BUSY', 'MESH_BUSY', 'MESH_BUSY']);
    // Bob, new, still gets a place from whoever holds the most (both at 4: refused; Mallory's share is no bigger).
    assert.equal(r.refusal(r.job(5_000, 'bob'))?.code, undefined);
    const displaced = r.finished.filter((f) => f.code === 'MESH_BUSY').map((f) => f.key);
    assert.equal(displaced.length, 5, "four of Mallory's places, then one of the two equal holders");
    // Mallory cannot win places back from those holding fewer.
    assert.equal(r.refusal(r.job(60_000, 'mallory'))?.code, 'MESH_BUSY');
    // The displaced jobs never run; Alice's, Bob's and Mallory's remaining jobs run in order.
    let ran = 0;
    while (r.executor.runs.length > 0) {
      r.executor.finishOne(1);
      ran++;
    }
    assert.equal(ran, 9);
    assert.equal(r.finished.filter((f) => f.code === undefined).length, 9);
    for (const key of displaced) assert.equal(r.finished.filter((f) => f.key === key).length, 1, 'answered once');
  });

  test('a job that runs in units and has started keeps its place in a full queue; a job not started gives it up', () => {
    let now = 1_000_000;
    const finished: { key: string; code: string | undefined; done: number | undefined }[] = [];
    const scheduler = new Scheduler(
      2,
      (job, err) => finished.push({ key: job.key, code: err?.code, done: job.units?.done }),
      () => now,
    );
    const executor = new HeldExecutor(1);
    scheduler.addModel('stream', 1, executor);
    scheduler.addModel('m', 1, executor);
    let n = 0;
    const job = (model: string, deadlineInMs: number, senderId: string, units?: number): Job =>
      testJob(`j${n++}`, model, now + deadlineInMs, senderId, units, 10);
    const long = job('stream', 60_000, 'mallory', 5);
    scheduler.submit(long);
    scheduler.submit(job('m', 1_000, 'mallory'));
    const waiting = job('stream', 30_000, 'mallory');
    scheduler.submit(waiting);
    // Its first unit done, the long job waits between units while the other model's earlier deadline runs.
    executor.finishOne(1);
    now += 1;
    // Alice's request takes the place of Mallory's job that has not started, not of the one between units.
    scheduler.submit(job('stream', 5_000, 'alice'));
    assert.deepEqual(finished, [{ key: waiting.key, code: 'MESH_BUSY', done: undefined }]);
    assert.throws(
      () => scheduler.submit(job('stream', 5_000, 'bob')),
      (e: MeshError) => e.code === 'MESH_BUSY',
    );
    assert.equal(long.units!.done, 1);
  });

  test('an accepted job that expires in the queue is dropped with MESH_DEADLINE_EXCEEDED, not run', () => {
    const r = rig(1, 10);
    r.refusal(r.job(1_000));
    const late = r.job(30);
    assert.equal(r.refusal(late), undefined, 'admitted: 5 + 10 ms fit in 30');
    // The running job takes far longer than its service time said.
    r.advance(40);
    r.executor.finishOne(40);
    assert.deepEqual(r.finished.at(-1), { key: late.key, code: 'MESH_DEADLINE_EXCEEDED' });
    assert.equal(r.executor.runs.length, 0);
  });

  /** Asserts `x` was queued (messages given, so that a failing assertion need not quote its source). */
  const taken = (x: MeshError | Job) => assert.ok(!(x instanceof MeshError), `refused: ${(x as MeshError).message}`);
  /** Asserts `x` was refused with MESH_OVERLOADED and returns the refusal. */
  const overloaded = (x: MeshError | Job): MeshError => {
    assert.ok(
      x instanceof MeshError && x.code === 'MESH_OVERLOADED',
      `taken or refused otherwise: ${(x as MeshError).message ?? (x as Job).key}`,
    );
    return x;
  };

  /**
   * Models on one executor, as an agent's worker pool serves them: `det` (150 ms a run), `vad` (7 ms) and `ocr` (100 ms a
   * unit, for jobs in units), listed in `order` (the first listed wins a tie of deadlines), on `parallelism` run slots.
   */
  function sharedLane(parallelism = 1, order: ('det' | 'vad' | 'ocr')[] = ['det', 'vad', 'ocr']) {
    let now = 1_000_000;
    const finished: { key: string; code: string | undefined }[] = [];
    const scheduler = new Scheduler(
      64,
      (job, err) => finished.push({ key: job.key, code: err?.code }),
      () => now,
    );
    const executor = new HeldExecutor(parallelism);
    const serviceMs = { det: 150, vad: 7, ocr: 100 };
    for (const model of order) scheduler.addModel(model, serviceMs[model], executor);
    let n = 0;
    const submit = (model: 'det' | 'vad' | 'ocr', deadlineInMs: number, senderId = 's', units?: number): MeshError | Job => {
      const job = testJob(`${model}${n++}`, model, now + deadlineInMs, senderId, units);
      try {
        scheduler.submit(job);
        return job;
      } catch (err) {
        return err as MeshError;
      }
    };
    /** Ends the oldest run after `ms`, reporting `ms`. */
    const finishRun = (ms: number) => {
      now += ms;
      executor.finishOne(ms);
    };
    return { scheduler, executor, finished, submit, finishRun };
  }

  test('a job goes before queued work of another model with a later deadline, so that work does not count in its wait', () => {
    const r = sharedLane();
    // One detection running and three queued, 3 s deadlines: 75 + 450 ms of work held.
    for (let i = 0; i < 4; i++) taken(r.submit('det', 3_000));
    assert.equal(r.scheduler.estimateMs('vad'), 532, 'all held work, as a job with the latest deadline would wait');
    // A 500 ms voice-activity request waits only for the run under way (earliest deadline first between queue heads):
    // 75 + 7 ms. Counting all held work (532 ms) would refuse it.
    const vad = r.submit('vad', 500);
    taken(vad);
    r.finishRun(150);
    assert.deepEqual(
      r.executor.runs.map((run) => run.model),
      ['vad'],
      'it runs next, before the queued detections',
    );
    r.finishRun(7);
    assert.deepEqual(r.finished.at(-1), { key: (vad as Job).key, code: undefined });
    // And the detections it overtook still end in time.
    for (let i = 0; i < 3; i++) r.finishRun(150);
    assert.deepEqual(
      r.finished.map((f) => f.code),
      [undefined, undefined, undefined, undefined, undefined],
    );
  });

  test('queued work of another model that goes before a job of its own model goes before the job too', () => {
    const r = sharedLane();
    // A detection running, three queued (2 s deadlines), then a voice-activity job with a 3 s deadline: the detections,
    // whose deadlines are earlier, go before that job, so before any voice-activity job queued behind it.
    for (let i = 0; i < 4; i++) r.submit('det', 2_000);
    taken(r.submit('vad', 3_000));
    // It would start after 532 ms.
    const refused = overloaded(r.submit('vad', 500));
    assert.deepEqual(refused.details, { estimatedMs: 539, remainingMs: 500 });
  });

  test('a job in units holds all its units still to run: the work a newcomer would overtake counts them', () => {
    // Five units of 100 ms due in 580 ms, behind a detection: estimated to end at 75 + 500 ms.
    const queued = sharedLane();
    queued.submit('det', 3_000);
    taken(queued.submit('ocr', 580, 's', 5));
    // A detection due in 250 ms would itself be in time (75 + 150 ms), but would push the last unit to about 725 ms.
    assert.match(overloaded(queued.submit('det', 250)).message, /miss its deadline/);
    // The same job running its first unit, four to come: it is out of the queue but its units still count.
    const running = sharedLane();
    taken(running.submit('ocr', 580, 's', 5));
    assert.deepEqual(
      running.executor.runs.map((run) => run.model),
      ['ocr'],
    );
    assert.match(overloaded(running.submit('det', 250)).message, /miss its deadline/);
    // With no work to overtake, such a detection is taken.
    const alone = sharedLane();
    alone.submit('det', 3_000);
    taken(alone.submit('det', 400));
  });

  test('equal deadlines go to the model listed first on the executor, as the queue serves them', () => {
    // Two run slots, both running a detection; ten voice-activity jobs queued, due in 226 ms.
    const setUp = (order: ('det' | 'vad')[]) => {
      const r = sharedLane(2, order);
      r.submit('det', 3_000);
      r.submit('det', 3_000);
      for (let i = 0; i < 10; i++) taken(r.submit('vad', 226));
      return r;
    };
    // Voice activity listed first: the ten go before a detection due at the same time, which would end at about 260 ms.
    const vadFirst = setUp(['vad', 'det']);
    assert.equal(overloaded(vadFirst.submit('det', 226)).details?.estimatedMs, 260);
    // Detection listed first: it goes first (75 + 150 ms) and the ten still end in time on the other slot.
    const detFirst = setUp(['det', 'vad']);
    taken(detFirst.submit('det', 226));
    detFirst.finishRun(75);
    assert.deepEqual(
      detFirst.executor.runs.map((run) => run.model),
      ['det', 'det'],
      'the tie went to the detection',
    );
  });

  test('a job that would make the queued work it overtakes miss their deadlines is refused; a sender cannot push others out that way', () => {
    const r = sharedLane();
    // Another sender's detections, admitted with little to spare: the last one is estimated at 525 ms of its 530.
    for (let i = 0; i < 4; i++) taken(r.submit('det', 530, 'other'));
    // A tight voice-activity request (520 ms) would go first and would itself be in time (75 + 7 ms), but the last
    // detection would then end at about 532 ms: refused, and the queue is unchanged.
    const refused = overloaded(r.submit('vad', 520, 'pusher'));
    assert.match(refused.message, /would make queued work of another model miss its deadline/);
    assert.equal(r.scheduler.pending, 4);
    // With room behind it (3 s deadlines), the same request is taken.
    const roomy = sharedLane();
    for (let i = 0; i < 4; i++) roomy.submit('det', 3_000, 'other');
    taken(roomy.submit('vad', 520, 'pusher'));
    for (const ms of [150, 7, 150, 150, 150]) roomy.finishRun(ms);
    assert.ok(
      roomy.finished.every((f) => f.code === undefined),
      JSON.stringify(roomy.finished),
    );
    // Jobs of its own model it never overtakes (first in, first out): they count in its wait.
    const own = sharedLane();
    own.submit('det', 3_000);
    for (let i = 0; i < 40; i++) own.submit('vad', 3_000);
    // Queued behind 40 × 7 ms of its own model.
    overloaded(own.submit('vad', 100));
  });

  test('an idle model whose estimate grew past every deadline still takes one job a second, so it can recover', () => {
    const r = rig(1, 10);
    r.refusal(r.job(1_000));
    r.executor.finishOne(5_000);
    r.executor.runs.length = 0;
    const estimate = r.scheduler.estimateMs('m');
    assert.ok(estimate > 500);
    // It just ran: refused.
    assert.equal(r.refusal(r.job(500))?.code, 'MESH_OVERLOADED');
    r.advance(1_000);
    assert.equal(r.refusal(r.job(500)), undefined, 'a probe, a second after the last start');
    assert.equal(r.refusal(r.job(500))?.code, 'MESH_OVERLOADED', 'one probe, not a flood');
  });
});

describe('agent request path', () => {
  /** AgentRequests → Scheduler (queue of 8) → one held run slot, serving model `m`; the replies as decoded, by sender. */
  function requestPath(guardLimit = 100) {
    const replies: { sender: string; reply: InferReply | ErrorReply }[] = [];
    const counters = newAgentCounters();
    const model = {
      name: 'm',
      inputs: [{ name: 'x', dtype: 'float32' as const, shape: [1] }],
      outputs: [],
      provider: 'cpu',
      latencyMs: 50,
    };
    const replays = new ReplayGuard(guardLimit);
    const requests = new AgentRequests({
      agentId: 'agent',
      maxMessageBytes: 1 << 20,
      maxElements: 1 << 20,
      models: new Map([['m', model]]),
      replays,
      payments: undefined,
      counters,
      faults: new Faults(),
      logger: quiet,
      reply: (sender, payload) => void replies.push({ sender, reply: decodeMessage(payload, ['res', 'err']) }),
      closed: () => false,
    });
    const scheduler = new Scheduler(8, requests.finished);
    const executor = new HeldExecutor(1);
    scheduler.addModel('m', 50, executor);
    requests.attach(scheduler);
    const bytes = (id: Uint8Array, deadline: number) =>
      encodeMessage({
        v: 1,
        kind: 'req',
        id,
        deadline,
        model: 'm',
        inputs: encodeTensorMap({ x: { dtype: 'float32', shape: [1], data: new Float32Array([1]) } }),
      });
    const send = (deadlineInMs: number, sender = 'app') => requests.onRequest(sender, bytes(newRequestId(), Date.now() + deadlineInMs));
    const codeOf = (r: { reply: InferReply | ErrorReply } | undefined) => (r?.reply.kind === 'err' ? r.reply.code : r?.reply.kind);
    return { requests, replies, counters, replays, executor, bytes, send, codeOf };
  }

  test('a request the agent cannot serve in time gets a MESH_OVERLOADED reply at once, with its queue, and is counted', () => {
    const { replies, counters, send } = requestPath();
    send(5_000);
    send(5_000);
    assert.equal(replies.length, 0);
    send(60);
    assert.equal(replies.length, 1);
    const { reply } = replies[0]!;
    assert.ok(reply.kind === 'err' && reply.code === 'MESH_OVERLOADED', JSON.stringify(reply));
    assert.equal(reply.kind === 'err' && reply.rif, 2);
    assert.deepEqual(counters.errors, { MESH_OVERLOADED: 1 });
  });

  test('one sender cannot lock the others out through the replay guard: far deadlines are refused, a flood fills only its share', () => {
    const { replies, replays, executor, send, codeOf } = requestPath(50);
    // A deadline a year ahead would hold its id for a year: refused at once, and not remembered.
    send(365 * 86_400_000, 'mallory');
    assert.equal(codeOf(replies.at(-1)), 'MESH_BAD_REQUEST');
    assert.match((replies.at(-1)!.reply as ErrorReply).message, /deadline .* ahead/);
    assert.equal(replays.size, 0);
    // A flood with the longest deadline allowed: one runs, eight queue, the rest are refused by the queue (their ids
    // remembered all the same) until the guard holds the flood's share, and then by the guard.
    for (let i = 0; i < 200; i++) send(590_000, 'mallory');
    assert.equal(replays.heldBy('mallory'), 50);
    const refused = replies.filter((r) => r.sender === 'mallory').map(codeOf);
    assert.equal(refused.length, 1 + 200 - 9);
    assert.ok(refused.slice(1).every((c) => c === 'MESH_BUSY'));
    // The flood's held requests run and are answered.
    while (executor.runs.length > 0) executor.finishOne(1);
    assert.equal(replies.filter((r) => r.sender === 'mallory' && r.reply.kind === 'res').length, 9);
    // Another sender is served, though the guard is at its limit and every id in it has minutes to go.
    for (let i = 0; i < 5; i++) {
      send(5_000, 'alice');
      executor.finishOne(1);
      assert.deepEqual(replies.at(-1)!.sender, 'alice');
      assert.equal(codeOf(replies.at(-1)), 'res');
    }
    // Her five places came from the flood's sender, which holds no more than anyone now.
    assert.deepEqual([replays.size, replays.heldBy('mallory'), replays.heldBy('alice')], [50, 45, 5]);
    send(590_000, 'mallory');
    assert.equal(codeOf(replies.at(-1)), 'MESH_BUSY');
    assert.match((replies.at(-1)!.reply as ErrorReply).message, /as many as any sender/);
    // A deadline at the router's largest (10 minutes) from a sender whose clock runs 20 s ahead is still taken.
    send(600_000 + 20_000, 'bob');
    executor.finishOne(1);
    assert.equal(codeOf(replies.at(-1)), 'res');
  });

  test('a request whose id was given up to make room is still known: not run again, its kept reply comes back', () => {
    const { requests, replies, replays, executor, bytes, codeOf } = requestPath(4);
    const ids = Array.from({ length: 4 }, () => newRequestId());
    const deadline = Date.now() + 60_000;
    for (const [i, id] of ids.entries()) {
      requests.onRequest('mallory', bytes(id, deadline + i));
      executor.finishOne(1);
    }
    assert.equal(replies.filter((r) => r.reply.kind === 'res').length, 4);
    // Alice takes two places: Mallory's two earliest ids are given up.
    for (let i = 0; i < 2; i++) {
      requests.onRequest('alice', bytes(newRequestId(), Date.now() + 5_000));
      executor.finishOne(1);
    }
    assert.deepEqual([replays.heldBy('mallory'), replays.heldBy('alice'), replays.givenUp], [2, 2, 2]);
    // Mallory sends her first request again (her connection dropped): its reply is still kept, so she gets it again.
    const before = replies.length;
    requests.onRequest('mallory', bytes(ids[0]!, deadline));
    assert.equal(replies.length, before + 1);
    assert.equal(codeOf(replies.at(-1)), 'res');
    assert.equal(executor.runs.length, 0, 'not run again');
    // Her second given-up request, sent again, is still known: its kept reply again, not a run.
    requests.onRequest('mallory', bytes(ids[1]!, deadline + 1));
    assert.equal(codeOf(replies.at(-1)), 'res');
    assert.equal(executor.runs.length, 0, 'not run again');
    assert.equal(replays.setAside, 2);
  });

  test('kept replies: past the bound the expired go first, then the oldest of the sender holding the most; its order stays bounded', () => {
    const sent = new SentReplies();
    const reply = Buffer.alloc(100);
    const later = Date.now() + 60_000;
    sent.keep('old', 'bob', reply, Date.now() - 1);
    sent.keep('alice-1', 'alice', reply, later);
    for (let i = 0; i < 20_000; i++) {
      sent.keep(`m-${i}`, 'mallory', reply, later);
      // Some of her replies are taken again (a re-sent request) and kept again: kept once, as the newest.
      if (i % 7 === 0) sent.keep(`m-${i}`, 'mallory', reply, later);
    }
    const inside = sent as unknown as { bySender: Map<string, unknown>; order: { items: unknown[]; head: number } };
    assert.equal(inside.bySender.has('bob'), false, 'expired: dropped first');
    assert.ok(sent.get('alice-1', 'alice'), "another sender's reply stays");
    assert.equal(sent.get('alice-1', 'mallory'), undefined, 'only to the sender it was for');
    const kept = Array.from({ length: 20_000 }, (_, i) => sent.get(`m-${i}`, 'mallory') !== undefined);
    const first = kept.indexOf(true);
    assert.equal(first, 20_000 - (KEPT_REPLIES - 1), 'her newest KEPT_REPLIES − 1 replies, the oldest gone first');
    assert.ok(kept.slice(first).every(Boolean));
    assert.ok(inside.order.items.length - inside.order.head <= 2 * KEPT_REPLIES + 64, 'the order holds O(kept) entries');
  });

  test('kept replies: the orders hold O(kept) entries and no bytes of a reply dropped since, whichever way it went', () => {
    const sent = new SentReplies();
    const later = Date.now() + 60_000;
    const small = Buffer.alloc(100);
    // Alice's replies expire but one, and go when Bob's stream passes the count bound (expired first).
    for (let i = 0; i < 1_000; i++) sent.keep(`a-${i}`, 'alice', small, Date.now() - 1);
    sent.keep('a-stays', 'alice', small, later);
    for (let i = 0; i < 100; i++) sent.keep(`b-${i}`, 'bob', small, later);
    // Dave's expire but one, and each is asked for again (get drops it).
    sent.keep('d-stays', 'dave', small, later);
    for (let i = 0; i < 500; i++) sent.keep(`d-${i}`, 'dave', small, Date.now() - 1);
    for (let i = 0; i < 500; i++) assert.equal(sent.get(`d-${i}`, 'dave'), undefined);
    const inside = sent as unknown as {
      byKey: Map<string, { bytes: Buffer }>;
      order: { items: object[] };
      bySender: Map<string, { count: number; order: { items: object[] } }>;
    };
    // Carol's large replies: a few fit the byte bound, each new one pushes out her oldest (views of one buffer here).
    const large = Buffer.alloc(4 * 1024 * 1024);
    for (let i = 0; i < 100; i++) sent.keep(`c-${i}`, 'carol', large.subarray(0), later);
    assert.ok(sent.get('a-stays', 'alice') && sent.get('d-stays', 'dave'), 'the unexpired replies stay');
    const queues = [
      { name: 'all', items: inside.order.items, kept: inside.byKey.size },
      ...[...inside.bySender].map(([name, held]) => ({ name, items: held.order.items, kept: held.count })),
    ];
    for (const { name, items, kept } of queues)
      assert.ok(items.length <= 4 * kept + 128, `${name}: ${items.length} entries for ${kept} kept`);
    // Bytes the orders reach: those of the replies kept at most.
    const reached = new Set<Buffer>();
    for (const { items } of queues) for (const item of items) for (const v of Object.values(item)) if (Buffer.isBuffer(v)) reached.add(v);
    const keptBytes = [...inside.byKey.values()].reduce((n, k) => n + k.bytes.byteLength, 0);
    const reachedBytes = [...reached].reduce((n, b) => n + b.byteLength, 0);
    assert.ok(reachedBytes <= keptBytes, `the orders reach ${reachedBytes} bytes; ${keptBytes} kept`);
  });

  test("one sender's stream of requests sent and cancelled at once does not push out another sender's kept reply", () => {
    const { requests, replies, executor, bytes, codeOf } = requestPath(10_000);
    const aliceId = newRequestId();
    const alice = bytes(aliceId, Date.now() + 60_000);
    requests.onRequest('alice', alice);
    executor.finishOne(1);
    const first = replies.at(-1)!;
    assert.equal(codeOf(first), 'res');
    // Mallory holds the run slot, then sends and cancels 2,000 requests: each is answered and its reply kept.
    requests.onRequest('mallory', bytes(newRequestId(), Date.now() + 60_000));
    for (let i = 0; i < 2_000; i++) {
      const id = newRequestId();
      requests.onRequest('mallory', bytes(id, Date.now() + 60_000));
      requests.onCancel('mallory', encodeMessage({ v: 1, kind: 'cancel', id }));
    }
    // Alice's connection dropped before her reply came: she sends the request again and gets the same reply.
    requests.onRequest('alice', alice);
    assert.equal(codeOf(replies.at(-1)), 'res');
    assert.equal(replies.at(-1)!.sender, 'alice');
    assert.deepEqual(replies.at(-1)!.reply, first.reply);
  });
});

describe('router adaptive concurrency (Envoy gradient controller)', () => {
  function limiter(options: AdaptiveConcurrencyOptions = {}) {
    const clock = { t: 0 };
    // Envoy's defaults, its min_concurrency of 3 included (the router's own floor is 20).
    const c = new AdaptiveConcurrency({ now: () => clock.t, random: () => 0, minConcurrency: 3, ...options });
    /** `n` requests started together, each taking `ms`, ended in order. */
    const wave = (n: number, ms: number) => {
      const permits = Array.from({ length: n }, () => c.acquire());
      clock.t += ms;
      for (const p of permits) p.release();
    };
    /** Waves of `ms` latency, as many requests each as the limit lets through, for `windows` sample windows. */
    const windows = (count: number, ms: number) => {
      for (let i = 0; i < count; i++) {
        wave(c.snapshot().limit, ms);
        clock.t += 100;
      }
    };
    return { c, clock, wave, windows };
  }
  const refusal = (c: AdaptiveConcurrency) => {
    try {
      c.acquire().release();
      return undefined;
    } catch (err) {
      return err as MeshError;
    }
  };

  test('starts in a minRTT window pinned at minConcurrency; beyond the limit, refused at once with MESH_OVERLOADED (HTTP 503)', () => {
    assert.equal(new AdaptiveConcurrency().snapshot().limit, 20, "the router's default floor");
    const { c } = limiter();
    const held = [c.acquire(), c.acquire(), c.acquire()];
    const refused = refusal(c);
    assert.equal(refused?.code, 'MESH_OVERLOADED');
    assert.equal(refused?.httpStatus, 503);
    assert.deepEqual(refused?.details, { limit: 3, held: 3, share: 3 });
    assert.equal(c.snapshot().refused, 1);
    held[0]!.release();
    held[0]!.release(); // a second release of one permit changes nothing
    assert.equal(c.snapshot().outstanding, 2);
    assert.equal(refusal(c), undefined);
  });

  test('at the limit, a caller under its share still goes on and the one holding more is refused (Netflix partition rule, equal shares)', () => {
    const { c } = limiter();
    const take = (caller: string) => {
      try {
        return c.acquire(caller);
      } catch (err) {
        return err as MeshError;
      }
    };
    const flood = [take('flood'), take('flood'), take('flood')];
    assert.ok(flood.every((p) => !(p instanceof MeshError)));
    // Alone at the limit: its share is the whole limit.
    assert.deepEqual((take('flood') as MeshError).details, { limit: 3, held: 3, share: 3 });
    // A second caller: a share of ⌈3 / 2⌉ = 2, granted beyond the limit; the flood's share drops to 2 too.
    const alice = [take('alice'), take('alice')];
    assert.ok(
      alice.every((p) => !(p instanceof MeshError)),
      'alice gets her share although the limit is reached',
    );
    assert.deepEqual((take('alice') as MeshError).details, { limit: 3, held: 2, share: 2 });
    assert.deepEqual((take('flood') as MeshError).details, { limit: 3, held: 3, share: 2 });
    // A third: share ⌈3 / 3⌉ = 1.
    const bob = take('bob');
    assert.ok(!(bob instanceof MeshError));
    assert.equal((take('bob') as MeshError).code, 'MESH_OVERLOADED');
    assert.deepEqual([c.snapshot().outstanding, c.snapshot().callers], [6, 3]);
    // The flood's permits end: below the limit again, anyone goes on, the flood included.
    for (const p of flood) (p as { release(): void }).release();
    assert.deepEqual([c.snapshot().outstanding, c.snapshot().callers], [3, 2]);
    assert.equal(take('carol') instanceof MeshError, false, 'carol: 3 outstanding, her share of ⌈3 / 3⌉ = 1');
    for (const p of [...alice, bob]) (p as { release(): void }).release();
    assert.equal(take('flood') instanceof MeshError, false);
    // However many callers come, the shares stop at twice the limit.
    const crowd = new AdaptiveConcurrency({ minConcurrency: 2, maxConcurrency: 2 });
    crowd.acquire('a');
    crowd.acquire('a');
    let letThrough = 0;
    for (let i = 0; i < 100; i++) {
      try {
        crowd.acquire(`address:10.0.0.${i}`);
        letThrough++;
      } catch (err) {
        assert.equal((err as MeshError).code, 'MESH_OVERLOADED');
      }
    }
    assert.deepEqual([letThrough, crowd.snapshot().outstanding], [2, 4]);
    // Requests that name no caller share one share.
    const anon = new AdaptiveConcurrency({ minConcurrency: 2, maxConcurrency: 2 });
    anon.acquire();
    anon.acquire();
    assert.throws(() => anon.acquire(), /MESH_OVERLOADED|adaptive concurrency/);
  });

  test('a caller without credentials is its address; an IPv6 address is its /64, an IPv4-mapped one its IPv4 address', () => {
    assert.equal(addressCaller('192.0.2.7'), 'address:192.0.2.7');
    assert.equal(addressCaller('::ffff:192.0.2.7'), 'address:192.0.2.7');
    assert.equal(addressCaller('2001:db8:1:2:3:4:5:6'), 'address:2001:db8:1:2::/64');
    assert.equal(addressCaller('2001:db8:1:2::9'), 'address:2001:db8:1:2::/64');
    assert.equal(addressCaller('2001:0db8:0001:0002:ffff:ffff:ffff:ffff'), 'address:2001:db8:1:2::/64');
    assert.equal(addressCaller('2001:db8::1'), 'address:2001:db8:0:0::/64');
    assert.equal(addressCaller('::1'), 'address:0:0:0:0::/64');
    assert.equal(addressCaller('fe80::1%eth0'), 'address:fe80:0:0:0::/64');
    assert.notEqual(addressCaller('2001:db8:1:3::9'), addressCaller('2001:db8:1:2::9'));
  });

  test('latency at the baseline grows the limit; latency above it shrinks it (gradient clamped to [0.5, 2], plus √ headroom)', () => {
    const { c, wave, windows } = limiter();
    for (let i = 0; i < 17; i++) wave(3, 10);
    const base = c.snapshot();
    assert.equal(base.inMinRttWindow, false);
    assert.equal(base.minRttMs, 10);
    assert.equal(base.limit, 3);
    // At the baseline: gradient 12.5 / 10 = 1.25 each window: 3 → 5 → 8 → 12 → ...
    windows(1, 10);
    assert.equal(c.snapshot().limit, 5);
    windows(1, 10);
    assert.equal(c.snapshot().limit, 8);
    windows(4, 10);
    const grown = c.snapshot().limit;
    assert.ok(grown > 30, `grew to ${grown}`);
    // Four times the baseline: gradient 0.3125, clamped to 0.5: the limit halves (plus its square root).
    windows(1, 40);
    const shrunk = c.snapshot();
    assert.equal(shrunk.gradient, 0.5);
    assert.equal(shrunk.limit, Math.floor(grown * 0.5 + Math.sqrt(grown * 0.5)));
    windows(6, 40);
    assert.ok(c.snapshot().limit < 10, `shrank to ${c.snapshot().limit}`);
    // Back at the baseline, it grows again.
    const low = c.snapshot().limit;
    windows(3, 10);
    assert.ok(c.snapshot().limit > low);
  });

  test('never beyond maxConcurrency nor below minConcurrency', () => {
    const { c, wave, windows } = limiter({ minConcurrency: 2, maxConcurrency: 6, minRttRequests: 4 });
    wave(2, 10);
    wave(2, 10);
    windows(10, 1);
    assert.equal(c.snapshot().limit, 6);
    windows(3, 1_000);
    assert.equal(c.snapshot().limit, 2);
  });

  test('requests started before a minRTT window do not count toward its baseline', () => {
    const { c, clock, wave } = limiter({ minRttRequests: 3, minRttIntervalMs: 1_000, jitterPct: 0 });
    wave(3, 10);
    assert.equal(c.snapshot().minRttMs, 10);
    // One slow request starts before the next window and ends inside it.
    const early = c.acquire();
    clock.t += 1_500;
    assert.equal(c.snapshot().inMinRttWindow, true);
    early.release();
    wave(1, 20);
    wave(1, 20);
    assert.equal(c.snapshot().inMinRttWindow, true, 'the early sample did not count');
    wave(1, 20);
    assert.equal(c.snapshot().minRttMs, 20);
  });

  test('five sample windows at the floor start a new minRTT window at once: the baseline is measured again', () => {
    const { c, windows, wave } = limiter({ minRttRequests: 3 });
    wave(3, 1);
    assert.equal(c.snapshot().minRttMs, 1);
    // 100 ms against a 1 ms baseline: at the floor, window after window, long before the 60 s interval.
    windows(5, 100);
    assert.equal(c.snapshot().inMinRttWindow, true);
    windows(1, 100);
    assert.deepEqual([c.snapshot().inMinRttWindow, c.snapshot().minRttMs], [false, 100]);
    windows(2, 100);
    assert.ok(c.snapshot().limit > 3, 'and the limit grows again at the new baseline');
  });

  test('over HTTP: a request beyond the limit answers 503 MESH_OVERLOADED at once, /metrics shows the limit, and serving goes on', async (t) => {
    const broker = await brokerFor(t);
    // Each request waits 300 ms at the agent's door, so four sent together are all in flight at once.
    await agentFor(t, { brokerUrl: broker.url, faults: { linkDelayMs: 300 } });
    const router = await routerFor(t, broker.url, { adaptiveConcurrency: { minConcurrency: 2, maxConcurrency: 2 }, hedging: false });
    const http = await startRouterHttp(router, { port: 0 });
    t.after(() => http.close());
    await router.waitForModel('kws', 10_000);
    const data = Array.from(sampleInputs('kws', 1)['onnx::Flatten_0']!.data as Float32Array);
    const infer = async () => {
      const res = await fetch(`${http.url}/v2/models/kws/infer`, {
        method: 'POST',
        headers: { 'content-type': 'application/json' },
        body: JSON.stringify({
          inputs: [{ name: 'onnx::Flatten_0', shape: [1, 25, 96], datatype: 'FP32', data }],
          parameters: { deadline_ms: 10_000 },
        }),
      });
      return { status: res.status, body: (await res.json()) as { code?: string; details?: { limit?: number } } };
    };
    const started = performance.now();
    const answers = await Promise.all([infer(), infer(), infer(), infer()]);
    const statuses = answers.map((a) => a.status).sort();
    assert.deepEqual(statuses, [200, 200, 503, 503], JSON.stringify(answers.map((a) => a.body.code)));
    for (const a of answers.filter((x) => x.status === 503)) assert.deepEqual([a.body.code, a.body.details?.limit], ['MESH_OVERLOADED', 2]);
    assert.ok(performance.now() - started < 5_000);
    const metrics = await (await fetch(`${http.url}/metrics`)).text();
    assert.match(metrics, /^edge_mesh_router_concurrency_limit 2$/m);
    assert.match(metrics, /^edge_mesh_router_concurrency_refused_total 2$/m);
    assert.equal((await infer()).status, 200);
  });

  test('over HTTP: one credential flooding the limit does not shut out another credential', async (t) => {
    const broker = await brokerFor(t);
    await agentFor(t, { brokerUrl: broker.url, faults: { linkDelayMs: 300 } });
    const router = await routerFor(t, broker.url, { adaptiveConcurrency: { minConcurrency: 2, maxConcurrency: 2 }, hedging: false });
    const flood = makeApiKey('flood', ['infer']);
    const alice = makeApiKey('alice', ['infer']);
    const http = await startRouterHttp(router, { port: 0, auth: { trustedOperators: [], apiKeys: [flood.entry, alice.entry] } });
    t.after(() => http.close());
    await router.waitForModel('kws', 10_000);
    const data = Array.from(sampleInputs('kws', 1)['onnx::Flatten_0']!.data as Float32Array);
    const infer = async (key: string) => {
      const res = await fetch(`${http.url}/v2/models/kws/infer`, {
        method: 'POST',
        headers: { 'content-type': 'application/json', authorization: `Bearer ${key}` },
        body: JSON.stringify({
          inputs: [{ name: 'onnx::Flatten_0', shape: [1, 25, 96], datatype: 'FP32', data }],
          parameters: { deadline_ms: 10_000 },
        }),
      });
      return { status: res.status, body: (await res.json()) as { code?: string; details?: Record<string, number> } };
    };
    // The flood holds both permits (300 ms each at the agent's door) and is refused beyond them.
    const floods = [infer(flood.key), infer(flood.key)];
    await new Promise((r) => setTimeout(r, 100));
    const [refusedFlood, aliceAnswer] = await Promise.all([infer(flood.key), infer(alice.key)]);
    assert.equal(refusedFlood.status, 503);
    assert.deepEqual(refusedFlood.body.details, { limit: 2, held: 2, share: 2 });
    assert.equal(aliceAnswer.status, 200, `alice: ${JSON.stringify(aliceAnswer.body)}`);
    assert.deepEqual(
      (await Promise.all(floods)).map((a) => a.status),
      [200, 200],
    );
  });
});

describe('bench contention: how its figures are counted', () => {
  test('errors by kind: refusals at admission, deadlines after acceptance, the rest', () => {
    assert.deepEqual(['MESH_OVERLOADED', 'MESH_BUSY', 'MESH_DEADLINE_EXCEEDED', 'MESH_TIMEOUT', 'MESH_AGENT_LOST', 'OTHER'].map(kindOf), [
      'admission',
      'admission',
      'deadline',
      'deadline',
      'other',
      'other',
    ]);
  });

  test('recovery: the first 250 ms window from which every window is within the bound and without errors', () => {
    const at = (sentAt: number, ms: number, code?: string) => ({ sentAt, ms, code, http: false });
    const stopped = 10_000;
    const fine = [at(10_010, 5), at(10_300, 5), at(10_600, 5)];
    assert.equal(recoveryMs(fine, stopped, 50), 0);
    // Slow until 500 ms after the stop, then fine.
    const slow = [at(10_010, 400), at(10_300, 300), at(10_600, 5), at(10_900, 5)];
    assert.equal(recoveryMs(slow, stopped, 50), 500);
    // A window with an error is not recovered, even if its answers were fast; a relapse moves the time on.
    const relapse = [at(10_010, 5), at(10_300, 5, 'MESH_OVERLOADED'), at(10_600, 5), at(10_900, 400), at(11_200, 5)];
    assert.equal(recoveryMs(relapse, stopped, 50), 1_000);
    // Still slow in the last window: not recovered.
    assert.equal(recoveryMs([at(10_010, 5), at(10_300, 400)], stopped, 50), null);
  });
});

describe("the app's store of sent requests (sdk/src/payments.ts, SentRequests)", () => {
  const store = (max: number) => {
    const clock = { now: 1_000_000 };
    const sent = new SentRequests(max, () => clock.now);
    const note = (key: string, deadline: number) =>
      sent.note(key, { deadline, inputHash: undefined, inputs: undefined, units: 1, settled: false });
    return { sent, note, clock };
  };

  test('once full, each request sends the oldest away with one look, not a walk of the whole store', () => {
    const max = 1_000;
    const { sent, note, clock } = store(max);
    for (let i = 0; i < max; i++) note(`r-${i}`, clock.now + 5_000);
    assert.equal(sent.examined, 0, 'nothing looked at while there is room');
    for (let i = max; i < 3 * max; i++) note(`r-${i}`, clock.now + 5_000);
    assert.equal(sent.size, max);
    assert.equal(sent.get(`r-${2 * max - 1}`), undefined, 'the oldest sent went first');
    assert.ok(sent.get(`r-${2 * max}`) && sent.get(`r-${3 * max - 1}`), 'the newest stay');
    // One walk for stale requests (at most one a second), then one look per request.
    assert.ok(sent.examined <= max + 2 * (2 * max), `${sent.examined} entries looked at for ${2 * max} requests`);
  });

  test('requests whose receipts never came go a minute past their deadline, though the store is not full', () => {
    const { sent, note, clock } = store(1_000);
    for (let i = 0; i < 10; i++) note(`r-${i}`, clock.now + 5_000);
    note('long', clock.now + 600_000);
    clock.now += 30_000;
    note('next-0', clock.now + 5_000);
    assert.equal(sent.size, 12, 'not stale yet: all remembered');
    clock.now += 40_000;
    note('next-1', clock.now + 5_000);
    assert.equal(sent.get('r-0'), undefined, 'a minute past its deadline: forgotten');
    assert.ok(sent.get('long') && sent.get('next-0'), 'those still due stay');
    assert.equal(sent.size, 3);
  });

  test('stale requests go before any still due, wherever they sit: a long job sent among short ones is still paid', () => {
    // 1 in 50 has a 10-minute deadline, the others 5 s; two minutes on, the short ones are stale, the long ones due.
    const max = 1_000;
    const { sent, note, clock } = store(max);
    for (let i = 0; i < max; i++) note(`r-${i}`, clock.now + (i % 50 === 0 ? 600_000 : 5_000));
    clock.now += 120_000;
    for (let i = 0; i < max / 2; i++) {
      note(`next-${i}`, clock.now + 5_000);
      if (i % 100 === 99) clock.now += 1_000;
    }
    const due = Array.from({ length: max / 50 }, (_, j) => sent.get(`r-${j * 50}`) !== undefined);
    assert.deepEqual(
      due,
      due.map(() => true),
      'every long job is remembered: its receipt is still due',
    );
    assert.equal(sent.get('r-1'), undefined, 'a stale one went');
    assert.equal(sent.size, max / 50 + max / 2);
  });
});
