/**
 * Models that run inline, on the agent's main thread (docs/agent.md, "Inline models"): real models,
 * real onnxruntime sessions, a real broker on port 0, agents in-process and as child processes.
 *
 * Besides the demo models, one ONNX model written here: `spin`, 128 MatMuls in a chain with one
 * 1024 × 1024 weight (the identity), input and output [1, 1024] float32. Its inputs are fixed and small
 * (4 KB a request) and a run takes about 6 ms here: far over the default bound, and, allowed inline
 * by a large one, slow enough to queue behind. The tests whose point is a run longer than some other
 * time (a heartbeat period, a deadline) write it deeper, so that a faster machine keeps the margin.
 */
import assert from 'node:assert/strict';
import type { ChildProcess } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { copyFile, readFile, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { describe, test } from 'node:test';
import type { AgentHandle, AgentOptions, ManifestEntry } from '@edge-mesh/agent';
import { openMeshConnection } from '@edge-mesh/client';
import { deployMesh, startLocalChain } from '@edge-mesh/contracts/dev';
import { sampleInputs } from '@edge-mesh/demo';
import {
  type AgentLoad,
  decodeMessage,
  encodeMessage,
  generateIdentity,
  type InferRequest,
  newRequestId,
  PROTOCOL_VERSION,
  type Tensor,
  topics,
} from '@edge-mesh/protocol';
import type { Mesh } from '@edge-mesh/sdk';
import * as ort from 'onnxruntime-node';
import pino from 'pino';
import { declaredInputs, declaresFixedShapes } from '../edge-agent/src/onnx-inputs.ts';
import { describe as describeMeta, fixedShapes } from '../edge-agent/src/ort-session.mjs';
import { agentFor, assertBusyBurst, brokerFor, meshFor, modelsDir, rawClient, spawnAgent, tcpRelay, tempDir, waitFor } from './helpers.ts';
import { fundOwnLane, registeredAgent } from './payer.ts';
import { SPIN_DEPTH, spinInputs, writeSpinModel } from './spin-model.ts';

const spin = (seed = 1): Record<string, Tensor> => spinInputs(seed);

interface Fixture {
  dir: string;
  entries: Record<string, ManifestEntry>;
}

/** A models folder with `names` from the demo folder, and `spin` (of `spinDepth` MatMuls) when asked. */
async function modelsFolder(t: Parameters<typeof tempDir>[0], names: string[], spinDepth = SPIN_DEPTH): Promise<Fixture> {
  const src = await modelsDir();
  const manifest = JSON.parse(await readFile(path.join(src, 'manifest.json'), 'utf8')) as { models: ManifestEntry[] };
  const dir = await tempDir(t, 'edge-mesh-inline-');
  const entries: Record<string, ManifestEntry> = {};
  for (const name of names) {
    if (name === 'spin') {
      entries[name] = await writeSpinModel(dir, {}, spinDepth);
      continue;
    }
    const entry = manifest.models.find((m) => m.name === name)!;
    await copyFile(path.join(src, entry.file), path.join(dir, entry.file));
    entries[name] = entry;
  }
  await writeFile(path.join(dir, 'manifest.json'), JSON.stringify({ models: Object.values(entries) }));
  return { dir, entries };
}

// ---- What the agent says and does ----

/** Worker threads of this process, as node's diagnostic report lists them. */
const workerThreads = () => (process.report.getReport() as { workers: unknown[] }).workers.length;

/** An in-process agent whose log lines are kept (the real pino logger, writing to an array). */
async function loggedAgent(
  t: Parameters<typeof tempDir>[0],
  options: Partial<AgentOptions> & { brokerUrl: string; modelsDir: string },
): Promise<{ agent: AgentHandle; logs: Record<string, unknown>[]; addedWorkers: number }> {
  const logs: Record<string, unknown>[] = [];
  const logger = pino({ level: 'info' }, { write: (line: string) => void logs.push(JSON.parse(line)) });
  const before = workerThreads();
  const agent = await agentFor(t, { logger, ...options });
  return { agent, logs, addedWorkers: workerThreads() - before };
}

const readyLog = (logs: Record<string, unknown>[]) => logs.find((l) => l.msg === 'agent ready')!;
const poolReason = (logs: Record<string, unknown>[], model: string) =>
  logs.find((l) => l.msg === 'model runs on the worker pool' && l.model === model)?.reason as string | undefined;

/** Direct onnxruntime outputs of `file` for `inputs`, with the agent's session options. */
async function directRun(file: string, inputs: Record<string, Tensor>): Promise<ort.InferenceSession.ReturnType> {
  const session = await ort.InferenceSession.create(file, {
    intraOpNumThreads: 1,
    interOpNumThreads: 1,
    executionMode: 'sequential',
    graphOptimizationLevel: 'all',
  });
  const feeds: Record<string, ort.Tensor> = {};
  for (const [name, x] of Object.entries(inputs)) feeds[name] = new ort.Tensor(x.dtype, x.data as never, x.shape);
  const out = await session.run(feeds);
  await session.release();
  return out;
}

async function assertBitEqual(mesh: Mesh, model: string, file: string, inputs: () => Record<string, Tensor>): Promise<string> {
  const direct = await directRun(file, inputs());
  const result = await mesh.infer(model, inputs(), { deadlineMs: 10_000 });
  assert.deepEqual(Object.keys(result.outputs).sort(), Object.keys(direct).sort());
  for (const [name, expected] of Object.entries(direct)) {
    const got = result.outputs[name]!;
    assert.deepEqual(got.shape, [...expected.dims], `${model}.${name} shape`);
    assert.equal(got.dtype, expected.type);
    const e = expected.data as Float32Array;
    const a = Buffer.from(got.data.buffer, got.data.byteOffset, got.data.byteLength);
    assert.ok(a.equals(Buffer.from(e.buffer, e.byteOffset, e.byteLength)), `${model}.${name} differs from the direct run`);
  }
  return result.agentId;
}

function request(model: string, inputs: Record<string, Tensor>, deadlineInMs: number): InferRequest {
  const wire: InferRequest['inputs'] = {};
  for (const [name, x] of Object.entries(inputs))
    wire[name] = { dtype: x.dtype, shape: x.shape, data: new Uint8Array(x.data.buffer, x.data.byteOffset, x.data.byteLength) };
  return { v: PROTOCOL_VERSION, kind: 'req', id: newRequestId(), deadline: Date.now() + deadlineInMs, model, inputs: wire };
}

const kws = (seed = 1) => sampleInputs('kws', seed);

/** A load-report watcher on `brokerUrl`: the latest report of each agent, and every report with its arrival time. */
async function loadWatcher(t: Parameters<typeof tempDir>[0], brokerUrl: string) {
  const latest = new Map<string, AgentLoad>();
  const all: { at: number; load: AgentLoad }[] = [];
  const watcher = openMeshConnection(brokerUrl, {
    clientId: `watcher-${newRequestId()[0]}`,
    onConnect: (c) => c.subscribe(topics.agentLoad('+'), { qos: 1 }),
  });
  t.after(() => watcher.close());
  watcher.client.on('message', (_topic, payload) => {
    const load = decodeMessage(payload, ['load']);
    latest.set(load.agent, load);
    all.push({ at: performance.now(), load });
  });
  await watcher.firstConnect;
  return { latest, all };
}

describe('which models run inline', () => {
  test('the input shapes read from each file agree with onnxruntime', async (t) => {
    const { dir, entries } = await modelsFolder(t, ['kws', 'vad', 'ocr-cls', 'ocr-det', 'spin']);
    const fixed: Record<string, boolean> = {};
    for (const [name, entry] of Object.entries(entries)) {
      const file = path.join(dir, entry.file);
      const declared = await declaredInputs(file);
      const session = await ort.InferenceSession.create(file);
      const meta = describeMeta(session.inputMetadata);
      await session.release();
      assert.deepEqual(
        declared.map((d) => d.name),
        meta.map((m) => m.name),
        `${name} input names`,
      );
      // onnxruntime reports a dim with neither size nor name as ''.
      assert.deepEqual(
        declared.map((d) => d.dims!.map((x) => x ?? '')),
        meta.map((m) => m.shape),
        `${name} dims`,
      );
      assert.equal(declaresFixedShapes(declared), fixedShapes(meta), name);
      fixed[name] = declaresFixedShapes(declared);
    }
    assert.deepEqual(fixed, { kws: true, vad: false, 'ocr-cls': false, 'ocr-det': false, spin: true });
    // Not an ONNX model: refused with a coded error, never guessed.
    const junk = path.join(dir, 'junk.onnx');
    await writeFile(junk, Buffer.from([0x3a, 0xff, 0xff, 0xff, 0x0f, 0x01]));
    await assert.rejects(declaredInputs(junk), (err: unknown) => (err as { code?: string }).code === 'MESH_MODEL_INTEGRITY');
  });

  test('an agent serving only the wake-word model runs it inline: no worker thread, outputs bit-equal to a direct run', async (t) => {
    const broker = await brokerFor(t);
    const { dir, entries } = await modelsFolder(t, ['kws']);
    const { agent, logs, addedWorkers } = await loggedAgent(t, { brokerUrl: broker.url, modelsDir: dir });
    assert.equal(addedWorkers, 0, 'no worker thread started');
    assert.deepEqual(readyLog(logs).inline, ['kws']);
    assert.equal(readyLog(logs).workerThreads, 0);
    // One job at a time on the main thread: one lane, in the status and in the load report.
    assert.equal(agent.status().workers, 1);
    assert.equal(agent.loadReport().workers, 1);
    const mesh = await meshFor(t, { brokerUrl: broker.url });
    await mesh.waitForModel('kws');
    for (const seed of [1, 2, 3])
      assert.equal(await assertBitEqual(mesh, 'kws', path.join(dir, entries.kws!.file), () => kws(seed)), agent.id);
    assert.equal(agent.loadReport().models.kws!.served, 3);
  });

  test('a model with free dims, or with fixed dims over the bound, runs on the worker pool; inlineMaxMs 0 turns inline off', async (t) => {
    const broker = await brokerFor(t);
    const { dir, entries } = await modelsFolder(t, ['kws', 'vad', 'spin']);
    const mixed = await loggedAgent(t, { brokerUrl: broker.url, modelsDir: dir });
    assert.equal(mixed.addedWorkers, 1, 'one worker for the models that do not run inline');
    assert.deepEqual(readyLog(mixed.logs).inline, ['kws']);
    assert.equal(readyLog(mixed.logs).workerThreads, 1);
    assert.match(poolReason(mixed.logs, 'vad')!, /without a fixed shape/);
    assert.match(poolReason(mixed.logs, 'spin')!, /p99 above inlineMaxMs/);
    // Two lanes: the worker, and the main thread.
    assert.equal(mixed.agent.status().workers, 2);
    const mesh = await meshFor(t, { brokerUrl: broker.url });
    await mesh.waitForModel('spin');
    await assertBitEqual(mesh, 'spin', path.join(dir, entries.spin!.file), () => spin(2));
    await assertBitEqual(mesh, 'kws', path.join(dir, entries.kws!.file), () => kws(4));
    // While the worker runs spin, the wake-word model does not wait behind it.
    const slow = [1, 2, 3, 4].map((s) => mesh.infer('spin', spin(s), { deadlineMs: 10_000 }));
    const fast = await mesh.infer('kws', kws(5), { deadlineMs: 10_000 });
    assert.ok(fast.timings.queueMs < 10, `kws waited ${fast.timings.queueMs} ms`);
    await Promise.all(slow);
    await mixed.agent.close();

    const { dir: kwsDir } = await modelsFolder(t, ['kws']);
    const off = await loggedAgent(t, { brokerUrl: broker.url, modelsDir: kwsDir, inlineMaxMs: 0 });
    assert.equal(off.addedWorkers, 1);
    assert.deepEqual(readyLog(off.logs).inline, []);
    await off.agent.close();
    // A bound no run can meet: measured, and refused.
    const tight = await loggedAgent(t, { brokerUrl: broker.url, modelsDir: kwsDir, inlineMaxMs: 0.0001 });
    assert.equal(tight.addedWorkers, 1);
    assert.match(poolReason(tight.logs, 'kws')!, /p99 above inlineMaxMs/);
  });
});

// The agents below run as processes of their own (the CLI): in this process, the broker and the load
// would wait for each inline run too, and the heartbeats measured would be this process's.
describe('serving inline', () => {
  test('heartbeats keep their period while wake-word requests flow inline, and while long inline runs queue up', async (t) => {
    const broker = await brokerFor(t);
    // spin four times as deep (about 25 ms a run here): 24 of them back to back hold the loop longer than two periods.
    const { dir } = await modelsFolder(t, ['kws', 'spin'], 4 * SPIN_DEPTH);
    const loads = await loadWatcher(t, broker.url);
    const key = generateIdentity('agent');
    // spin inline too, allowed by a large bound.
    const agent = await spawnAgent(t, broker.url, key, ['--models', dir, '--inline-max-ms', '1000', '--heartbeat-ms', '200']);
    assert.match(agent.stderrText(), /"inline":\["kws","spin"\],"workerThreads":0/);
    const mesh = await meshFor(t, { brokerUrl: broker.url });
    await mesh.waitForModel('spin');

    const burst = async (model: 'kws' | 'spin', loops: number, ms: number) => {
      const until = performance.now() + ms;
      let served = 0;
      const loop = async (i: number) => {
        while (performance.now() < until) {
          const inputs = model === 'kws' ? kws(1 + ((served + i) % 4)) : spin(i);
          await mesh.infer(model, inputs, { deadlineMs: 20_000, agentId: key.id });
          served++;
        }
      };
      const from = loads.all.length;
      await Promise.all(Array.from({ length: loops }, (_, i) => loop(i)));
      const seen = loads.all.slice(from).filter((l) => l.load.agent === key.id);
      const gaps = seen.slice(1).map((l, i) => l.at - seen[i]!.at);
      return { served, gaps, loads: seen.map((l) => l.load) };
    };

    const wake = await burst('kws', 16, 3_000);
    assert.ok(wake.served > 300, `served ${wake.served}`);
    assert.ok(wake.loads.length >= 12, `only ${wake.loads.length} heartbeats in 3 s at a 200 ms period`);
    assert.ok(Math.max(...wake.gaps) < 400, `heartbeat gaps ${wake.gaps.map((g) => g.toFixed(0)).join(',')}`);
    // Heartbeats went out while the work ran, not only before and after it.
    const servedSeen = wake.loads.map((l) => l.models.kws!.served);
    assert.ok(
      servedSeen.filter((n, i) => i > 0 && n > servedSeen[i - 1]!).length >= 10,
      `kws served per heartbeat: ${servedSeen.join(',')}`,
    );

    // 24 spin runs outstanding, about 0.6 s of work: run back to back they would hold the loop
    // that long; one per turn, a heartbeat waits for one run at most.
    const long = await burst('spin', 24, 3_000);
    assert.ok(long.served > 24, `served ${long.served}`);
    assert.ok(long.loads.length >= 12, `only ${long.loads.length} heartbeats in 3 s at a 200 ms period`);
    assert.ok(Math.max(...long.gaps) < 400, `heartbeat gaps ${long.gaps.map((g) => g.toFixed(0)).join(',')}`);
    assert.ok(long.loads.every((l, i) => i === 0 || l.seq > long.loads[i - 1]!.seq));
    assert.ok(
      long.loads.some((l) => l.models.spin!.queued + l.models.spin!.inFlight > 5),
      'spin work piled up at the agent',
    );
  });

  test('a full queue answers MESH_BUSY, a queued request can be cancelled, an expired one is dropped unrun, for inline models', async (t) => {
    const broker = await brokerFor(t);
    // spin four times as deep (about 25 ms a run here), so that one run outlasts the 10 ms deadline below with room to
    // spare on a faster machine: at 6 ms a run, the wake-word request read after the first run could still make it.
    const { dir } = await modelsFolder(t, ['kws', 'spin'], 4 * SPIN_DEPTH);
    const loads = await loadWatcher(t, broker.url);
    const raw = await rawClient(t, broker.url, 'raw-inline');
    const inlineArgs = ['--models', dir, '--inline-max-ms', '1000', '--heartbeat-ms', '50'];

    const busyKey = generateIdentity('agent');
    const busyAgent = await spawnAgent(t, broker.url, busyKey, [...inlineArgs, '--queue-limit', '2']);
    assert.match(busyAgent.stderrText(), /"inline":\["kws","spin"\],"workerThreads":0/);
    const twelve = Array.from({ length: 12 }, (_, i) => request('spin', spin(i), 20_000));
    const { ok } = await assertBusyBurst(raw, busyKey.id, twelve);
    await waitFor(() => loads.latest.get(busyKey.id)?.models.spin?.served === ok.length, 5_000, 'the served count');

    const key = generateIdentity('agent');
    // Admission off: the short deadline below is queued and expires there, instead of being refused at once.
    await spawnAgent(t, broker.url, key, [...inlineArgs, '--no-admission']);
    const servedIs = async (model: string, n: number) => {
      await waitFor(() => loads.latest.get(key.id)?.models[model]?.served === n, 5_000, `${model} served ${n}`);
      // A few heartbeats more: no late run changes the count.
      await new Promise((r) => setTimeout(r, 200));
      assert.equal(loads.latest.get(key.id)!.models[model]!.served, n);
    };
    const four = Array.from({ length: 4 }, (_, i) => request('spin', spin(i), 20_000));
    const replies = four.map((m) => raw.request(key.id, m.id, m, 20_000));
    // The last request waits behind three spin runs; the cancel arrives long before its turn.
    raw.client.publish(topics.agentCancel(key.id, 'raw-inline'), encodeMessage({ v: PROTOCOL_VERSION, kind: 'cancel', id: four[3]!.id }), {
      qos: 1,
    });
    const cancelCodes = (await Promise.all(replies)).map((r) => (r.kind === 'err' ? r.code : 'ok'));
    assert.deepEqual(cancelCodes, ['ok', 'ok', 'ok', 'MESH_CANCELLED']);
    await servedIs('spin', 3);

    // Behind spin runs on the same main thread, a wake-word request with a short deadline expires before its turn: the
    // agent reads it (or picks it from the queue) only after a spin run longer than its deadline, refuses it, never runs it.
    const slow = [1, 2, 3].map((s) => request('spin', spin(s), 10_000));
    const pendingSlow = slow.map((m) => raw.request(key.id, m.id, m));
    const short = request('kws', kws(1), 10);
    const shortReply = await raw.request(key.id, short.id, short);
    assert.equal(shortReply.kind === 'err' && shortReply.code, 'MESH_DEADLINE_EXCEEDED');
    for (const r of await Promise.all(pendingSlow)) assert.equal(r.kind, 'res');
    await servedIs('kws', 0);
    // And it still serves the model.
    const later = request('kws', kws(2), 5_000);
    assert.equal((await raw.request(key.id, later.id, later)).kind, 'res');
  });
});

/**
 * A TCP relay in front of `brokerPort` that keeps, for the client-to-broker direction, the first byte
 * (packet type and flags) of each MQTT packet in each chunk read (a chunk is what one read returned: what
 * the client wrote at once, or more).
 */
async function packetRelay(t: Parameters<typeof tempDir>[0], brokerPort: number) {
  const chunks: number[][] = [];
  const relay = await tcpRelay(t, brokerPort, {
    tap: () => {
      let pending = Buffer.alloc(0);
      return (data) => {
        // Packets that end in this chunk (remaining length: MQTT 3.1.1 §2.2.3).
        pending = Buffer.concat([pending, data]);
        const types: number[] = [];
        for (;;) {
          let length = 0;
          let multiplier = 1;
          let at = 1;
          for (; at < pending.length && at <= 4; at++) {
            length += (pending[at]! & 0x7f) * multiplier;
            multiplier *= 128;
            if ((pending[at]! & 0x80) === 0) break;
          }
          if (at >= pending.length || pending.length < at + 1 + length) break;
          types.push(pending[0]!);
          pending = pending.subarray(at + 1 + length);
        }
        chunks.push(types);
      };
    },
  });
  return { url: relay.url, chunks };
}

describe('the request path', () => {
  test("an inline model's reply leaves the agent in the same write as the request's PUBACK", async (t) => {
    const broker = await brokerFor(t);
    const relay = await packetRelay(t, Number(new URL(broker.url).port));
    const { dir } = await modelsFolder(t, ['kws']);
    // Its own process (the built CLI), so that the relay reads its writes as they come; a generous bound,
    // so that on a busy machine the wake-word model still runs inline.
    const agent = generateIdentity('agent');
    const proc = await spawnAgent(t, relay.url, agent, ['--models', dir, '--inline-max-ms', '20']);
    assert.match(proc.stderrText(), /"inline":\["kws"\]/);
    const mesh = await meshFor(t, { brokerUrl: broker.url });
    await mesh.waitForModel('kws');
    // A QoS 1 PUBLISH (the replies; the heartbeat's load report is QoS 0) and a PUBACK, MQTT 3.1.1 §3.3.1, §3.4.
    const PUBLISH = 0x32;
    const PUBACK = 0x40;
    const before = relay.chunks.length;
    for (let i = 0; i < 20; i++) await mesh.infer('kws', kws(1 + (i % 4)), { deadlineMs: 10_000, agentId: agent.id });
    await waitFor(() => relay.chunks.slice(before).filter((c) => c.includes(PUBLISH)).length >= 20, 5_000, '20 replies relayed');
    const replies = relay.chunks.slice(before).filter((c) => c.includes(PUBLISH));
    // One write per request: its PUBACK and its reply together, never a PUBACK alone.
    assert.deepEqual(
      replies.filter((c) => !c.includes(PUBACK)),
      [],
      `chunks: ${JSON.stringify(relay.chunks.slice(before))}`,
    );
    assert.equal(relay.chunks.slice(before).filter((c) => c.length === 1 && c[0] === PUBACK).length, 0);
  });

  test("a paid request's reply, once its lane is open, leaves in the same write as its PUBACK as well", async (t) => {
    const chain = await startLocalChain({ accounts: 4 });
    t.after(() => chain.close());
    const deployment = await deployMesh(chain.wallet(0), { thawSeconds: 3_600 });
    const { identity, payout, domain } = await registeredAgent(deployment, chain.wallet(1));
    const wallet = chain.wallet(2);
    await fundOwnLane(wallet, deployment.escrow, payout, 1_000_000n);
    const broker = await brokerFor(t);
    const relay = await packetRelay(t, Number(new URL(broker.url).port));
    const { dir } = await modelsFolder(t, ['kws']);
    const paidArgs = ['--payout', payout, '--escrow', deployment.escrow, '--chain-id', String(deployment.chainId), '--rpc', chain.rpcUrl];
    // A window far larger than the run, so that no request has to wait for a voucher (that one is admitted after an await).
    const proc = await spawnAgent(t, relay.url, identity, [
      ...['--models', dir, '--inline-max-ms', '20', ...paidArgs, '--data', await tempDir(t), '--credit-requests', '1000'],
    ]);
    assert.match(proc.stderrText(), /"inline":\["kws"\]/);
    // No voucher while the requests run (its PUBACK would leave alone): the SDK signs them when it closes.
    const mesh = await meshFor(t, {
      brokerUrl: broker.url,
      payment: { signer: wallet, domain, dataDir: await tempDir(t), voucherDelayMs: 60_000 },
    });
    await mesh.waitForModel('kws');
    // The first request opens the lane: its grant is checked and the lane's funds are read from the chain.
    await mesh.infer('kws', kws(), { deadlineMs: 10_000, agentId: identity.id });
    const PUBLISH = 0x32;
    const PUBACK = 0x40;
    const before = relay.chunks.length;
    for (let i = 0; i < 20; i++) {
      const r = await mesh.infer('kws', kws(1 + (i % 4)), { deadlineMs: 10_000, agentId: identity.id });
      assert.equal(r.agentId, identity.id);
    }
    // Each answer's receipt rides on a later answer, or comes by itself (a PUBLISH of its own) after a short wait.
    assert.ok(await mesh.receiptsIn(), 'the last receipt came');
    await waitFor(() => relay.chunks.slice(before).filter((c) => c.includes(PUBACK)).length >= 20, 5_000, '20 replies relayed');
    const chunks = relay.chunks.slice(before);
    // One PUBACK per request, each in the write of its reply.
    const withPuback = chunks.filter((c) => c.includes(PUBACK));
    assert.equal(withPuback.length, 20, `chunks: ${JSON.stringify(chunks)}`);
    assert.deepEqual(
      withPuback.filter((c) => !c.includes(PUBLISH)),
      [],
      `chunks: ${JSON.stringify(chunks)}`,
    );
    assert.equal(mesh.lanes()[0]?.receipts, 21, 'every answer got a receipt the SDK linked');
  });
});

describe('edge-mesh agent --inline-max-ms', () => {
  const threads = (child: ChildProcess) => Number(/^Threads:\s+(\d+)/m.exec(readFileSync(`/proc/${child.pid}/status`, 'utf8'))![1]);

  test('inline by default, a worker thread more with 0; SIGTERM drains queued inline work', async (t) => {
    const broker = await brokerFor(t);
    const { dir } = await modelsFolder(t, ['kws', 'spin']);
    const inlineKey = generateIdentity('agent');
    const pooledKey = generateIdentity('agent');
    const inline = await spawnAgent(t, broker.url, inlineKey, ['--models', dir, '--inline-max-ms', '1000', '--heartbeat-ms', '50']);
    const pooled = await spawnAgent(t, broker.url, pooledKey, ['--models', dir, '--inline-max-ms', '0']);
    assert.match(inline.stderrText(), /"inline":\["kws","spin"\],"workerThreads":0/);
    assert.match(pooled.stderrText(), /"inline":\[\],"workerThreads":1/);
    // The processes as the kernel sees them: the pooled agent has its worker's thread besides the same others.
    assert.ok(threads(inline) < threads(pooled), `threads: inline ${threads(inline)}, pooled ${threads(pooled)}`);

    const mesh = await meshFor(t, { brokerUrl: broker.url });
    await mesh.waitForModel('spin', 10_000, 2);
    const calls = Array.from({ length: 4 }, (_, i) => mesh.infer('spin', spin(i), { deadlineMs: 15_000, agentId: inlineKey.id }));
    await waitFor(
      () => {
        const load = mesh.agents().find((a) => a.id === inlineKey.id)?.load;
        return load !== undefined && load.queued + load.inFlight + (load.models.spin?.served ?? 0) >= 4;
      },
      10_000,
      'the agent to hold all four requests',
    );
    const exited = new Promise<number | null>((resolve) => inline.on('exit', (code) => resolve(code)));
    inline.kill('SIGTERM');
    const results = await Promise.all(calls);
    assert.ok(results.every((r) => r.agentId === inlineKey.id));
    assert.equal(await exited, 0);
  });

  test('a negative bound is refused', async (t) => {
    const broker = await brokerFor(t);
    await assert.rejects(spawnAgent(t, broker.url, generateIdentity('agent'), ['--inline-max-ms', '-1']), /inline-max-ms/);
  });
});
