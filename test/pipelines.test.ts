/**
 * Pipelines through a real mesh (docs/pipelines.md): a broker on port 0, agents each serving a subset of the
 * stage models (real ONNX models from npm packages), the SDK's `mesh.pipeline()` and the router's KServe endpoint.
 * The wake-word pipeline is checked bit for bit against the three models run directly with onnxruntime-node in
 * this process, with the steps between them written out here again, independently of client/src/pipelines; the
 * OCR pipeline must read the text an image was drawn with. Dishonest stage agents and bad inputs get coded errors
 * and the mesh keeps serving.
 */
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { copyFile, readFile, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { before, describe, type TestContext, test } from 'node:test';
import {
  type ModelStage,
  ocrPipeline,
  ocrText,
  openMeshConnection,
  type PipelineDefinition,
  recognitionConfidence,
  runPipeline,
  type StageInfer,
  validatePipeline,
  wakeWordPipeline,
} from '@edge-mesh/client';
import { ensurePipelineModelsFolder, installedCommand, kserveInfer, localStages, ocrDictionary, textImage } from '@edge-mesh/demo';
import {
  type AgentStatus,
  decodeMessage,
  encodeMessage,
  encodeTensorMap,
  generateIdentity,
  type InferReply,
  type MeshError,
  PROTOCOL_VERSION,
  parseTopic,
  signStatus,
  type Tensor,
  topics,
} from '@edge-mesh/protocol';
import { agentFor, brokerFor, meshFor, ROOT, routerFor, tempDir } from './helpers.ts';

const WAKE_MODELS = ['oww-melspectrogram', 'oww-embedding', 'oww-hey-jarvis'] as const;
let fullDir: string;

before(async () => {
  fullDir = path.join(os.tmpdir(), 'edge-mesh-test-pipeline-models');
  await ensurePipelineModelsFolder(fullDir, { verify: false });
});

/** A models folder with only `models` of the full one (so each agent serves a subset). */
async function subsetDir(t: TestContext, models: readonly string[]): Promise<string> {
  const manifest = JSON.parse(await readFile(path.join(fullDir, 'manifest.json'), 'utf8')) as { models: { name: string; file: string }[] };
  const dir = await tempDir(t, 'edge-mesh-subset-');
  const picked = models.map((name) => {
    const entry = manifest.models.find((m) => m.name === name);
    assert.ok(entry, `${name} is in the pipeline models folder`);
    return entry;
  });
  for (const m of picked) await copyFile(path.join(fullDir, m.file), path.join(dir, m.file));
  await writeFile(path.join(dir, 'manifest.json'), JSON.stringify({ models: picked }));
  return dir;
}

/** The same entry under another name: stands in for a bigger model (the packages ship no bigger recogniser). */
async function renamedDir(t: TestContext, model: string, as: string): Promise<string> {
  const dir = await subsetDir(t, [model]);
  const manifest = JSON.parse(await readFile(path.join(dir, 'manifest.json'), 'utf8')) as { models: { name: string }[] };
  manifest.models[0]!.name = as;
  await writeFile(path.join(dir, 'manifest.json'), JSON.stringify(manifest));
  return dir;
}

/** 2 s of a deterministic voiced signal: harmonics of a gliding pitch under an envelope, int16. */
function syntheticAudio(seconds = 2): Int16Array {
  const n = seconds * 16_000;
  const out = new Int16Array(n);
  let phase = 0;
  for (let i = 0; i < n; i++) {
    const t = i / 16_000;
    phase += (2 * Math.PI * (140 + 60 * Math.sin(2 * Math.PI * 0.7 * t))) / 16_000;
    let v = 0;
    for (let k = 1; k <= 8; k++) v += Math.sin(k * phase) / k;
    const env = Math.sin((Math.PI * i) / n) ** 2;
    out[i] = Math.round(6_000 * env * v);
  }
  return out;
}

const espeak = installedCommand('espeak-ng') !== undefined;

/** `text` spoken by espeak-ng, resampled linearly from its 22.05 kHz to 16 kHz, ending 0.1 s before 2 s of audio. */
function spoken(text: string, voice = 'en-us', wordsPerMinute = 140): Int16Array {
  const wav = execFileSync('espeak-ng', ['-v', voice, '-s', String(wordsPerMinute), '--stdout', text]);
  const rate = wav.readUInt32LE(24);
  const body = wav.subarray(44, 44 + ((wav.length - 44) & ~1));
  const pcm = new Int16Array(body.buffer.slice(body.byteOffset, body.byteOffset + body.byteLength));
  const n = Math.floor((pcm.length * 16_000) / rate);
  const audio = new Int16Array(32_000);
  const offset = Math.max(0, audio.length - n - 1_600);
  for (let i = 0; i < n && offset + i < audio.length; i++) {
    const x = (i * rate) / 16_000;
    const j = Math.floor(x);
    audio[offset + i] = Math.round(pcm[j]! * (1 - (x - j)) + (pcm[j + 1] ?? 0) * (x - j));
  }
  return audio;
}

const audioTensor = (pcm: Int16Array): Tensor => ({ dtype: 'int16', shape: [1, pcm.length], data: pcm });
const bytesOf = (t: Tensor) => Buffer.from(t.data.buffer, t.data.byteOffset, t.data.byteLength);

/**
 * openWakeWord by hand (openwakeword/utils.py `_get_melspectrogram`, `_get_embeddings`; model.py `get_features(16)`),
 * each model run directly with onnxruntime-node in this process.
 */
async function wakeWordDirect(run: (model: string, inputs: Record<string, Tensor>) => Promise<Record<string, Tensor>>, pcm: Int16Array) {
  const samples = new Float32Array(pcm.length);
  for (let i = 0; i < pcm.length; i++) samples[i] = pcm[i]!;
  const mel = (await run('oww-melspectrogram', { input: { dtype: 'float32', shape: [1, pcm.length], data: samples } })).output!;
  const frames = mel.shape[2]!;
  const spec = new Float32Array(mel.data.length);
  for (let i = 0; i < spec.length; i++) spec[i] = (mel.data as Float32Array)[i]! / 10 + 2;
  const windows: Float32Array[] = [];
  for (let i = 0; i + 76 <= frames; i += 8) windows.push(spec.slice(i * 32, (i + 76) * 32));
  const batch = new Float32Array(windows.length * 76 * 32);
  for (const [k, w] of windows.entries()) batch.set(w, k * 76 * 32);
  const embeddings = (await run('oww-embedding', { input_1: { dtype: 'float32', shape: [windows.length, 76, 32, 1], data: batch } }))
    .conv2d_19!;
  const features = (embeddings.data as Float32Array).slice((windows.length - 16) * 96);
  const score = (await run('oww-hey-jarvis', { 'x.1': { dtype: 'float32', shape: [1, 16, 96], data: features } }))['53']!;
  return { mel, embeddings, score };
}

/**
 * An agent that announces `like`'s models (faster than any) and answers every request with `outputs(request)`:
 * a dishonest stage agent.
 */
async function lyingAgent(
  t: TestContext,
  brokerUrl: string,
  like: AgentStatus,
  outputs: (inputs: Record<string, unknown>) => Record<string, Tensor>,
) {
  const identity = generateIdentity('agent');
  const connection = openMeshConnection(brokerUrl, { identity });
  t.after(() => connection.close());
  await connection.firstConnect;
  const client = connection.client;
  let requests = 0;
  client.on('message', (topic, payload) => {
    const parsed = parseTopic(topic);
    if (parsed?.kind !== 'request') return;
    const request = decodeMessage(payload, ['req']);
    requests++;
    const reply: InferReply = {
      v: PROTOCOL_VERSION,
      kind: 'res',
      id: request.id,
      agent: identity.id,
      model: request.model,
      outputs: encodeTensorMap(outputs(request.inputs)),
      queueMs: 0,
      execMs: 0,
    } as InferReply;
    client.publish(topics.clientReply(parsed.senderId, identity.id), encodeMessage(reply), { qos: 1 });
  });
  await new Promise<void>((resolve, reject) =>
    client.subscribe(topics.agentRequest(identity.id, '+'), { qos: 1 }, (err) => (err ? reject(err) : resolve())),
  );
  const status: AgentStatus = {
    v: PROTOCOL_VERSION,
    kind: 'status',
    agent: identity.id,
    state: 'online',
    ts: Date.now(),
    session: 'liar',
    models: like.models!.map((m) => ({ ...m, latencyMs: 0.001 })),
    workers: 1,
    queueLimit: 8,
  };
  await new Promise<void>((resolve) =>
    client.publish(topics.agentStatus(identity.id), encodeMessage(signStatus(identity, status)), { qos: 1, retain: true }, () => resolve()),
  );
  return {
    id: identity.id,
    get requests() {
      return requests;
    },
  };
}

async function wakeWordMesh(t: TestContext) {
  const broker = await brokerFor(t);
  // Two agents, each serving a subset: the embedding stage can only run on B, the others only on A.
  const a = await agentFor(t, { brokerUrl: broker.url, modelsDir: await subsetDir(t, ['oww-melspectrogram', 'oww-hey-jarvis']) });
  const b = await agentFor(t, { brokerUrl: broker.url, modelsDir: await subsetDir(t, ['oww-embedding']) });
  const mesh = await meshFor(t, { brokerUrl: broker.url });
  for (const m of WAKE_MODELS) await mesh.waitForModel(m, 20_000);
  return { broker, a, b, mesh };
}

describe('pipeline definitions and the orchestrator (no mesh)', () => {
  const f32 = (shape: number[], fill = 0): Tensor => ({
    dtype: 'float32',
    shape,
    data: new Float32Array(shape.reduce((a, b) => a * b, 1)).fill(fill),
  });
  /** x [1, 4] → model `double` → y [1, 4] → step `sum` → total [1]. */
  const def = (extra: Partial<ModelStage> = {}): PipelineDefinition => ({
    name: 'tiny',
    version: '1',
    inputs: { x: { dtype: 'float32', shape: [1, 4] } },
    outputs: ['total'],
    stages: [
      {
        kind: 'model',
        name: 'double',
        model: 'double',
        inputs: { in: 'x' },
        outputs: { out: { as: 'y', spec: { dtype: 'float32', shape: [1, 4] } } },
        ...extra,
      },
      {
        kind: 'step',
        name: 'sum',
        inputs: ['y'],
        outputs: ['total'],
        run: (t) => ({
          total: { dtype: 'float32', shape: [1], data: Float32Array.of((t.y!.data as Float32Array).reduce((a, b) => a + b, 0)) },
        }),
      },
    ],
  });
  /** An in-test request path: `double` doubles, `double-large` triples, and each answer names its agent. */
  const calls: string[] = [];
  const infer: StageInfer = async (model, inputs) => {
    calls.push(model);
    const x = inputs.in!.data as Float32Array;
    const k = model === 'double' ? 2 : 3;
    return {
      outputs: { out: { dtype: 'float32', shape: [1, 4], data: x.map((v) => v * k) } },
      agentId: `agent-${model}`,
      requestId: String(calls.length),
    };
  };

  test('a definition that reads a tensor before any stage writes it, or names a stage twice, is refused', () => {
    const bad = def();
    assert.throws(
      () => validatePipeline({ ...bad, stages: [bad.stages[1]!, bad.stages[0]!] }),
      (err: MeshError) => err.code === 'MESH_CONFIG' && /reads y before/.test(err.message),
    );
    assert.throws(
      () => validatePipeline({ ...bad, stages: [bad.stages[0]!, bad.stages[0]!] }),
      (err: MeshError) => err.code === 'MESH_CONFIG',
    );
    assert.throws(
      () => validatePipeline({ ...bad, outputs: ['nowhere'] }),
      (err: MeshError) => err.code === 'MESH_CONFIG',
    );
    assert.throws(
      () => validatePipeline({ ...bad, name: 'has space' }),
      (err: MeshError) => err.code === 'MESH_CONFIG',
    );
    assert.equal(validatePipeline(bad), bad);
  });

  test('runs stages in order, and escalates only when the rule says so and the deadline allows', async () => {
    calls.length = 0;
    const plain = await runPipeline(def(), { x: f32([1, 4], 1) }, { deadlineMs: 5_000, infer });
    assert.deepEqual(Array.from(plain.outputs.total!.data as Float32Array), [8]);
    const unsure = { model: 'double-large', when: () => true };
    const escalated = await runPipeline(def({ escalate: unsure }), { x: f32([1, 4], 1) }, { deadlineMs: 5_000, infer });
    assert.deepEqual(Array.from(escalated.outputs.total!.data as Float32Array), [12]);
    assert.equal(escalated.stages[0]!.escalatedFrom, 'double');
    assert.equal(escalated.stages[0]!.agentId, 'agent-double-large');
    const noTime = await runPipeline(
      def({ escalate: { ...unsure, minRemainingMs: 60_000 } }),
      { x: f32([1, 4], 1) },
      { deadlineMs: 5_000, infer },
    );
    assert.deepEqual(Array.from(noTime.outputs.total!.data as Float32Array), [8]);
    assert.deepEqual(calls, ['double', 'double', 'double-large', 'double']);
    // The bigger model answering badly: the first answer stands, and the failure is reported.
    const badBig: StageInfer = async (model, inputs, options) =>
      model === 'double' ? infer(model, inputs, options) : { outputs: { out: f32([1, 5]) }, agentId: 'big', requestId: 'b' };
    const kept = await runPipeline(def({ escalate: unsure }), { x: f32([1, 4], 1) }, { deadlineMs: 5_000, infer: badBig });
    assert.deepEqual(Array.from(kept.outputs.total!.data as Float32Array), [8]);
    assert.equal(kept.escalationsFailed.length, 1);
    assert.equal(kept.escalationsFailed[0]!.error.code, 'MESH_BAD_TENSOR');
    assert.deepEqual(
      kept.rejected.map((r) => r.agentId),
      ['big', 'big'],
      'refused, then tried once more (the in-test path ignores the exclusion)',
    );
  });

  test('the deadline covers every stage; a failing step is a coded error', async () => {
    const slow: StageInfer = (model, inputs, options) =>
      new Promise((resolve) => setTimeout(() => resolve(infer(model, inputs, options)), 60));
    await assert.rejects(
      runPipeline(def(), { x: f32([1, 4]) }, { deadlineMs: 30, infer: slow }),
      (err: MeshError) => err.code === 'MESH_DEADLINE_EXCEEDED' && (err.details as { stage?: string }).stage === 'sum',
    );
    const throwing = def();
    (throwing.stages[1] as { run: unknown }).run = () => {
      throw new RangeError('boom');
    };
    await assert.rejects(
      runPipeline(throwing, { x: f32([1, 4]) }, { deadlineMs: 5_000, infer }),
      (err: MeshError) => err.code === 'MESH_BAD_INPUT' && (err.details as { stage?: string }).stage === 'sum',
    );
  });
});

describe('the wake-word pipeline', () => {
  test('gives the same bits as the three models run directly, stage by stage, with its stages on two agents', async (t) => {
    const { a, b, mesh } = await wakeWordMesh(t);
    const local = await localStages(fullDir, WAKE_MODELS);
    t.after(() => local.close());
    const clips = [syntheticAudio(), ...(espeak ? [spoken('hey jarvis'), spoken('good morning')] : [])];
    for (const pcm of clips) {
      const result = await mesh.pipeline('wakeword', { audio: audioTensor(pcm) }, { deadlineMs: 20_000, intermediates: true });
      const direct = await wakeWordDirect(local.run, pcm);
      assert.deepEqual(
        result.stages.map((s) => [s.stage, s.agentId]),
        [
          ['melspectrogram', a.id],
          ['embedding', b.id],
          ['classifier', a.id],
        ],
      );
      assert.equal(new Set(result.stages.map((s) => s.requestId)).size, 3, 'one request per stage');
      assert.deepEqual(result.tensors!.mel!.shape, direct.mel.shape);
      assert.ok(bytesOf(result.tensors!.mel!).equals(bytesOf(direct.mel)), 'melspectrogram bits');
      assert.deepEqual(result.tensors!.embeddings!.shape, direct.embeddings.shape);
      assert.ok(bytesOf(result.tensors!.embeddings!).equals(bytesOf(direct.embeddings)), 'embedding bits');
      assert.ok(bytesOf(result.outputs.score!).equals(bytesOf(direct.score)), 'score bits');
      const score = (direct.score.data as Float32Array)[0]!;
      assert.equal(result.outputs.detected!.data[0], score >= 0.5 ? 1 : 0);
    }
    assert.equal(a.counters.served, clips.length * 2);
    assert.equal(b.counters.served, clips.length);
  });

  test('detects "hey jarvis" spoken by espeak-ng and not other words', { skip: !espeak && 'espeak-ng is not installed' }, async (t) => {
    const { mesh } = await wakeWordMesh(t);
    const said = async (text: string, voice?: string, wpm?: number) =>
      (await mesh.pipeline('wakeword', { audio: audioTensor(spoken(text, voice, wpm)) }, { deadlineMs: 20_000 })).outputs;
    const yes = await said('hey jarvis');
    assert.equal(yes.detected!.data[0], 1, `score ${yes.score!.data[0]}`);
    assert.equal((await said('hey jarvis', 'en', 150)).detected!.data[0], 1);
    const no = await said('good morning');
    assert.equal(no.detected!.data[0], 0, `score ${no.score!.data[0]}`);
  });

  test('bad audio gets a coded error before any stage runs, and the mesh keeps serving', async (t) => {
    const { a, b, mesh } = await wakeWordMesh(t);
    const refused = async (inputs: Record<string, Tensor>, code: string) => {
      await assert.rejects(mesh.pipeline('wakeword', inputs, { deadlineMs: 10_000 }), (err: MeshError) => err.code === code);
    };
    await refused({ audio: { dtype: 'float32', shape: [1, 32_000], data: new Float32Array(32_000) } }, 'MESH_BAD_TENSOR');
    await refused({ audio: { dtype: 'int16', shape: [32_000], data: new Int16Array(32_000) } }, 'MESH_BAD_TENSOR');
    await refused({ audio: { dtype: 'int16', shape: [1, 160_001], data: new Int16Array(160_001) } }, 'MESH_TOO_LARGE');
    await refused({ audio: audioTensor(new Int16Array(32_000)), extra: audioTensor(new Int16Array(4)) }, 'MESH_BAD_TENSOR');
    await assert.rejects(mesh.pipeline('no-such-pipeline', {}), (err: MeshError) => err.code === 'MESH_UNKNOWN_MODEL');
    assert.equal(a.counters.received + b.counters.received, 0, 'nothing was sent');
    // Too short for 16 embeddings: the melspectrogram stage runs (and is answered), then the windowing step refuses.
    await refused({ audio: audioTensor(syntheticAudio(1)) }, 'MESH_BAD_INPUT');
    assert.equal(b.counters.received, 0, 'the embedding stage never ran');
    const ok = await mesh.pipeline('wakeword', { audio: audioTensor(syntheticAudio()) }, { deadlineMs: 20_000 });
    assert.equal(ok.stages.length, 3);
  });

  test('a stage agent answering with a wrong-shaped or oversized tensor is refused and the stage moves to an honest agent', async (t) => {
    const { broker, b, mesh } = await wakeWordMesh(t);
    const audio = audioTensor(syntheticAudio());
    const honest = await mesh.pipeline('wakeword', { audio }, { deadlineMs: 20_000 });
    const lies: Tensor[] = [
      // One embedding short: the classifier would read a shifted window.
      { dtype: 'float32', shape: [15, 1, 1, 96], data: new Float32Array(15 * 96) },
      // 95 dims; float64 instead of float32; a rank short.
      { dtype: 'float32', shape: [16, 1, 1, 95], data: new Float32Array(16 * 95) },
      { dtype: 'float64', shape: [16, 1, 1, 96], data: new Float64Array(16 * 96) },
      { dtype: 'float32', shape: [16, 96], data: new Float32Array(16 * 96) },
      // Oversized: far more embeddings than the longest audio can have.
      { dtype: 'float32', shape: [200, 1, 1, 96], data: new Float32Array(200 * 96) },
    ];
    let lie = lies[0]!;
    const liar = await lyingAgent(t, broker.url, b.status(), () => ({ conv2d_19: lie }));
    await waitForAgents(mesh, 'oww-embedding', 2);
    for (const [i, l] of lies.entries()) {
      lie = l;
      const result = await mesh.pipeline('wakeword', { audio }, { deadlineMs: 20_000 });
      assert.equal(result.rejected.length, 1, `lie ${i}`);
      assert.equal(result.rejected[0]!.agentId, liar.id);
      assert.equal(result.rejected[0]!.stage, 'embedding');
      assert.equal(result.rejected[0]!.error.code, 'MESH_BAD_TENSOR');
      assert.equal(result.stages[1]!.agentId, b.id, 'the embedding stage was answered by the honest agent');
      assert.ok(bytesOf(result.outputs.score!).equals(bytesOf(honest.outputs.score!)), `lie ${i}: same score as without the liar`);
    }
    assert.equal(liar.requests, lies.length);
    // With the honest agent gone, the liar's answer is refused and the pipeline fails with a coded error.
    await b.close();
    await assert.rejects(mesh.pipeline('wakeword', { audio }, { deadlineMs: 5_000 }), (err: MeshError) => {
      assert.equal(err.code, 'MESH_BAD_TENSOR');
      assert.equal((err.details as { agentId?: string }).agentId, liar.id);
      return true;
    });
  });
});

async function waitForAgents(
  mesh: { waitForModel(m: string, timeoutMs?: number, count?: number): Promise<void> },
  model: string,
  count: number,
) {
  await mesh.waitForModel(model, 10_000, count);
}

describe('the OCR pipeline', () => {
  async function ocrMesh(t: TestContext, extraAgents: string[][] = []) {
    const broker = await brokerFor(t);
    const det = await agentFor(t, { brokerUrl: broker.url, modelsDir: await subsetDir(t, ['ocr-det']) });
    const rec = await agentFor(t, { brokerUrl: broker.url, modelsDir: await subsetDir(t, ['ocr-cls', 'ocr-rec']) });
    for (const models of extraAgents) await agentFor(t, { brokerUrl: broker.url, modelsDir: await subsetDir(t, models) });
    return { broker, det, rec };
  }

  test('reads the text an image was drawn with, detection on one agent, direction and recognition on another', async (t) => {
    const { broker, det, rec } = await ocrMesh(t);
    const dictionary = ocrDictionary();
    const mesh = await meshFor(t, { brokerUrl: broker.url, pipelines: [ocrPipeline({ dictionary })] });
    for (const m of ['ocr-det', 'ocr-cls', 'ocr-rec']) await mesh.waitForModel(m, 20_000);
    const lines = ['Pipelines on the edge', 'Hello, world'];
    const result = await mesh.pipeline('ocr', { image: textImage(lines) }, { deadlineMs: 30_000 });
    assert.equal(ocrText(result.outputs), lines.join('\n'));
    assert.equal(result.outputs.boxes!.shape[0], 2);
    assert.deepEqual(
      result.stages.map((s) => [s.stage, s.agentId]),
      [
        ['detection', det.id],
        ['direction', rec.id],
        ['recognition', rec.id],
      ],
    );
    // A blank frame has no text box: the direction and recognition stages send nothing (and cost nothing).
    const blank = textImage([' ']);
    const served = rec.counters.served;
    const empty = await mesh.pipeline('ocr', { image: blank }, { deadlineMs: 30_000 });
    assert.equal(ocrText(empty.outputs), '');
    assert.deepEqual(
      empty.stages.map((s) => s.stage),
      ['detection'],
    );
    assert.equal(rec.counters.served, served);
    // Not an RGB image: refused before any stage.
    await assert.rejects(
      mesh.pipeline('ocr', { image: { dtype: 'uint8', shape: [32, 32, 4], data: new Uint8Array(32 * 32 * 4) } }),
      (err: MeshError) => err.code === 'MESH_BAD_TENSOR',
    );
  });

  test('escalates an unsure recognition to a bigger model on another agent when the deadline allows', async (t) => {
    const { broker, rec } = await ocrMesh(t);
    const big = await agentFor(t, { brokerUrl: broker.url, modelsDir: await renamedDir(t, 'ocr-rec', 'ocr-rec-large') });
    const dictionary = ocrDictionary();
    // Unsure: any line under 0.999 mean step probability (the drawn text reads at about 0.95-0.997).
    const unsure = (outputs: Readonly<Record<string, Tensor>>) =>
      recognitionConfidence(outputs['softmax_11.tmp_0']!).some((c) => c < 0.999);
    const escalating = (minRemainingMs: number) =>
      ocrPipeline({ dictionary, name: `ocr-${minRemainingMs}`, escalate: { model: 'ocr-rec-large', when: unsure, minRemainingMs } });
    const mesh = await meshFor(t, { brokerUrl: broker.url, pipelines: [escalating(0), escalating(3_600_000)] });
    for (const m of ['ocr-det', 'ocr-cls', 'ocr-rec', 'ocr-rec-large']) await mesh.waitForModel(m, 20_000);
    const image = textImage(['Hello, world']);
    const escalated = await mesh.pipeline('ocr-0', { image }, { deadlineMs: 30_000 });
    const recognition = escalated.stages.find((s) => s.stage === 'recognition')!;
    assert.equal(recognition.model, 'ocr-rec-large');
    assert.equal(recognition.escalatedFrom, 'ocr-rec');
    assert.equal(recognition.agentId, big.id);
    assert.equal(ocrText(escalated.outputs), 'Hello, world');
    // Not enough time left for the bigger model: the first answer stands.
    const kept = await mesh.pipeline('ocr-3600000', { image }, { deadlineMs: 30_000 });
    const first = kept.stages.find((s) => s.stage === 'recognition')!;
    assert.equal(first.model, 'ocr-rec');
    assert.equal(first.agentId, rec.id);
    assert.equal(first.escalatedFrom, undefined);
  });
});

describe('pipelines on the router', () => {
  test('POST /v2/models/wakeword/infer runs the pipeline as an ensemble model, with the same bits as the SDK', async (t) => {
    const { broker, a, b, mesh } = await wakeWordMesh(t);
    const router = await routerFor(t, broker.url, { http: { port: 0, processMetrics: false }, pipelines: [wakeWordPipeline()] });
    const audio = audioTensor(syntheticAudio());
    const viaSdk = await mesh.pipeline('wakeword', { audio }, { deadlineMs: 20_000 });
    const url = router.http!.url;
    let viaHttp: Awaited<ReturnType<typeof kserveInfer>> | undefined;
    for (let i = 0; i < 50 && !viaHttp; i++) {
      viaHttp = await kserveInfer(url, 'wakeword', { audio }, 20_000).catch(async (err: MeshError) => {
        if (err.code !== 'MESH_NO_AGENT') throw err;
        await new Promise((r) => setTimeout(r, 100));
        return undefined;
      });
    }
    assert.ok(viaHttp);
    assert.ok(bytesOf(viaHttp.outputs.score!).equals(bytesOf(viaSdk.outputs.score!)));
    assert.equal(viaHttp.agentId, [a.id, b.id, a.id].join(','));
    // The same bits with JSON tensors both ways (the client's default is the binary extension).
    const viaJson = await kserveInfer(url, 'wakeword', { audio }, 20_000, undefined, { json: true });
    assert.ok(bytesOf(viaJson.outputs.score!).equals(bytesOf(viaSdk.outputs.score!)));
    // The pipeline holds one permit of the adaptive concurrency limit while it runs; its stages hold none of their own.
    let held = 0;
    const watch = setInterval(() => {
      held = Math.max(held, router.concurrency()?.outstanding ?? 0);
    }, 1);
    await kserveInfer(url, 'wakeword', { audio }, 20_000).finally(() => clearInterval(watch));
    assert.equal(held, 1);
    // Inputs the pipeline refuses are refused before the permit: no latency sample (a flood of them would drag the
    // limit's baseline towards 0 ms).
    const samples = router.concurrency()!.samples;
    await assert.rejects(
      router.infer('wakeword', { noise: audio }, { limited: true, caller: 'x' }),
      (err: MeshError) => err.code === 'MESH_BAD_TENSOR',
    );
    assert.equal(router.concurrency()!.samples, samples);
    const meta = (await (await fetch(`${url}/v2/models/wakeword`)).json()) as { inputs: { name: string; datatype: string }[] };
    assert.deepEqual(
      meta.inputs.map((i) => [i.name, i.datatype]),
      [['audio', 'INT16']],
    );
    assert.equal((await fetch(`${url}/v2/models/wakeword/ready`)).status, 200);
    // A bad input is a 400 with the mesh's code.
    const bad = await fetch(`${url}/v2/models/wakeword/infer`, {
      method: 'POST',
      headers: { 'content-type': 'application/json' },
      body: JSON.stringify({ inputs: [{ name: 'audio', shape: [1, 4], datatype: 'FP32', data: [0, 0, 0, 0] }] }),
    });
    assert.equal(bad.status, 400);
    assert.equal(((await bad.json()) as { code: string }).code, 'MESH_BAD_TENSOR');
  });
});

describe('pipelines on the router over gRPC', () => {
  test('ModelInfer on the wakeword pipeline, as tritonclient.grpc sends it, gives the bits the SDK gets', async (t) => {
    const { loadKServeProto } = await import('@edge-mesh/router');
    const grpc = await import('@grpc/grpc-js');
    const { broker, mesh } = await wakeWordMesh(t);
    const router = await routerFor(t, broker.url, { grpcPort: 0, pipelines: [wakeWordPipeline()] });
    for (const m of WAKE_MODELS) await router.waitForModel(m, 20_000);
    const audio = audioTensor(syntheticAudio());
    const viaSdk = await mesh.pipeline('wakeword', { audio }, { deadlineMs: 20_000 });
    const proto = loadKServeProto() as unknown as { inference: { GRPCInferenceService: import('@grpc/grpc-js').ServiceClientConstructor } };
    const client = new proto.inference.GRPCInferenceService(router.grpc!.address, grpc.credentials.createInsecure());
    t.after(() => client.close());
    // biome-ignore lint/suspicious/noExplicitAny: a ModelInferResponse as proto-loader gives it
    const res = await new Promise<any>((resolve, reject) =>
      client.ModelInfer!(
        {
          model_name: 'wakeword',
          inputs: [{ name: 'audio', datatype: 'INT16', shape: audio.shape }],
          raw_input_contents: [bytesOf(audio)],
          outputs: [{ name: 'score' }],
        },
        new grpc.Metadata(),
        { deadline: Date.now() + 20_000 },
        // biome-ignore lint/suspicious/noExplicitAny: as above
        (err: Error | null, value: any) => (err ? reject(err) : resolve(value)),
      ),
    );
    assert.equal(res.outputs[0].name, 'score');
    assert.ok(Buffer.from(res.raw_output_contents[0]).equals(bytesOf(viaSdk.outputs.score!)));
  });
});

describe('the examples against a local mesh', () => {
  /** `node examples/<name>.mjs ...args` from the repository root; its stdout as JSON lines. */
  async function runExample(name: string, args: string[], env: Record<string, string>): Promise<Record<string, unknown>[]> {
    const { execFile } = await import('node:child_process');
    const stdout = await new Promise<string>((resolve, reject) =>
      execFile(
        process.execPath,
        [path.join(ROOT, 'examples', `${name}.mjs`), ...args],
        { cwd: ROOT, env: { ...process.env, ...env }, timeout: 120_000 },
        (err, out, errOut) => (err ? reject(new Error(`${name} failed: ${err.message}\n${errOut}`)) : resolve(out)),
      ),
    );
    return stdout
      .trim()
      .split('\n')
      .map((l) => JSON.parse(l) as Record<string, unknown>);
  }

  test('the voice gateway sends raw audio and the camera hub sends frames; both get their answers', async (t) => {
    const broker = await brokerFor(t);
    const a = await agentFor(t, {
      brokerUrl: broker.url,
      modelsDir: await subsetDir(t, ['oww-melspectrogram', 'oww-hey-jarvis', 'ocr-det']),
    });
    const b = await agentFor(t, { brokerUrl: broker.url, modelsDir: await subsetDir(t, ['oww-embedding', 'ocr-cls', 'ocr-rec']) });
    const router = await routerFor(t, broker.url, {
      http: { port: 0, processMetrics: false },
      pipelines: [wakeWordPipeline(), ocrPipeline({ dictionary: ocrDictionary() })],
    });
    const dir = await tempDir(t, 'edge-mesh-examples-');
    // 3 s of audio: "hey jarvis" ending near 2 s when espeak-ng is here, else the synthetic signal, then silence.
    const pcm = new Int16Array(48_000);
    pcm.set(espeak ? spoken('hey jarvis') : syntheticAudio());
    const wav = Buffer.alloc(44 + pcm.byteLength);
    wav.write('RIFF', 0, 'latin1');
    wav.writeUInt32LE(36 + pcm.byteLength, 4);
    wav.write('WAVEfmt ', 8, 'latin1');
    wav.writeUInt32LE(16, 16);
    wav.writeUInt16LE(1, 20);
    wav.writeUInt16LE(1, 22);
    wav.writeUInt32LE(16_000, 24);
    wav.writeUInt32LE(32_000, 28);
    wav.writeUInt16LE(2, 32);
    wav.writeUInt16LE(16, 34);
    wav.write('data', 36, 'latin1');
    wav.writeUInt32LE(pcm.byteLength, 40);
    Buffer.from(pcm.buffer).copy(wav, 44);
    await writeFile(path.join(dir, 'clip.wav'), wav);
    const env = { MESH_BROKER: broker.url, MESH_APP_KEY: path.join(dir, 'no-key'), MESH_ROUTER_URL: router.http!.url };
    const windows = await runExample('voice-gateway', [path.join(dir, 'clip.wav')], env);
    assert.deepEqual(
      windows.map((w) => w.at_s),
      [2, 2.5, 3],
    );
    for (const w of windows) assert.deepEqual(w.stages, [`melspectrogram@${a.id}`, `embedding@${b.id}`, `classifier@${a.id}`]);
    if (espeak) assert.equal(windows[0]!.detected, true, `score ${windows[0]!.score}`);
    assert.ok(
      windows.some((w) => w.detected === false),
      'silence is no wake word',
    );

    const image = textImage(['Pipelines on the edge']);
    const [h, w] = image.shape as [number, number];
    await writeFile(
      path.join(dir, 'frame.ppm'),
      Buffer.concat([Buffer.from(`P6\n# a frame\n${w} ${h}\n255\n`), Buffer.from(image.data.buffer)]),
    );
    await mesh(t, broker.url, ['ocr-det', 'ocr-cls', 'ocr-rec']);
    const [frame] = await runExample('camera-hub', [path.join(dir, 'frame.ppm')], env);
    assert.equal(frame!.text, 'Pipelines on the edge');
    assert.equal(frame!.stages, `detection:ocr-det@${a.id},direction:ocr-cls@${b.id},recognition:ocr-rec@${b.id}`);
  });
});

/** Waits until an SDK client sees every model of `models` served (the router hears the same statuses). */
async function mesh(t: TestContext, brokerUrl: string, models: string[]) {
  const client = await meshFor(t, { brokerUrl });
  for (const m of models) await client.waitForModel(m, 20_000);
}

describe('edge-mesh router --pipelines', () => {
  test('serves the built-in pipelines as KServe models; an unknown name is a configuration error', async (t) => {
    const { spawn } = await import('node:child_process');
    const broker = await brokerFor(t);
    const bin = path.join(ROOT, 'cli', 'bin', 'edge-mesh.mjs');
    const router = spawn(process.execPath, [bin, 'router', '--broker', broker.url, '--http-port', '0', '--pipelines', 'wakeword,ocr'], {
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    t.after(() => router.kill('SIGKILL'));
    const url = await new Promise<string>((resolve, reject) => {
      let out = '';
      const timer = setTimeout(() => reject(new Error(`router did not start: ${out}`)), 30_000);
      router.stdout!.on('data', (chunk: Buffer) => {
        out += chunk.toString();
        const found = /serving (http:\/\/\S+)/.exec(out);
        if (found) {
          clearTimeout(timer);
          resolve(found[1]!);
        }
      });
    });
    const meta = (await (await fetch(`${url}/v2/models/ocr`)).json()) as {
      inputs: { name: string; datatype: string }[];
      outputs: { name: string }[];
    };
    assert.deepEqual(
      meta.inputs.map((i) => [i.name, i.datatype]),
      [['image', 'UINT8']],
    );
    assert.deepEqual(
      meta.outputs.map((o) => o.name),
      ['text', 'confidence', 'boxes'],
    );
    const index = (await (
      await fetch(`${url}/v2/repository/index`, { method: 'POST', body: '{}', headers: { 'content-type': 'application/json' } })
    ).json()) as {
      name: string;
      state: string;
    }[];
    assert.deepEqual(
      index.map((e) => [e.name, e.state]),
      [
        ['ocr', 'UNAVAILABLE'],
        ['wakeword', 'UNAVAILABLE'],
      ],
    );
    const bad = spawn(process.execPath, [bin, 'router', '--broker', broker.url, '--http-port', '0', '--pipelines', 'wakeword,nope'], {
      stdio: 'ignore',
    });
    const code = await new Promise<number | null>((resolve) => bad.on('exit', resolve));
    assert.equal(code, 78);
  });
});
