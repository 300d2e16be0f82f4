/**
 * Overload (docs/operations.md, "Overload"): the agent's admission refuses at once what its queue cannot serve
 * before the deadline, whatever the sender claims; the router's adaptive concurrency limit (router/src/concurrency.ts)
 * shrinks when latency rises above its min-RTT baseline and grows when it does not.
 */
import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import {
  decodeMessage,
  type ErrorReply,
  encodeMessage,
  encodeTensorMap,
  type InferReply,
  type MeshError,
  newRequestId,
  type Tensor,
} from '@edge-mesh/protocol';
import type { Executor, JobCallback } from '../edge-agent/src/executor.ts';
import { Faults } from '../edge-agent/src/faults.ts';
import { AgentRequests, ReplayGuard } from '../edge-agent/src/requests.ts';
import { type Job, Scheduler } from '../edge-agent/src/scheduler.ts';
import type { AgentCounters } from '../edge-agent/src/types.ts';
import { quiet } from './helpers.ts';

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
  /** Ends the oldest run, reporting `execMs`. */
  finishOne(execMs: number) {
    const run = this.runs.shift()!;
    run.callback(undefined, { outputs: {}, execMs });
    this.onIdle();
  }
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
  const job = (deadlineInMs: number): Job => ({
    key: `j${n++}`,
    id: new Uint8Array(16),
    senderId: 's',
    model: 'm',
    inputs: {},
    deadline: now + deadlineInMs,
    receivedAt: 0,
  });
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
  test('a request the agent cannot serve in time gets a MESH_OVERLOADED reply at once, with its queue, and is counted', () => {
    const replies: (InferReply | ErrorReply)[] = [];
    const counters: AgentCounters = { received: 0, served: 0, errors: {}, reconnects: 0, announcements: 0, replays: 0 };
    const model = {
      name: 'm',
      inputs: [{ name: 'x', dtype: 'float32' as const, shape: [1] }],
      outputs: [],
      provider: 'cpu',
      latencyMs: 50,
    };
    const requests = new AgentRequests({
      agentId: 'agent',
      maxMessageBytes: 1 << 20,
      maxElements: 1 << 20,
      models: new Map([['m', model]]),
      replays: new ReplayGuard(100),
      payments: undefined,
      counters,
      faults: new Faults(),
      logger: quiet,
      reply: (_sender, payload) => void replies.push(decodeMessage(payload, ['res', 'err'])),
      closed: () => false,
    });
    const scheduler = new Scheduler(8, requests.finished);
    const executor = new HeldExecutor(1);
    scheduler.addModel('m', 50, executor);
    requests.attach(scheduler);
    const send = (deadlineInMs: number) =>
      requests.onRequest(
        'app',
        encodeMessage({
          v: 1,
          kind: 'req',
          id: newRequestId(),
          deadline: Date.now() + deadlineInMs,
          model: 'm',
          inputs: encodeTensorMap({ x: { dtype: 'float32', shape: [1], data: new Float32Array([1]) } }),
        }),
      );
    send(5_000);
    send(5_000);
    assert.equal(replies.length, 0);
    send(60);
    assert.equal(replies.length, 1);
    const reply = replies[0]!;
    assert.ok(reply.kind === 'err' && reply.code === 'MESH_OVERLOADED', JSON.stringify(reply));
    assert.equal(reply.kind === 'err' && reply.rif, 2);
    assert.deepEqual(counters.errors, { MESH_OVERLOADED: 1 });
  });
});
