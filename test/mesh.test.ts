/**
 * The mesh end to end: real broker on port 0, real ONNX sessions, agents in-process and as child processes. With
 * MESH_TEST_ENGINE=mosquitto|rabbitmq|nats the same tests run on that engine (test/engines.ts), with the mesh's ACLs
 * enforced there, checked by the eavesdropper and squatter test at the end.
 */
import assert from 'node:assert/strict';
import { copyFile, readFile, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { describe, type TestContext, test } from 'node:test';
import { type AgentOptions, startAgent } from '@edge-mesh/agent';
import { openMeshConnection } from '@edge-mesh/client';
import { SAMPLE_MODELS, sampleInputs } from '@edge-mesh/demo';
import {
  type AgentLoad,
  type AgentStatus,
  decodeMessage,
  encodeMessage,
  encodeTensorMap,
  generateIdentity,
  type Identity,
  type InferRequest,
  MeshError,
  makeConnectToken,
  newRequestId,
  PROTOCOL_VERSION,
  topics,
} from '@edge-mesh/protocol';
import mqtt from 'mqtt';
import * as ort from 'onnxruntime-node';
import { ENGINE, ENGINE_SKIP } from './engines.ts';
import {
  accessFor,
  agentFor,
  assertBusyBurst,
  meshBrokerFor as brokerFor,
  meshFor,
  modelsDir,
  namedClient,
  quiet,
  rawClient,
  spawnAgent,
  tempDir,
  waitFor,
} from './helpers.ts';
import { SPIN_WIDTH, writeSpinFolder } from './spin-model.ts';

const kws = () => sampleInputs('kws', 3);

function request(model: string, inputs: InferRequest['inputs'], deadlineInMs = 5_000): InferRequest {
  return { v: PROTOCOL_VERSION, kind: 'req', id: newRequestId(), deadline: Date.now() + deadlineInMs, model, inputs };
}

/**
 * The two tests that send a burst of detection requests (1.2 MB each) and need it to pile up in the agent's queue
 * cannot make one on NATS 2.9: its MQTT layer delivered such messages about 30 ms apart here (12 in 334 ms at QoS 0,
 * 465 ms at QoS 1, against 103 and 73 ms on mosquitto), about as fast as the agent runs them, so the queue held two
 * or fewer and the burst got 0 or 1 MESH_BUSY where the test needs 5 (docs/operations.md, "Running the end-to-end
 * suite on an engine").
 */
/**
 * A suite that hangs fails instead of holding CI for ever: the NATS run of this file once stalled for over 13 minutes
 * after its first test (cause not found; it passes in about 95 s with the payments file).
 */
const SUITE_TIMEOUT_MS = 600_000;

/**
 * The queue tests send a burst from one sender and need it to arrive faster than the agent serves it. They use `spin`
 * (test/spin-model.ts): 4 KB requests and a run of about 6 ms here, so the burst queues on every engine. (With 1.2 MB
 * detection requests it did not on NATS 2.9, whose MQTT layer delivered them about 30 ms apart, as fast as the agent
 * served them.)
 */
async function spinAgent(t: TestContext, brokerUrl: string, options: Partial<AgentOptions> = {}) {
  const dir = await tempDir(t, 'edge-mesh-spin-');
  await writeSpinFolder(dir);
  return agentFor(t, { brokerUrl, modelsDir: dir, ...options });
}

const spinRequest = (seed: number) =>
  request(
    'spin',
    {
      x: {
        dtype: 'float32',
        shape: [1, SPIN_WIDTH],
        data: new Uint8Array(Float32Array.from({ length: SPIN_WIDTH }, (_, i) => Math.sin(i + seed)).buffer),
      },
    },
    20_000,
  );

function wireF32(shape: number[], count = shape.reduce((a, b) => a * b, 1)) {
  return { dtype: 'float32', shape, data: new Uint8Array(count * 4) };
}

describe('inference through the mesh', { skip: ENGINE_SKIP, timeout: SUITE_TIMEOUT_MS }, () => {
  test('outputs equal a direct onnxruntime run, bit for bit, for every model', async (t) => {
    const broker = await brokerFor(t);
    const agent = await agentFor(t, { brokerUrl: broker.url });
    const mesh = await meshFor(t, { brokerUrl: broker.url });
    const dir = await modelsDir();
    const manifest = JSON.parse(await readFile(path.join(dir, 'manifest.json'), 'utf8')) as { models: { name: string; file: string }[] };
    for (const model of SAMPLE_MODELS) {
      const entry = manifest.models.find((m) => m.name === model)!;
      const session = await ort.InferenceSession.create(path.join(dir, entry.file), {
        intraOpNumThreads: 1,
        interOpNumThreads: 1,
        executionMode: 'sequential',
        graphOptimizationLevel: 'all',
      });
      const inputs = sampleInputs(model, 2);
      const feeds: Record<string, ort.Tensor> = {};
      for (const [name, x] of Object.entries(inputs)) feeds[name] = new ort.Tensor(x.dtype, x.data as never, x.shape);
      const direct = await session.run(feeds);
      const result = await mesh.infer(model, sampleInputs(model, 2), { deadlineMs: 10_000 });
      assert.equal(result.agentId, agent.id);
      assert.deepEqual(Object.keys(result.outputs).sort(), Object.keys(direct).sort(), `${model} output names`);
      for (const [name, expected] of Object.entries(direct)) {
        const got = result.outputs[name]!;
        assert.deepEqual(got.shape, [...expected.dims], `${model}.${name} shape`);
        assert.equal(got.dtype, expected.type);
        const a = Buffer.from(got.data.buffer, got.data.byteOffset, got.data.byteLength);
        const e = Buffer.from(
          (expected.data as Float32Array).buffer,
          (expected.data as Float32Array).byteOffset,
          (expected.data as Float32Array).byteLength,
        );
        assert.ok(a.equals(e), `${model}.${name} differs from the direct run`);
      }
      assert.ok(result.timings.execMs > 0 && result.timings.totalMs >= result.timings.execMs);
      await session.release();
    }
  });

  test('malformed tensors, wrong inputs and unknown models get coded errors while the agent keeps serving', async (t) => {
    const broker = await brokerFor(t);
    const agent = await agentFor(t, { brokerUrl: broker.url });
    const raw = await rawClient(t, broker.url, 'raw-sender');
    const mesh = await meshFor(t, { brokerUrl: broker.url });
    await mesh.waitForModel('kws');
    const input = agent.models.find((m) => m.name === 'kws')!.inputs[0]!.name;
    const cases: { what: string; message: InferRequest; code: string }[] = [
      {
        what: 'unsupported dtype',
        message: request('kws', { [input]: { dtype: 'complex64', shape: [1, 25, 96], data: new Uint8Array(2400 * 8) } }),
        code: 'MESH_BAD_TENSOR',
      },
      {
        what: 'wrong dtype for the model',
        message: request('kws', { [input]: { dtype: 'int32', shape: [1, 25, 96], data: new Uint8Array(2400 * 4) } }),
        code: 'MESH_BAD_INPUT',
      },
      { what: 'wrong shape', message: request('kws', { [input]: wireF32([1, 24, 96]) }), code: 'MESH_BAD_INPUT' },
      { what: 'wrong rank', message: request('kws', { [input]: wireF32([25, 96]) }), code: 'MESH_BAD_INPUT' },
      {
        what: 'byte length disagrees with shape',
        message: request('kws', { [input]: wireF32([1, 25, 96], 2399) }),
        code: 'MESH_BAD_TENSOR',
      },
      {
        what: 'odd byte length',
        message: request('kws', { [input]: { dtype: 'float32', shape: [1, 25, 96], data: new Uint8Array(9601) } }),
        code: 'MESH_BAD_TENSOR',
      },
      {
        what: 'huge declared shape',
        message: request('kws', { [input]: { dtype: 'float32', shape: [1 << 20, 1 << 20], data: new Uint8Array(4) } }),
        code: 'MESH_TOO_LARGE',
      },
      {
        what: 'negative dim',
        message: request('kws', { [input]: { dtype: 'float32', shape: [-1, 25, 96], data: new Uint8Array(4) } }),
        code: 'MESH_BAD_REQUEST',
      },
      { what: 'wrong input name', message: request('kws', { nope: wireF32([1, 25, 96]) }), code: 'MESH_BAD_INPUT' },
      { what: 'extra input', message: request('kws', { [input]: wireF32([1, 25, 96]), extra: wireF32([1]) }), code: 'MESH_BAD_INPUT' },
      { what: 'missing input', message: request('vad', { input: wireF32([1, 512]), state: wireF32([2, 1, 128]) }), code: 'MESH_BAD_INPUT' },
      { what: 'unknown model', message: request('no-such-model', { [input]: wireF32([1, 25, 96]) }), code: 'MESH_UNKNOWN_MODEL' },
    ];
    for (const c of cases) {
      const reply = await raw.request(agent.id, c.message.id, c.message);
      assert.equal(reply.kind, 'err', c.what);
      assert.equal(reply.kind === 'err' && reply.code, c.code, c.what);
      // The agent still serves a good request after each bad one.
      const ok = await mesh.infer('kws', kws());
      assert.equal(ok.agentId, agent.id);
    }
    // A schema violation with a readable id still gets an answer; garbage gets none but breaks nothing.
    const id = newRequestId();
    const bad = await raw.request(agent.id, id, encodeMessage({ ...request('kws', {}), id, deadline: 'soon' } as unknown as InferRequest));
    assert.equal(bad.kind === 'err' && bad.code, 'MESH_BAD_REQUEST');
    raw.client.publish(topics.agentRequest(agent.id, raw.clientId), Buffer.from([0xff, 0x00, 0x13, 0x37]), { qos: 1 });
    raw.client.publish(topics.agentRequest(agent.id, raw.clientId), Buffer.alloc(10_000, 0x81), { qos: 1 });
    assert.equal((await mesh.infer('kws', kws())).agentId, agent.id);
    // The garbage went on another connection than the SDK's request, so it may arrive after the answer (on NATS a QoS 1
    // PUBLISH is stored in JetStream first, while the SDK's request goes at QoS 0).
    await waitFor(() => (agent.counters.errors.MESH_BAD_REQUEST ?? 0) >= 3, 10_000, 'the garbage counted as bad requests');
  });

  test('a request whose deadline has passed is refused with MESH_DEADLINE_EXCEEDED', async (t) => {
    const broker = await brokerFor(t);
    // Every model on the worker pool, so the wake-word requests queue behind detection runs (inline, they
    // would not: test/inline.test.ts has the inline case).
    // Admission off, so a deadline the queue cannot meet is queued and expires there (with it on, such a
    // request is refused at once: test/overload.test.ts).
    const agent = await agentFor(t, { brokerUrl: broker.url, inlineMaxMs: 0, admission: false });
    const raw = await rawClient(t, broker.url, 'raw-deadline');
    const late = request('kws', { [agent.models[0]!.inputs[0]!.name]: wireF32([1, 25, 96]) }, -1);
    const reply = await raw.request(agent.id, late.id, late);
    assert.equal(reply.kind === 'err' && reply.code, 'MESH_DEADLINE_EXCEEDED');

    // Queued behind slow work, a short deadline expires in the queue and is dropped, not run.
    const det = (seed: number) => {
      const x = sampleInputs('ocr-det', seed).x!;
      return request('ocr-det', { x: { dtype: 'float32', shape: x.shape, data: new Uint8Array(x.data.buffer) } }, 10_000);
    };
    const slow = [det(1), det(2), det(3)];
    const pendingSlow = slow.map((m) => raw.request(agent.id, m.id, m));
    const short = request('kws', { [agent.models.find((m) => m.name === 'kws')!.inputs[0]!.name]: wireF32([1, 25, 96]) }, 5);
    const shortReply = await raw.request(agent.id, short.id, short);
    assert.equal(shortReply.kind === 'err' && shortReply.code, 'MESH_DEADLINE_EXCEEDED');
    for (const r of await Promise.all(pendingSlow)) assert.equal(r.kind, 'res');

    // Through the SDK the same shows as a typed error.
    const mesh = await meshFor(t, { brokerUrl: broker.url });
    await mesh.waitForModel('ocr-det');
    const hog = [1, 2, 3].map((s) => mesh.infer('ocr-det', sampleInputs('ocr-det', s), { deadlineMs: 10_000 }));
    await assert.rejects(
      mesh.infer('kws', kws(), { deadlineMs: 3 }),
      (err: unknown) => err instanceof MeshError && err.code === 'MESH_DEADLINE_EXCEEDED',
    );
    await Promise.all(hog);
  });

  test('a full queue answers MESH_BUSY at once while accepted work is served', async (t) => {
    const broker = await brokerFor(t);
    const agent = await spinAgent(t, broker.url, { queueLimit: 2, workers: 1 });
    const raw = await rawClient(t, broker.url, 'raw-busy');
    const messages = Array.from({ length: 12 }, (_, i) => spinRequest(i));
    const { busy } = await assertBusyBurst(raw, agent.id, messages);
    assert.equal(agent.counters.errors.MESH_BUSY, busy.length);
  });

  test('a queued request can be cancelled by its id', async (t) => {
    const broker = await brokerFor(t);
    const agent = await spinAgent(t, broker.url, { workers: 1 });
    const raw = await rawClient(t, broker.url, 'raw-cancel');
    const messages = Array.from({ length: 6 }, (_, i) => spinRequest(i));
    const replies = messages.map((m) => raw.request(agent.id, m.id, m, 20_000));
    // The last request waits behind five spin runs (about 100 ms); the cancel arrives long before its turn.
    raw.client.publish(
      topics.agentCancel(agent.id, raw.clientId),
      encodeMessage({ v: PROTOCOL_VERSION, kind: 'cancel', id: messages[5]!.id }),
      { qos: 1 },
    );
    // A cancel naming someone else's request changes nothing.
    raw.client.publish(
      topics.agentCancel(agent.id, raw.clientId),
      encodeMessage({ v: PROTOCOL_VERSION, kind: 'cancel', id: newRequestId() }),
      { qos: 1 },
    );
    const codes = (await Promise.all(replies)).map((r) => (r.kind === 'err' ? r.code : 'ok'));
    assert.deepEqual(codes, ['ok', 'ok', 'ok', 'ok', 'ok', 'MESH_CANCELLED']);
    assert.equal(agent.loadReport().models.spin!.served, 5);
  });

  test('a model whose file does not match its sha256 is refused', async (t) => {
    const broker = await brokerFor(t);
    const src = await modelsDir();
    const dir = await tempDir(t);
    const manifest = JSON.parse(await readFile(path.join(src, 'manifest.json'), 'utf8')) as { models: { name: string; file: string }[] };
    const keep = manifest.models.filter((m) => m.name === 'kws' || m.name === 'vad');
    for (const m of keep) await copyFile(path.join(src, m.file), path.join(dir, m.file));
    const vadFile = path.join(dir, keep.find((m) => m.name === 'vad')!.file);
    const bytes = await readFile(vadFile);
    bytes[bytes.length - 1] = bytes[bytes.length - 1]! ^ 0xff;
    await writeFile(vadFile, bytes);
    await writeFile(path.join(dir, 'manifest.json'), JSON.stringify({ models: keep }));
    const agent = await agentFor(t, { brokerUrl: broker.url, modelsDir: dir });
    assert.deepEqual(
      agent.models.map((m) => m.name),
      ['kws'],
    );
    assert.deepEqual(
      agent.status().models!.map((m) => m.name),
      ['kws'],
    );

    await writeFile(path.join(dir, 'manifest.json'), JSON.stringify({ models: keep.filter((m) => m.name === 'vad') }));
    await assert.rejects(
      startAgent({ brokerUrl: broker.url, modelsDir: dir, logger: quiet }),
      (err: unknown) => err instanceof MeshError && err.code === 'MESH_MODEL_INTEGRITY',
    );
  });

  test('status is retained with capabilities, heartbeats keep their period while detection runs continuously', async (t) => {
    const broker = await brokerFor(t);
    const agent = await agentFor(t, { brokerUrl: broker.url, heartbeatMs: 200 });
    const loads: { at: number; load: AgentLoad }[] = [];
    let status: AgentStatus | undefined;
    const watcher = openMeshConnection(broker.url, {
      ...(await namedClient(broker.url, 'watcher')),
      onConnect: (c) => c.subscribe([topics.agentStatus(agent.id), topics.agentLoad(agent.id)], { qos: 1 }),
    });
    t.after(() => watcher.close());
    watcher.client.on('message', (topic, payload) => {
      if (topic.endsWith('/status')) status = decodeMessage(payload, ['status']);
      else loads.push({ at: performance.now(), load: decodeMessage(payload, ['load']) });
    });
    await waitFor(() => status !== undefined, 5_000, 'retained status');
    assert.equal(status!.state, 'online');
    assert.deepEqual(status!.models!.map((m) => m.name).sort(), [...SAMPLE_MODELS].sort());
    const det = status!.models!.find((m) => m.name === 'ocr-det')!;
    assert.ok(det.latencyMs > 0 && det.priceMicros > 0 && /^[0-9a-f]{64}$/.test(det.sha256));
    assert.deepEqual(det.inputs[0]!.shape.length, 4);
    assert.ok(status!.providers!.includes('cpu') && status!.hardware!.cpus > 0);

    const mesh = await meshFor(t, { brokerUrl: broker.url });
    await mesh.waitForModel('ocr-det');
    const until = performance.now() + 3_000;
    let served = 0;
    const loop = async () => {
      while (performance.now() < until) {
        await mesh.infer('ocr-det', sampleInputs('ocr-det', 1 + (served % 4)), { deadlineMs: 10_000 });
        served++;
      }
    };
    loads.length = 0;
    await Promise.all([loop(), loop()]);
    const gaps = loads.slice(1).map((l, i) => l.at - loads[i]!.at);
    assert.ok(served > 10, `served ${served}`);
    assert.ok(loads.length >= 12, `only ${loads.length} heartbeats in 3 s at a 200 ms period`);
    assert.ok(Math.max(...gaps) < 600, `heartbeat gaps ${gaps.map((g) => g.toFixed(0)).join(',')}`);
    assert.ok(
      loads.some((l) => l.load.inFlight > 0 && l.load.models['ocr-det']!.inFlight > 0),
      'heartbeats saw the work in flight',
    );
    assert.ok(loads.every((l, i) => i === 0 || l.load.seq > loads[i - 1]!.load.seq));
  });
});

describe('failures', { skip: ENGINE_SKIP, timeout: SUITE_TIMEOUT_MS }, () => {
  test('an agent killed mid-request: the SDK retries on another agent within the deadline', async (t) => {
    const broker = await brokerFor(t);
    const victimKey = generateIdentity('agent');
    const victim = await spawnAgent(t, broker.url, victimKey);
    const survivor = await agentFor(t, { brokerUrl: broker.url });
    const mesh = await meshFor(t, { brokerUrl: broker.url });
    await mesh.waitForModel('ocr-det', 10_000, 2);
    // Enough concurrent slow requests that the victim holds some when it dies.
    const calls = Array.from({ length: 8 }, (_, i) => mesh.infer('ocr-det', sampleInputs('ocr-det', 1 + (i % 4)), { deadlineMs: 15_000 }));
    await waitFor(() => mesh.agents().some((a) => a.id === victimKey.id && a.outstanding > 0), 5_000, 'work on the victim');
    victim.kill('SIGKILL');
    const results = await Promise.all(calls);
    assert.ok(results.every((r) => Object.keys(r.outputs).length > 0));
    const retried = results.filter((r) => r.attempts > 1);
    assert.ok(retried.length > 0, 'some request was retried');
    for (const r of retried) assert.equal(r.agentId, survivor.id);
    await waitFor(() => !mesh.agents().some((a) => a.id === victimKey.id), 5_000, 'the victim to be seen offline');
  });

  test('after a broker restart, agents reconnect and re-announce, and serving resumes', async (t) => {
    // On a cluster the restarted broker is the node every client tries first (test/engines.ts, restartFirstNode).
    const broker = await brokerFor(t);
    const agent = await agentFor(t, { brokerUrl: broker.url, backoff: { baseMs: 50, maxMs: 1_000 } });
    const announcements = agent.counters.announcements;
    const restart = await broker.restart();
    const restartedAt = restart.at;
    await waitFor(() => agent.counters.announcements > announcements, 5_000, 're-announcement');
    assert.ok(performance.now() - restartedAt < 5_000);
    assert.equal(agent.counters.reconnects, 1);
    await restart.done;
    const mesh = await meshFor(t, { brokerUrl: broker.url });
    await mesh.waitForModel('kws', 5_000);
    assert.equal((await mesh.infer('kws', kws())).agentId, agent.id);
  });

  test('SIGTERM drains queued work, then the agent goes offline and exits 0', async (t) => {
    const broker = await brokerFor(t);
    const drainKey = generateIdentity('agent');
    const child = await spawnAgent(t, broker.url, drainKey, ['--heartbeat-ms', '50']);
    const mesh = await meshFor(t, { brokerUrl: broker.url });
    await mesh.waitForModel('ocr-det');
    const calls = Array.from({ length: 4 }, (_, i) =>
      mesh.infer('ocr-det', sampleInputs('ocr-det', 1 + i), { deadlineMs: 15_000, agentId: drainKey.id }),
    );
    // SIGTERM only once the agent holds all four (its heartbeat says so): requests still in transit
    // when it closes are lost to it, and the SDK would retry them elsewhere (here: nowhere, pinned).
    await waitFor(
      () => {
        const load = mesh.agents().find((a) => a.id === drainKey.id)?.load;
        return load !== undefined && load.queued + load.inFlight + (load.models['ocr-det']?.served ?? 0) >= 4;
      },
      10_000,
      'the agent to hold all four requests',
    );
    const exited = new Promise<number | null>((resolve) => child.on('exit', (code) => resolve(code)));
    child.kill('SIGTERM');
    const results = await Promise.all(calls);
    assert.equal(results.length, 4);
    assert.ok(results.every((r) => r.agentId === drainKey.id));
    assert.equal(await exited, 0);
    await waitFor(() => !mesh.agents().some((a) => a.id === drainKey.id), 5_000, 'offline status');
  });
});

/** A bare mqtt.js client of `identity` on the engine's first node, recording what it receives and whether it closed. */
async function engineClient(t: TestContext, brokerUrl: string, identity: Identity) {
  const access = await accessFor(brokerUrl, identity);
  const client = mqtt.connect(brokerUrl.split(',')[0]!, {
    clientId: identity.id,
    username: access.username ?? identity.id,
    password: access.password ?? makeConnectToken(identity),
    reconnectPeriod: 0,
    protocolVersion: 4,
    connectTimeout: 5_000,
  });
  t.after(() => client.end(true));
  const state = { received: [] as { topic: string; payload: Buffer }[], closed: false };
  client.on('message', (topic, payload) => state.received.push({ topic, payload }));
  client.on('close', () => (state.closed = true));
  client.on('error', () => {});
  await new Promise<void>((resolve, reject) => {
    client.once('connect', () => resolve());
    client.once('close', () => reject(new MeshError('MESH_NOT_CONNECTED', `${identity.id} closed before CONNACK`)));
  });
  return { client, state };
}

/** SUBSCRIBE one filter: the granted QoS, 'refused' (SUBACK 128), or 'closed' when the engine hung up. */
function subscribeOutcome(client: mqtt.MqttClient, filter: string): Promise<number | 'refused' | 'closed'> {
  return new Promise((resolve) => {
    client.once('close', () => resolve('closed'));
    client.subscribe(filter, { qos: 1 }, (err, granted) =>
      resolve(client.connected ? (err || granted?.[0]?.qos === 128 ? 'refused' : (granted?.[0]?.qos ?? 'refused')) : 'closed'),
    );
  });
}

describe('the mesh ACLs on the engine', {
  timeout: SUITE_TIMEOUT_MS,
  skip:
    ENGINE === 'aedes'
      ? 'runs on an external engine (MESH_TEST_ENGINE); the embedded broker: test/auth-mesh.test.ts, test/hostile.test.ts'
      : ENGINE_SKIP,
}, () => {
  test('while the mesh serves on the engine, an eavesdropper and a squatter get nothing', async (t) => {
    const broker = await brokerFor(t);
    const agent = await agentFor(t, { brokerUrl: broker.url });
    const appKey = generateIdentity('app');
    const mesh = await meshFor(t, { brokerUrl: broker.url, identity: appKey });
    await mesh.waitForModel('kws');

    // Eavesdroppers, admitted apps, one per filter (every engine keeps one connection per id): everything, the mesh's
    // tree, the app's replies, the agent's requests. Each engine refuses its own way (mosquitto grants and delivers
    // nothing, NATS answers 128, RabbitMQ closes the connection); none may receive a message.
    const wanted = ['#', 'mesh/#', topics.clientRepliesFor(appKey.id), topics.agentRequestsFor(agent.id)];
    const spies = [];
    for (const filter of wanted) {
      const spy = await engineClient(t, broker.url, generateIdentity('app'));
      t.diagnostic(`${ENGINE}: SUBSCRIBE ${filter} by an eavesdropper: ${await subscribeOutcome(spy.client, filter)}`);
      spies.push(spy);
    }
    // What an app may read it gets: the eavesdropping is live, not a dead connection.
    const watch = await engineClient(t, broker.url, generateIdentity('app'));
    const watching = await subscribeOutcome(watch.client, topics.allAgentStatus());
    assert.ok(watching === 0 || watching === 1, `the watcher's subscription is granted: ${watching}`);
    watch.client.publish(topics.discover(watch.client.options.clientId!), Buffer.alloc(0), { qos: 0 });
    await waitFor(() => watch.state.received.some((m) => m.topic === topics.agentStatus(agent.id)), 5_000, "the agent's status");

    for (let i = 0; i < 3; i++) assert.equal((await mesh.infer('kws', sampleInputs('kws', i))).agentId, agent.id);
    await new Promise((r) => setTimeout(r, 300));
    for (const [i, spy] of spies.entries())
      assert.deepEqual(
        spy.state.received.map((m) => m.topic).filter((topic) => !/^mesh\/v1\/agent\/[a-z0-9-]+\/(status|load)$/.test(topic)),
        [],
        `the eavesdropper on ${wanted[i]} got nothing but statuses and loads`,
      );

    // A squatter, an admitted agent, publishes a status under the real agent's topic (retained) and a request in the
    // app's name, each on a fresh connection (RabbitMQ closes one that publishes where it may not).
    const squatKey = generateIdentity('agent');
    const fake = Buffer.from('forged status');
    const receivedBefore = agent.counters.received;
    const forgedRequest = request('kws', encodeTensorMap(kws()));
    for (const [topic, payload, retain] of [
      [topics.agentStatus(agent.id), fake, true],
      [topics.agentRequest(agent.id, appKey.id), Buffer.from(encodeMessage(forgedRequest)), false],
    ] as const) {
      const squat = await engineClient(t, broker.url, squatKey);
      await new Promise<void>((resolve) => {
        const timer = setTimeout(resolve, 3_000);
        squat.client.once('close', () => resolve());
        squat.client.publish(topic, payload, { qos: 1, retain }, () => {
          clearTimeout(timer);
          resolve();
        });
      });
      if (!squat.state.closed) await squat.client.endAsync();
    }
    // Its own status it may publish, and the watcher gets it: the refusal is per id, not a blanket one.
    const own = await engineClient(t, broker.url, squatKey);
    own.client.publish(topics.agentStatus(squatKey.id), Buffer.from('own status'), { qos: 1 });
    await waitFor(() => watch.state.received.some((m) => m.topic === topics.agentStatus(squatKey.id)), 5_000, "the squatter's own status");
    assert.ok(!watch.state.received.some((m) => m.payload.equals(fake)), 'no forged status reached the watcher');
    assert.equal(agent.counters.received, receivedBefore, 'the forged request never reached the agent');
    // The mesh still serves, and the app still picks the genuine agent.
    assert.equal((await mesh.infer('kws', sampleInputs('kws', 5))).agentId, agent.id);
  });
});
