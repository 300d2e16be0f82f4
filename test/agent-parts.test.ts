/**
 * The agent's parts on their own (edge-agent/src: options, models, requests, status, connection,
 * faults, pool): pure functions called directly, and the request path run against a real worker pool
 * holding the real wake-word model, its replies read as the bytes it would publish. The whole agent
 * over a real broker is tested in mesh.test.ts and hostile.test.ts.
 */
import assert from 'node:assert/strict';
import os from 'node:os';
import path from 'node:path';
import { type TestContext, test } from 'node:test';
import { parseAgentFaults, readManifest } from '@edge-mesh/agent';
import { sampleInputs } from '@edge-mesh/demo';
import {
  decodeMessage,
  type ErrorReply,
  encodeMessage,
  encodeTensorMap,
  generateIdentity,
  type InferReply,
  MeshError,
  newRequestId,
  RECEIPT_STATUS,
  requestIdHex,
  type Tensor,
  topics,
  verifyStatus,
} from '@edge-mesh/protocol';
import mqtt from 'mqtt';
import pino from 'pino';
// The agent's modules are internal to its package; the tests reach them by path, as its own tests would.
import { AgentLink, routeTopic } from '../edge-agent/src/connection.ts';
import { AgentDeployments, type DeployHooks } from '../edge-agent/src/deploy.ts';
import { Faults } from '../edge-agent/src/faults.ts';
import { checkInputs, describeModels } from '../edge-agent/src/models.ts';
import { resolveOptions } from '../edge-agent/src/options.ts';
import { WorkerPool, workerExecArgv } from '../edge-agent/src/pool.ts';
import { AgentRequests, errorReply, ReplayGuard, receiptStatus, unitsUsed } from '../edge-agent/src/requests.ts';
import { Scheduler } from '../edge-agent/src/scheduler.ts';
import { loadReport, StatusBoard } from '../edge-agent/src/status.ts';
import { newAgentCounters } from '../edge-agent/src/types.ts';
import type { LoadedModel } from '../edge-agent/src/worker-protocol.ts';
import { brokerFor, modelsDir, quiet, waitFor } from './helpers.ts';

const meshCode = (code: string) => (err: unknown) => err instanceof MeshError && err.code === code;

test('options: defaults filled in, every problem named in one MESH_CONFIG error', () => {
  const identity = generateIdentity('agent');
  const o = resolveOptions({ brokerUrl: 'mqtt://x', modelsDir: '/m', identity });
  assert.equal(o.agentId, identity.id);
  assert.equal(o.ephemeral, false);
  assert.equal(o.workers, 1);
  assert.equal(o.queueLimit, 64);
  assert.equal(o.pipelineDepth, 2);
  assert.equal(o.awaitAnnounce, true);
  assert.equal(o.inlineMaxMs, 0.5);
  assert.equal(resolveOptions({ brokerUrl: 'mqtt://x', modelsDir: '/m', identity, inlineMaxMs: 0 }).inlineMaxMs, 0);

  const ephemeral = resolveOptions({ brokerUrl: 'mqtt://x', modelsDir: '/m' });
  assert.equal(ephemeral.ephemeral, true);
  assert.equal(ephemeral.identity.role, 'agent');

  assert.throws(
    () =>
      resolveOptions({ brokerUrl: 'mqtt://x', modelsDir: '/m', identity, workers: 0, queueLimit: 1.5, heartbeatMs: 10, inlineMaxMs: -1 }),
    (err: unknown) =>
      err instanceof MeshError &&
      err.code === 'MESH_CONFIG' &&
      /workers must be/.test(err.message) &&
      /queueLimit must be/.test(err.message) &&
      /heartbeatMs must be/.test(err.message) &&
      /inlineMaxMs must be/.test(err.message),
  );
  assert.throws(
    () => resolveOptions({ brokerUrl: 'mqtt://x', modelsDir: '/m', identity: generateIdentity('app') }),
    meshCode('MESH_CONFIG'),
  );
  assert.throws(
    () => resolveOptions({ brokerUrl: 'mqtt://x', modelsDir: '/m', agentId: 'a' } as Parameters<typeof resolveOptions>[0]),
    meshCode('MESH_CONFIG'),
  );
});

const model: LoadedModel = {
  name: 'm',
  inputs: [{ name: 'x', dtype: 'float32', shape: [1, 'frames', 3] }],
  outputs: [{ name: 'y', dtype: 'float32', shape: [1] }],
  provider: 'cpu',
  latencyMs: 0.0123456,
};
const f32 = (shape: number[]): Tensor => ({ dtype: 'float32', shape, data: new Float32Array(shape.reduce((a, b) => a * b, 1)) });

test('models: inputs checked against the model by name, dtype, rank and fixed dims; free dims take any size', () => {
  checkInputs(model, { x: f32([1, 7, 3]) });
  checkInputs(model, { x: f32([1, 1, 3]) });
  assert.throws(() => checkInputs(model, {}), meshCode('MESH_BAD_INPUT'));
  assert.throws(() => checkInputs(model, { x: { dtype: 'int32', shape: [1, 2, 3], data: new Int32Array(6) } }), meshCode('MESH_BAD_INPUT'));
  assert.throws(() => checkInputs(model, { x: f32([1, 3]) }), meshCode('MESH_BAD_INPUT'));
  assert.throws(() => checkInputs(model, { x: f32([2, 2, 3]) }), /dim 0 = 1/);
  assert.throws(() => checkInputs(model, { x: f32([1, 2, 3]), z: f32([1]) }), /no input named z/);
});

test('models: the status describes each model from its manifest entry and what loading measured', () => {
  const entry = { name: 'm', version: '2', file: 'm.onnx', sha256: 'a'.repeat(64), priceMicros: 5 };
  const [info] = describeModels([entry], new Map([['m', model]]));
  assert.deepEqual(info, {
    name: 'm',
    version: '2',
    sha256: 'a'.repeat(64),
    priceMicros: 5,
    latencyMs: 0.012,
    inputs: model.inputs,
    outputs: model.outputs,
  });
  assert.throws(() => describeModels([entry], new Map()), meshCode('MESH_INTERNAL'));
});

test('requests: an id is refused as a replay until its deadline, expired requests are not remembered, and the bound holds', () => {
  const guard = new ReplayGuard(2);
  assert.equal(guard.remember('a', 's', 1_000, 500), 'ok');
  assert.equal(guard.remember('a', 's', 1_000, 600), 'replay');
  assert.equal(guard.remember('late', 's', 100, 500), 'ok');
  assert.equal(guard.remember('late', 's', 100, 500), 'ok', 'an expired request is left to the scheduler');
  assert.equal(guard.remember('b', 's', 2_000, 500), 'ok');
  assert.equal(guard.remember('c', 's', 2_000, 500), 'full');
  // At 1,500 'a' has expired: making room drops it.
  assert.equal(guard.remember('c', 's', 2_000, 1_500), 'ok');
  assert.equal(guard.size, 2);
  guard.forget('c');
  assert.equal(guard.remember('c', 's', 2_000, 1_500), 'ok');
  guard.prune(2_500);
  assert.equal(guard.size, 0);
});

test('requests: a full replay guard drops expired ids before it refuses, and at most once per interval', () => {
  const guard = new ReplayGuard(3);
  for (const key of ['a', 'b', 'c']) assert.equal(guard.remember(key, 's', 10_000, 0), 'ok');
  // Filled with far deadlines by its only sender: every further request of that sender is refused.
  for (let now = 1; now < 1_000; now += 10) assert.equal(guard.remember(`x${now}`, 's', 20_000, now), 'full');
  assert.equal(guard.remember('a', 's', 20_000, 5_000), 'replay');
  // Past the deadlines a full guard drops what expired and takes the request in the room it made.
  assert.equal(guard.remember('d', 's', 30_000, 10_001), 'ok');
  assert.equal(guard.size, 1);
  assert.equal(guard.remember('a', 's', 30_000, 10_002), 'ok', 'an expired id is forgotten');
  assert.equal(guard.remember('b', 's', 10_003 + 5, 10_003), 'ok');
  // Full again; 'b' expires at 10,008. Within the interval after the last prune the guard answers 'full' without one.
  assert.equal(guard.remember('e', 's', 30_000, 10_050), 'full');
  assert.equal(guard.remember('e', 's', 30_000, 10_001 + ReplayGuard.PRUNE_WHEN_FULL_MS), 'ok');
  assert.equal(guard.size, 3);
  // Ids leave in deadline order whatever order they came in, and what a sender forgot leaves nothing behind.
  const mixed = new ReplayGuard(100);
  for (const [key, deadline] of [
    ['p', 500],
    ['q', 300],
    ['r', 900],
    ['t', 100],
    ['u', 700],
  ] as const)
    mixed.remember(key, 's', deadline, 0);
  mixed.forget('r');
  mixed.forget('q');
  for (const [now, left] of [
    [200, 2],
    [600, 1],
    [800, 0],
  ] as const) {
    mixed.prune(now);
    assert.equal(mixed.size, left, `at ${now}`);
    assert.equal(mixed.heldBy('s'), left);
  }
});

test('requests: a sender that fills the replay guard gives up places to other senders; none is kept out, however many act together', () => {
  const guard = new ReplayGuard(10);
  // Alone, one sender may fill the guard, and then is refused.
  for (let i = 0; i < 10; i++) assert.equal(guard.remember(`a${i}`, 'mallory', 60_000 + i, 0), 'ok');
  assert.equal(guard.remember('a10', 'mallory', 60_100, 1), 'full');
  // Another sender takes places from her, her earliest deadlines first, until the two hold five each.
  const alice = Array.from({ length: 7 }, (_, i) => guard.remember(`b${i}`, 'alice', 5_000, 2));
  assert.deepEqual(alice, ['ok', 'ok', 'ok', 'ok', 'ok', 'full', 'full']);
  assert.deepEqual([guard.size, guard.heldBy('mallory'), guard.heldBy('alice'), guard.givenUp], [10, 5, 5, 5]);
  // Her given-up ids are set aside, still known: sent again, each is a replay.
  assert.equal(guard.setAside, 5);
  assert.equal(guard.remember('a0', 'mallory', 60_000, 3), 'replay');
  assert.equal(guard.remember('a4', 'mallory', 60_004, 3), 'replay');
  // Replays of ids still held are replays, whoever sends them; her later deadlines wait for room like anyone's.
  assert.equal(guard.remember('b0', 'mallory', 60_000, 4), 'replay');
  assert.equal(guard.remember('a9', 'mallory', 60_009, 4), 'replay');
  assert.equal(guard.remember('a11', 'mallory', 60_200, 4), 'full');

  // Four senders acting together cannot keep a fifth out, nor one that came before them with fewer ids.
  const shared = new ReplayGuard(12);
  let k = 0;
  for (const s of ['m1', 'm2', 'm3', 'm4']) while (shared.remember(`k${k++}`, s, 600_000, 0) === 'ok');
  assert.equal(shared.size, 12);
  assert.equal(shared.remember('alice-1', 'alice', 5_000, 1), 'ok');
  const router = new ReplayGuard(100);
  for (let i = 0; i < 30; i++) router.remember(`r${i}`, 'router', 10_000, 0);
  for (let i = 0; i < 70; i++) router.remember(`m${i}`, 'mallory', 600_000, 0);
  for (let i = 0; i < 2; i++) assert.equal(router.remember(`s${i}`, `sybil${i}`, 600_000, 0), 'ok');
  assert.equal(router.remember('r30', 'router', 10_000, 1), 'ok', 'the router holds fewer than Mallory: she gives up a place');
  assert.equal(router.heldBy('router'), 31);
  assert.equal(router.size, 100, 'the bound holds');

  // Expired floors go; a sender whose ids all expired starts afresh.
  guard.prune(70_000);
  assert.equal(guard.size, 0);
  assert.equal(guard.remember('a0', 'mallory', 80_000, 70_000), 'ok');
});

test('requests: once as many ids as the limit are set aside, a given-up id leaves its sender a floor instead', () => {
  const guard = new ReplayGuard(3);
  let now = 0;
  for (let i = 0; i < 3; i++) guard.remember(`m${i}`, 'mallory', 100_000 + i, now);
  // Alice's short requests each take a place from Mallory, and expire; Mallory fills the room again.
  for (let round = 0; round < 4; round++) {
    assert.equal(guard.remember(`a${round}`, 'alice', now + 10, now), 'ok');
    now += 200;
    guard.prune(now);
    assert.equal(guard.remember(`m${3 + round}`, 'mallory', 100_003 + round, now), 'ok');
  }
  assert.deepEqual([guard.givenUp, guard.setAside, guard.size], [4, 3, 3]);
  // The fourth given-up id (m3, deadline 100,003) found the store full: Mallory's floor is its deadline. Her requests
  // with a deadline at or before it cannot be told from it, and are refused; a later one waits for room as anyone's.
  assert.equal(guard.remember('m3', 'mallory', 100_003, now), 'given-up');
  assert.equal(guard.remember('new', 'mallory', 100_002, now), 'given-up');
  assert.equal(guard.remember('later', 'mallory', 200_000, now), 'full');
  // Alice is not affected; the ids set aside are still replays.
  assert.equal(guard.remember('m0', 'mallory', 100_000, now), 'replay');
  assert.equal(guard.remember('a-next', 'alice', now + 10, now), 'ok');
  // Past the deadlines, all of it goes.
  guard.prune(300_000);
  assert.deepEqual([guard.size, guard.setAside], [0, 0]);
  assert.equal(guard.remember('new', 'mallory', 400_000, 300_000), 'ok');
  // Before that store is full, a sender that gave up a ten-minute id still has its two-second requests taken.
  const mixed = new ReplayGuard(10);
  for (let i = 0; i < 9; i++) mixed.remember(`r${i}`, 'router', 600_000, 0);
  mixed.remember('m0', 'mallory', 600_000, 0);
  assert.equal(mixed.remember('a0', 'alice', 5_000, 1), 'ok');
  assert.equal(mixed.setAside, 1);
  mixed.prune(6_000);
  assert.equal(mixed.remember('r-interactive', 'router', 8_000, 6_000), 'ok');
});

test('requests: an id forgotten by one sender and then sent by another is counted for that other sender only', () => {
  // Mallory forgets an id out of order (a payment refusal), which leaves her heap entry behind, and Eve sends the same
  // id with the same deadline. Mallory's leftover entry must neither release Eve's id nor be given up in its place.
  const guard = new ReplayGuard(5);
  for (const key of ['y1', 'y2', 'y3']) guard.remember(key, 'mallory', 500_000, 0);
  guard.remember('x', 'mallory', 1_000, 0);
  guard.forget('x');
  assert.equal(guard.remember('x', 'eve', 1_000, 0), 'ok');
  guard.remember('z', 'carol', 100, 0);
  assert.equal(guard.size, 5);
  // Full: Dave takes a place from Mallory, the top holder. Eve's 'x' stays remembered.
  assert.equal(guard.remember('n', 'dave', 500_000, 0), 'ok');
  assert.equal(guard.remember('x', 'eve', 1_000, 200), 'replay', "Eve's request is not taken a second time");
  assert.deepEqual(
    ['mallory', 'eve', 'carol', 'dave'].map((s) => guard.heldBy(s)),
    [2, 1, 1, 1],
  );
  // When the deadlines pass, each sender's count goes to zero, and a full guard still makes room for a newcomer.
  const counts = new ReplayGuard(4);
  counts.remember('y', 'mallory', 500_000, 0);
  for (let i = 0; i < 3; i++) {
    counts.remember(`x${i}`, 'mallory', 1_000 - i, 0);
    counts.forget(`x${i}`);
    assert.equal(counts.remember(`x${i}`, 'eve', 1_000 - i, 0), 'ok');
  }
  counts.prune(10_000);
  assert.deepEqual([counts.size, counts.heldBy('mallory'), counts.heldBy('eve')], [1, 1, 0]);
  for (let i = 0; i < 3; i++) counts.remember(`c${i}`, `c${i}`, 500_000, 10_001);
  assert.equal(counts.size, 4);
  assert.equal(counts.remember('alice-1', 'alice', 20_000, 10_001), 'full', 'everyone holds one: no place to take');
  assert.equal(counts.remember('y-more', 'mallory', 600_000, 10_001), 'full');
});

test('requests: a receipt charges the units done (a cancelled one-shot run has none); deadline drops and late cancels are timeouts', () => {
  const err = (code: ConstructorParameters<typeof MeshError>[0]) => new MeshError(code, 'x');
  assert.equal(receiptStatus(undefined, false), RECEIPT_STATUS.ok);
  assert.equal(receiptStatus(err('MESH_CANCELLED'), false), RECEIPT_STATUS.cancelled);
  assert.equal(receiptStatus(err('MESH_CANCELLED'), true), RECEIPT_STATUS.timeout);
  assert.equal(receiptStatus(err('MESH_DEADLINE_EXCEEDED'), true), RECEIPT_STATUS.timeout);
  assert.equal(receiptStatus(err('MESH_INFERENCE_FAILED'), false), RECEIPT_STATUS.failed);
  // The units done are charged: a one-shot run's unit is done only with its outputs, so a cancel (queued or running) is 0 units.
  assert.equal(unitsUsed(RECEIPT_STATUS.ok, 1), 1);
  assert.equal(unitsUsed(RECEIPT_STATUS.cancelled, 1), 1);
  assert.equal(unitsUsed(RECEIPT_STATUS.cancelled, 0), 0);
  assert.equal(unitsUsed(RECEIPT_STATUS.timeout, 1), 0);
  assert.equal(unitsUsed(RECEIPT_STATUS.failed, 1), 0);

  const id = newRequestId();
  const reply = decodeMessage(errorReply('agent-x', id, new MeshError('MESH_BUSY', 'y'.repeat(5_000))), ['err']);
  assert.equal(reply.code, 'MESH_BUSY');
  assert.equal(reply.message.length, 2048);
  assert.equal(requestIdHex(reply.id), requestIdHex(id));
});

test('connection: topics route by kind to an authenticated sender; anything else is ignored', () => {
  const agent = generateIdentity('agent').id;
  const app = generateIdentity('app').id;
  assert.deepEqual(routeTopic(agent, topics.agentRequest(agent, app)), { kind: 'request', senderId: app });
  assert.deepEqual(routeTopic(agent, topics.agentCancel(agent, app)), { kind: 'cancel', senderId: app });
  assert.deepEqual(routeTopic(agent, topics.agentVoucher(agent, app)), { kind: 'voucher', senderId: app });
  assert.equal(routeTopic(agent, topics.agentRequest(agent, 'Not An Id')), undefined);
  assert.equal(routeTopic(agent, topics.agentRequest(generateIdentity('agent').id, app)), undefined);
  assert.equal(routeTopic(agent, topics.agentStatus(agent)), undefined);
});

test('connection: a message handler that throws is counted and logged, and the next message is served', async (t) => {
  const broker = await brokerFor(t);
  const identity = generateIdentity('agent');
  const app = generateIdentity('app').id;
  const counters = newAgentCounters();
  const errors: string[] = [];
  const logger = pino({ level: 'error' }, { write: (line: string) => void errors.push(line) });
  const served: string[] = [];
  const board = new StatusBoard({
    identity,
    models: [],
    hardware: { platform: 'linux', arch: 'x64', cpus: 2, cpuModel: 'x', memoryMb: 512 },
    providers: ['cpu'],
    workers: 1,
    queueLimit: 8,
  });
  const link = new AgentLink({
    brokerUrl: broker.url,
    brokerAccess: {},
    identity,
    ephemeral: true,
    keepaliveS: 10,
    backoff: undefined,
    will: board.offlinePayload,
    retainStatus: false,
    vouchers: false,
    status: () => board.status(),
    handlers: {
      request: (_sender, payload) => {
        if (payload.toString() === 'boom') throw new Error('a bug this message reaches');
        served.push(payload.toString());
      },
      cancel: () => {},
      voucher: () => {},
    },
    onUnauthorized: () => {},
    counters,
    faults: new Faults(),
    logger,
  });
  t.after(() => link.close());
  await link.announced;
  const client = await mqtt.connectAsync(broker.url, { clientId: app, reconnectPeriod: 0 });
  t.after(() => client.endAsync());
  for (const body of ['boom', 'after']) await client.publishAsync(topics.agentRequest(identity.id, app), Buffer.from(body), { qos: 1 });
  await waitFor(() => served.length === 1, 5_000, 'the message after the failing one');
  assert.deepEqual(served, ['after']);
  assert.equal(counters.errors.MESH_INTERNAL, 1);
  assert.match(errors.join(''), /message handler failed/);
});

test('status: signed and verifiable, one session for the status and the will, injected slowness in the load report', () => {
  const identity = generateIdentity('agent');
  const options = {
    identity,
    models: [],
    hardware: { platform: 'linux', arch: 'arm64', cpus: 4, cpuModel: 'x', memoryMb: 512 },
    providers: ['cpu'],
    workers: 1,
    queueLimit: 64,
  };
  const board = new StatusBoard(options);
  const online = board.status();
  assert.ok(verifyStatus(online));
  assert.equal(online.state, 'online');
  assert.equal(online.workers, 1);
  board.state = 'draining';
  assert.equal(board.status().state, 'draining');
  const will = decodeMessage(board.offlinePayload, ['status']);
  assert.ok(verifyStatus(will));
  assert.equal(will.state, 'offline');
  assert.equal(will.session, online.session);
  assert.notEqual(new StatusBoard(options).session, online.session, 'each run has its own session');

  const queues = () => ({
    queued: 1,
    inFlight: 2,
    models: { m: { queued: 1, inFlight: 2, serviceMs: 0.5, served: 9, failed: 0 } },
  });
  const plain = loadReport(identity.id, 7, 1, queues());
  assert.equal(plain.seq, 7);
  assert.equal(plain.models.m!.serviceMs, 0.5);
  assert.equal(loadReport(identity.id, 8, 1, queues(), { extraExecMs: 20 }).models.m!.serviceMs, 20.5);
});

test('faults: absent or negative values mean none', () => {
  const faults = new Faults({ linkDelayMs: 5, claimIdle: true, failRequests: true });
  assert.deepEqual([faults.linkDelayMs, faults.extraExecMs, faults.claimIdle, faults.failRequests], [5, 0, true, true]);
  faults.set({ extraExecMs: -3 });
  assert.deepEqual([faults.linkDelayMs, faults.extraExecMs, faults.claimIdle, faults.failRequests], [0, 0, false, false]);
});

test('faults: a load report claiming idle says nothing is queued or running and leaves the injected slowness out', () => {
  const queues = () => ({
    queued: 3,
    inFlight: 1,
    models: { m: { queued: 3, inFlight: 1, serviceMs: 0.5, served: 9, failed: 0 } },
  });
  const honest = loadReport('a', 1, 1, queues(), { extraExecMs: 20 });
  assert.deepEqual([honest.queued, honest.inFlight, honest.models.m!.queued, honest.models.m!.inFlight], [3, 1, 3, 1]);
  assert.equal(honest.models.m!.serviceMs, 20.5);
  const liar = loadReport('a', 2, 1, queues(), { extraExecMs: 20, claimIdle: true });
  assert.deepEqual([liar.queued, liar.inFlight, liar.models.m!.queued, liar.models.m!.inFlight], [0, 0, 0, 0]);
  assert.equal(liar.models.m!.serviceMs, 0.5);
  assert.equal(liar.models.m!.served, 9, 'the counts of work done are left as they are');
  assert.equal(loadReport('a', 3, 1, queues(), { extraExecMs: 20, claimIdle: true, claimServiceMs: 0.05 }).models.m!.serviceMs, 0.05);
});

test('faults: MESH_AGENT_FAULTS is read as JSON, and anything but known keys with numbers and booleans is MESH_CONFIG', () => {
  assert.deepEqual(parseAgentFaults('{"extraExecMs":20,"claimIdle":true}'), { extraExecMs: 20, claimIdle: true });
  assert.deepEqual(parseAgentFaults('{"failRequests":true,"linkDelayMs":0}'), { failRequests: true, linkDelayMs: 0 });
  assert.deepEqual(parseAgentFaults('{"claimServiceMs":0.05}'), { claimServiceMs: 0.05 });
  assert.deepEqual(parseAgentFaults('{}'), {});
  for (const bad of ['not json', '[]', 'null', '3', '{"extraExecMs":-1}', '{"extraExecMs":"20"}', '{"claimIdle":1}', '{"lie":true}'])
    assert.throws(
      () => parseAgentFaults(bad),
      (err: unknown) => err instanceof MeshError && err.code === 'MESH_CONFIG',
      bad,
    );
});

test('pool: a worker runs the built packages, whatever condition the agent itself was started with', () => {
  assert.deepEqual(workerExecArgv(['--conditions=@edge-mesh/source', '--import', 'tsx']), ['--import', 'tsx']);
  assert.deepEqual(workerExecArgv(['-C', '@edge-mesh/source', '--max-old-space-size=64']), ['--max-old-space-size=64']);
  // Nothing to drop: the worker inherits node's flags, process-wide ones included (which it would refuse if passed).
  assert.equal(workerExecArgv(['--conditions=other', '--max-semi-space-size=1']), undefined);
});

test('pool: closing while a worker runs a long job lets the run finish instead of aborting the process', async () => {
  const dir = await modelsDir();
  const det = (await readManifest(dir)).models.find((m) => m.name === 'ocr-det')!;
  const pool = new WorkerPool({
    size: 1,
    intraOpThreads: 1,
    warmupRuns: 1,
    pipelineDepth: 2,
    logger: quiet,
    models: [{ name: 'ocr-det', path: path.join(dir, det.file), providers: ['cpu'], warmup: det.warmup }],
  });
  await pool.start();
  // A 960 x 960 detection: about ten times the sample, far longer than the wait below.
  const big = () => ({ x: { dtype: 'float32' as const, shape: [1, 3, 960, 960], data: new Float32Array(3 * 960 * 960) } });
  const results: string[] = [];
  pool.run('ocr-det', big(), (err) => results.push(err ? err.code : 'ok'));
  pool.run('ocr-det', big(), (err) => results.push(err ? err.code : 'ok'));
  await new Promise((r) => setTimeout(r, 30));
  // Terminated from outside during the run, the worker would take this process down with SIGABRT.
  await pool.close();
  assert.equal(pool.size, 0);
  // The results of a closed pool are dropped, as the agent is going away.
  await new Promise((r) => setTimeout(r, 100));
  assert.deepEqual(results, []);
});

/**
 * The request path of one agent against a real worker pool holding the wake-word model: its replies are read as the
 * bytes it would publish, with the delay it asks for them (`afterMs`).
 */
async function kwsRequestPath(t: TestContext, faults = new Faults()) {
  const dir = await modelsDir();
  const kws = (await readManifest(dir)).models.find((m) => m.name === 'kws')!;
  const pool = new WorkerPool({
    size: 1,
    intraOpThreads: 1,
    warmupRuns: 1,
    pipelineDepth: 2,
    logger: quiet,
    models: [{ name: 'kws', path: path.join(dir, kws.file), providers: ['cpu'], warmup: kws.warmup }],
  });
  t.after(() => pool.close());
  const loaded = await pool.start();
  const agentId = generateIdentity('agent').id;
  const sender = generateIdentity('app').id;
  const counters = newAgentCounters();
  const replies: { senderId: string; reply: InferReply | ErrorReply; raw: Buffer; afterMs: number | undefined }[] = [];
  const waiters: (() => void)[] = [];
  const requests = new AgentRequests({
    agentId,
    maxMessageBytes: 1 << 20,
    maxElements: 1 << 20,
    models: new Map(loaded.map((m) => [m.name, m])),
    replays: new ReplayGuard(100),
    payments: undefined,
    counters,
    faults,
    logger: quiet,
    reply: (senderId, payload, afterMs) => {
      replies.push({ senderId, reply: decodeMessage(payload, ['res', 'err']), raw: Buffer.from(payload), afterMs });
      waiters.shift()?.();
    },
    closed: () => false,
  });
  const scheduler = new Scheduler(8, requests.finished);
  scheduler.addModel('kws', loaded[0]!.latencyMs, pool);
  requests.attach(scheduler);

  const send = async (message: Parameters<typeof encodeMessage>[0] | Buffer, from = sender) => {
    const replied = new Promise<void>((resolve) => waiters.push(resolve));
    requests.onRequest(from, Buffer.isBuffer(message) ? message : encodeMessage(message));
    await replied;
    return replies.at(-1)!;
  };
  /** Sends `n` requests at once and resolves with their replies, in the order they left. */
  const burst = async (n: number) => {
    const all = Array.from({ length: n }, () => new Promise<void>((resolve) => waiters.push(resolve)));
    for (let i = 0; i < n; i++) requests.onRequest(sender, encodeMessage(request(newRequestId())));
    await Promise.all(all);
    return replies.slice(-n);
  };
  const input = { 'onnx::Flatten_0': f32([1, 25, 96]) };
  const request = (id: Uint8Array, modelName = 'kws', inputs: Record<string, Tensor> = input) =>
    ({ v: 1, kind: 'req', id, deadline: Date.now() + 5_000, model: modelName, inputs: encodeTensorMap(inputs) }) as const;
  return { requests, replies, counters, sender, send, burst, request, scheduler, agentId };
}

test('requests: the request path against a real worker pool with the wake-word model', async (t) => {
  const { requests, replies, counters, sender, send, burst, request } = await kwsRequestPath(t);
  const id = newRequestId();
  const ok = await send(request(id));
  assert.equal(ok.senderId, sender);
  assert.equal(ok.reply.kind, 'res');
  if (ok.reply.kind === 'res') {
    assert.equal(ok.reply.model, 'kws');
    assert.equal(requestIdHex(ok.reply.id), requestIdHex(id));
    assert.ok(ok.reply.execMs > 0);
  }
  // Sent again by its sender (its connection dropped before the reply came back): the same reply again, not run again.
  const again = await send(request(id));
  assert.ok(again.raw.equals(ok.raw), 'the very reply it was sent');
  // The same id from someone else: refused as a replay, and it learns nothing of the first sender's outputs.
  const replay = await send(request(id), generateIdentity('app').id);
  assert.equal(replay.reply.kind === 'err' && replay.reply.code, 'MESH_BAD_REQUEST');
  const unknown = await send(request(newRequestId(), 'nope'));
  assert.equal(unknown.reply.kind === 'err' && unknown.reply.code, 'MESH_UNKNOWN_MODEL');
  const badShape = await send(request(newRequestId(), 'kws', { 'onnx::Flatten_0': f32([1, 24, 96]) }));
  assert.equal(badShape.reply.kind === 'err' && badShape.reply.code, 'MESH_BAD_INPUT');

  // Bytes that are no message at all have no id to answer: counted, and dropped.
  requests.onRequest(sender, Buffer.from('not cbor'));
  assert.equal(replies.length, 5);
  assert.deepEqual(counters.errors, { MESH_BAD_REQUEST: 2, MESH_UNKNOWN_MODEL: 1, MESH_BAD_INPUT: 1 });
  assert.deepEqual([counters.received, counters.served, counters.replays], [6, 1, 2]);

  // Every reply carries the agent's queue as it stands when the reply leaves: four at once on one
  // worker, so the replies count down what is still held, and give it as work too.
  const held = (await burst(4)).map((r) => (r.reply.kind === 'res' ? [r.reply.rif, r.reply.workMs] : undefined));
  assert.deepEqual(
    held.map((h) => h?.[0]),
    [3, 2, 1, 0],
  );
  for (const h of held) assert.ok(h![1]! >= 0 && (h![0] === 0) === (h![1] === 0), `workMs ${h![1]} for ${h![0]} held`);
  // Error replies carry it too.
  const refused = await send(request(newRequestId(), 'nope'));
  assert.equal(refused.reply.kind === 'err' && refused.reply.rif, 0);
});

test('faults: an agent claiming idle still answers late, but its replies say it held nothing and ran fast; a failing one fails at once', async (t) => {
  // 100 s of injected slowness: far more than a wake-word run takes anywhere, and never waited for here (the harness
  // reads each reply with the delay the agent asks for it).
  const faults = new Faults({ extraExecMs: 100_000 });
  const { send, burst, request, counters } = await kwsRequestPath(t, faults);

  // Honest slowness: four at once on one worker; the replies count down what is held and include the slowness.
  const honest = await burst(4);
  assert.deepEqual(
    honest.map((r) => r.reply.kind === 'res' && r.reply.rif),
    [3, 2, 1, 0],
  );
  for (const r of honest) {
    assert.equal(r.afterMs, 100_000);
    assert.ok(r.reply.kind === 'res' && r.reply.execMs >= 100_000 && r.reply.workMs! >= r.reply.rif! * 100_000);
  }

  // The lie: the same four, still held back by the slowness, each claiming an empty queue and a fast run.
  faults.set({ extraExecMs: 100_000, claimIdle: true });
  const lies = await burst(4);
  for (const r of lies) {
    assert.equal(r.afterMs, 100_000, 'the reply still waits out the slowness');
    assert.equal(r.reply.kind, 'res');
    if (r.reply.kind !== 'res') continue;
    assert.deepEqual([r.reply.rif, r.reply.workMs], [0, 0]);
    assert.ok(r.reply.execMs > 0 && r.reply.execMs < 100_000, `execMs ${r.reply.execMs}`);
  }
  const refused = await send(request(newRequestId(), 'nope'));
  assert.deepEqual(refused.reply.kind === 'err' && [refused.reply.code, refused.reply.rif, refused.reply.workMs], [
    'MESH_UNKNOWN_MODEL',
    0,
    0,
  ]);

  // And a claimed service time stands for every run's execution time.
  faults.set({ extraExecMs: 100_000, claimIdle: true, claimServiceMs: 0.01 });
  const claimed = await send(request(newRequestId()));
  assert.deepEqual(claimed.reply.kind === 'res' && [claimed.reply.execMs, claimed.afterMs], [0.01, 100_000]);

  // Failing: every well-formed request answered MESH_INFERENCE_FAILED at once, nothing run; bad input is still refused as such.
  faults.set({ failRequests: true });
  const served = counters.served;
  const failed = await send(request(newRequestId()));
  assert.equal(failed.reply.kind === 'err' && failed.reply.code, 'MESH_INFERENCE_FAILED');
  assert.equal(failed.afterMs, undefined, 'answered at once');
  const badShape = await send(request(newRequestId(), 'kws', { 'onnx::Flatten_0': f32([1, 24, 96]) }));
  assert.equal(badShape.reply.kind === 'err' && badShape.reply.code, 'MESH_BAD_INPUT');
  assert.equal(counters.served, served);
  assert.equal(counters.errors.MESH_INFERENCE_FAILED, 1);
  // And it serves again once the fault is lifted.
  faults.set({});
  const ok = await send(request(newRequestId()));
  assert.equal(ok.reply.kind, 'res');
  assert.equal(counters.served, served + 1);
});

test('pool: workers load and warm their models at a lower priority (nice + loadNice), the event loop keeps its own', async (t) => {
  const dir = await modelsDir();
  const models = (await readManifest(dir)).models.filter((m) => m.name === 'kws' || m.name === 'ocr-det');
  assert.equal(models.length, 2);
  const specs = models.map((m) => ({ name: m.name, path: path.join(dir, m.file), providers: ['cpu'], warmup: m.warmup }));
  const mainBefore = os.getPriority(0);
  const pool = new WorkerPool({ size: 2, intraOpThreads: 1, warmupRuns: 1, pipelineDepth: 1, loadNice: 7, logger: quiet, models: specs });
  t.after(() => pool.close());
  await pool.start();
  assert.equal(pool.loadPriorities.length, 2, 'each worker reports its priority');
  for (const p of pool.loadPriorities) {
    assert.equal(p.during, Math.min(19, p.before + 7), JSON.stringify(p));
    // Raising the priority again needs CAP_SYS_NICE: back where it was, or kept low where that is refused.
    assert.ok(p.after === p.before || p.after === p.during, JSON.stringify(p));
  }
  // setpriority(0) names the calling thread on Linux: the event loop's priority is untouched.
  assert.equal(os.getPriority(0), mainBefore);
  // Still serving after the load.
  const out = await new Promise<string>((resolve) => pool.run('kws', sampleInputs('kws', 1), (err) => resolve(err ? err.code : 'ok')));
  assert.equal(out, 'ok');

  // loadNice 0 leaves it alone; the agent's default is 10, and out-of-range values are a config error.
  const plain = new WorkerPool({
    size: 1,
    intraOpThreads: 1,
    warmupRuns: 1,
    pipelineDepth: 1,
    loadNice: 0,
    logger: quiet,
    models: [specs[0]!],
  });
  t.after(() => plain.close());
  await plain.start();
  assert.equal(plain.loadPriorities[0]!.during, plain.loadPriorities[0]!.before);
  assert.equal(resolveOptions({ brokerUrl: 'mqtt://x', modelsDir: dir }).loadNice, 10);
  assert.throws(() => resolveOptions({ brokerUrl: 'mqtt://x', modelsDir: dir, loadNice: 20 }), /loadNice/);
});

test('deploy: a version being retired when the agent closes stops waiting for its queue, and its executor is closed', async () => {
  // A run its executor dropped on closing never leaves the scheduler, so the slot never turns idle.
  let idle = false;
  let closedExecutors = 0;
  const hooks = {
    scheduler: { removeIdleModel: () => idle },
    models: new Map(),
    modelInfos: [],
    announce: () => {},
    logger: quiet,
  } as unknown as DeployHooks;
  const deployments = new AgentDeployments({ operators: new Map(), groups: ['edge-pis'], stateDir: os.tmpdir() }, hooks);
  const slot = { key: 'scale@3', version: '3', executors: { close: async () => void closedExecutors++ }, estimateBytes: 0 };
  const retired = (deployments as unknown as { retire(s: typeof slot): Promise<void> }).retire(slot).then(() => 'ended');
  await new Promise((r) => setTimeout(r, 50));
  await deployments.close();
  const outcome = await Promise.race([retired, new Promise((r) => setTimeout(r, 1_000, 'still waiting'))]);
  idle = true; // lets a loop that did not stop end, so that a failure here does not also hold the process up
  assert.equal(outcome, 'ended', 'the retirement stopped waiting once the agent closed');
  assert.equal(closedExecutors, 1, "close() closed the retiring slot's executor, once");
});
