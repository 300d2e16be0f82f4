/**
 * Stacked inline runs (docs/agent.md, "Batching inline runs"): the requests for an inline model that one read from the
 * broker hands over run together in one onnxruntime run of the model given a batch dimension (edge-agent/src/rebatch.ts,
 * inline.ts). Real models and sessions: the wake-word model, the VAD model (not stackable), and two written here: one
 * whose rows mix (each row minus the mean of all rows, which is 0 for a run of one row) and one that reshapes to a
 * constant shape.
 */
import assert from 'node:assert/strict';
import { readFile, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { describe, test } from 'node:test';
import { sampleInputs } from '@edge-mesh/demo';
import {
  decodeTensorMap,
  encodeTensorMap,
  generateIdentity,
  type InferReply,
  type InferRequest,
  MeshError,
  newRequestId,
  PROTOCOL_VERSION,
  type Tensor,
} from '@edge-mesh/protocol';
import type { JobResult } from '../edge-agent/src/executor.ts';
import { type InlineExecutor, loadInline } from '../edge-agent/src/inline.ts';
import { resolveOptions } from '../edge-agent/src/options.ts';
import { rebatchOnnx } from '../edge-agent/src/rebatch.ts';
import { agentFor, brokerFor, kwsOnlyDir, modelsDir, rawClient, tempDir } from './helpers.ts';
import { lenField, stringField, varintField } from './spin-model.ts';

const WIDTH = 8;

/** ModelProto, opset 17, one graph: `nodes`, input x [1, WIDTH] and output y [1, WIDTH] float32, `extra` graph fields. */
function model(nodes: Buffer[], extra: Buffer[] = []): Buffer {
  const info = (name: string) =>
    Buffer.concat([
      stringField(1, name),
      lenField(
        2,
        lenField(1, Buffer.concat([varintField(1, 1), lenField(2, Buffer.concat([1, WIDTH].map((d) => lenField(1, varintField(1, d)))))])),
      ),
    ]);
  const graph = Buffer.concat([
    ...nodes.map((n) => lenField(1, n)),
    stringField(2, 'g'),
    ...extra,
    lenField(11, info('x')),
    lenField(12, info('y')),
  ]);
  return Buffer.concat([varintField(1, 8), lenField(8, varintField(2, 17)), lenField(7, graph)]);
}
const node = (op: string, inputs: string[], outputs: string[], attributes: Buffer[] = []) =>
  Buffer.concat([
    ...inputs.map((i) => stringField(1, i)),
    ...outputs.map((o) => stringField(2, o)),
    stringField(4, op),
    ...attributes.map((a) => lenField(5, a)),
  ]);
const intsAttribute = (name: string, values: number[]) =>
  Buffer.concat([stringField(1, name), ...values.map((v) => varintField(8, v)), varintField(20, 7)]);
const intAttribute = (name: string, value: number) => Buffer.concat([stringField(1, name), varintField(3, value), varintField(20, 2)]);

/** y = x − mean over rows of x: all zeros for one row; for stacked rows each row depends on the others. */
const rowMixing = () =>
  model([node('ReduceMean', ['x'], ['m'], [intsAttribute('axes', [0]), intAttribute('keepdims', 1)]), node('Sub', ['x', 'm'], ['y'])]);

const scalar = (name: string, value: number) =>
  lenField(5, Buffer.concat([varintField(2, 1), stringField(8, name), lenField(9, Buffer.from(Float32Array.of(value).buffer))]));

/**
 * y = x · T / max(T, max |x| over the whole tensor): a peak limiter. It is the identity until some value of the whole
 * stack passes T, so with T = 1e4 only an extreme row shows that the rows reach each other.
 */
const peakLimiter = (limit: number) =>
  model(
    [
      node('Abs', ['x'], ['a']),
      node('ReduceMax', ['a'], ['m'], [intAttribute('keepdims', 1)]),
      node('Max', ['m', 'limit'], ['d']),
      node('Div', ['limit', 'd'], ['s']),
      node('Mul', ['x', 's'], ['y']),
    ],
    [scalar('limit', limit)],
  );

/** y = 1e-6 · (x − mean over rows): all cross-row, and smaller than any absolute tolerance. */
const tinyMixer = () =>
  model(
    [
      node('ReduceMean', ['x'], ['m'], [intsAttribute('axes', [0]), intAttribute('keepdims', 1)]),
      node('Sub', ['x', 'm'], ['d']),
      node('Mul', ['d', 'k'], ['y']),
    ],
    [scalar('k', 1e-6)],
  );

/** y = Relu(x), with `count` unknown fields (field 100, one byte each) padding its graph. */
function paddedRelu(count: number): Buffer {
  const padding = Buffer.alloc(count * 3);
  for (let i = 0; i < count; i++) padding.set([0xa0, 0x06, 0x01], i * 3);
  return model([node('Relu', ['x'], ['y'])], [padding]);
}

/** y = Reshape(x, [1, WIDTH]): a constant shape that a stacked run cannot take. */
function constantReshape(): Buffer {
  const shape = Buffer.concat([
    varintField(1, 2),
    varintField(2, 7),
    stringField(8, 'shape'),
    lenField(9, Buffer.from(BigInt64Array.from([1n, BigInt(WIDTH)]).buffer)),
  ]);
  return model([node('Reshape', ['x', 'shape'], ['y'])], [lenField(5, shape)]);
}

async function written(t: Parameters<typeof tempDir>[0], name: string, bytes: Buffer): Promise<string> {
  const file = path.join(await tempDir(t), `${name}.onnx`);
  await writeFile(file, bytes);
  return file;
}

async function demoFile(name: string): Promise<string> {
  const dir = await modelsDir();
  const manifest = JSON.parse(await readFile(path.join(dir, 'manifest.json'), 'utf8')) as { models: { name: string; file: string }[] };
  return path.join(dir, manifest.models.find((m) => m.name === name)!.file);
}

async function inline(t: Parameters<typeof tempDir>[0], name: string, file: string, inlineBatchMax: number) {
  const result = await loadInline([{ name, path: file, providers: ['cpu'], warmup: undefined }], {
    intraOpThreads: 1,
    warmupRuns: 5,
    inlineMaxMs: 5,
    inlineBatchMax,
  });
  t.after(() => result.executor?.close());
  return result;
}

/** Hands every job to the executor at once (one read's worth); resolves with each job's outcome, in order. */
function handOver(executor: InlineExecutor, model: string, jobs: Record<string, Tensor>[]): Promise<(JobResult | MeshError)[]> {
  return Promise.all(
    jobs.map(
      (inputs) => new Promise<JobResult | MeshError>((resolve) => executor.run(model, inputs, (err, result) => resolve(err ?? result!))),
    ),
  );
}

const closeTo = (a: Tensor['data'], b: Tensor['data']) =>
  a.length === b.length &&
  Array.prototype.every.call(a, (x: number, i: number) => Math.abs(x - (b[i] as number)) <= 1e-5 * Math.max(1, Math.abs(x)));

describe('a batch dimension for a model that declares none', () => {
  test('the wake-word model gets one; the VAD model (a state input of 2 rows), garbage and a cut file get a reason', async () => {
    const kws = await readFile(await demoFile('kws'));
    const rebatched = rebatchOnnx(kws);
    assert.ok(rebatched.ok);
    assert.ok(rebatched.bytes.length < kws.length + 64, 'only dimensions and value_info change');
    const vad = rebatchOnnx(await readFile(await demoFile('vad')));
    assert.ok(!vad.ok);
    assert.match(vad.reason, /first dimension other than 1/);
    for (const bad of [Buffer.from('not a model at all, just text'), kws.subarray(0, kws.length - 1000), Buffer.alloc(0)]) {
      const r = rebatchOnnx(bad);
      assert.ok(!r.ok, 'refused, not thrown');
    }
  });

  test('a model padded with a million fields is refused at once, not walked for seconds and gigabytes', () => {
    const started = performance.now();
    const heapBefore = process.memoryUsage().heapUsed;
    const r = rebatchOnnx(paddedRelu(1_000_000));
    assert.ok(!r.ok);
    assert.match(r.reason, /more than 100000 fields/);
    assert.ok(performance.now() - started < 2_000, `took ${performance.now() - started} ms`);
    assert.ok(process.memoryUsage().heapUsed - heapBefore < 200 * 2 ** 20, 'heap grew by less than 200 MB');
    assert.ok(rebatchOnnx(paddedRelu(10)).ok, 'a few unknown fields are copied as they are');
  });

  test('the probe turns stacking on for the wake-word model, and off for a model whose rows mix or whose shape is constant', async (t) => {
    const kws = await inline(t, 'kws', await demoFile('kws'), 16);
    const probe = kws.probes[0]!.batching!;
    assert.ok(probe.on, JSON.stringify(probe));
    assert.ok(probe.rowMs! < probe.aloneMs, `a stacked row ${probe.rowMs} ms, a run alone ${probe.aloneMs} ms`);

    const mixing = await inline(t, 'mixing', await written(t, 'mixing', rowMixing()), 16);
    assert.equal(mixing.probes[0]!.inline, true, 'it runs inline, one request at a time');
    assert.equal(mixing.probes[0]!.batching!.on, false);
    assert.match(mixing.probes[0]!.batching!.reason!, /does not give row \d+ its own outputs/);

    const reshape = await inline(t, 'reshape', await written(t, 'reshape', constantReshape()), 16);
    assert.equal(reshape.probes[0]!.batching!.on, false);
    assert.match(reshape.probes[0]!.batching!.reason!, /stacked run failed|does not load/);

    // Models whose rows reach each other only at some magnitudes: the isolation runs (one row at ±1e6, 0 or NaN, the
    // others compared bit for bit) catch what a comparison with each row's own run at ordinary values does not.
    for (const [name, bytes, reason] of [
      ['limiter at 1', peakLimiter(1), /does not give row/],
      ['limiter at 1e4', peakLimiter(1e4), /row \d set to (1000000|-1000000) changed row \d's output y: the rows are not independent/],
      ['tiny', tinyMixer(), /does not give row/],
    ] as const) {
      const probe = (await inline(t, name, await written(t, name.replace(/ /g, '-'), bytes), 16)).probes[0]!;
      assert.equal(probe.inline, true);
      assert.equal(probe.batching!.on, false, `${name}: ${JSON.stringify(probe.batching)}`);
      assert.match(probe.batching!.reason!, reason, name);
    }

    const off = await inline(t, 'kws', await demoFile('kws'), 1);
    assert.equal(off.probes[0]!.batching, undefined, 'inlineBatchMax 1: no probe');
  });
});

describe('stacked runs', () => {
  test("the jobs handed over together run stacked, each with the outputs of its own run; a liar's malformed tensor fails only its job", async (t) => {
    const stacked = (await inline(t, 'kws', await demoFile('kws'), 16)).executor!;
    const alone = (await inline(t, 'kws-alone', await demoFile('kws'), 1)).executor!;
    const jobs = Array.from({ length: 8 }, (_, i) => sampleInputs('kws', i + 1));
    const expected = [];
    for (const inputs of jobs) expected.push((await handOver(alone, 'kws-alone', [inputs]))[0] as JobResult);
    // A job handed over alone runs alone; two handed over together run in one stacked run.
    const [lone] = await handOver(stacked, 'kws', [jobs[0]!]);
    assert.ok(closeTo((lone as JobResult).outputs['39']!.data, expected[0]!.outputs['39']!.data));
    assert.deepEqual(stacked.stacking, { runs: 0, requests: 0, fallbacks: 0 }, 'a job alone is not stacked');
    await handOver(stacked, 'kws', jobs.slice(0, 2));
    assert.deepEqual(stacked.stacking, { runs: 1, requests: 2, fallbacks: 0 }, 'two jobs together: one stacked run');
    stacked.stacking.runs = stacked.stacking.requests = 0;
    const got = await handOver(stacked, 'kws', jobs);
    assert.deepEqual(stacked.stacking, { runs: 1, requests: 8, fallbacks: 0 }, 'the eight jobs in one run');
    for (const g of got as JobResult[]) assert.equal(g.shareMs, g.execMs / 8, 'each job counts an eighth of the run');
    for (let i = 0; i < jobs.length; i++) {
      const g = got[i] as JobResult;
      assert.ok(!(g instanceof MeshError));
      for (const [name, e] of Object.entries(expected[i]!.outputs)) {
        assert.deepEqual(g.outputs[name]!.shape, e.shape);
        assert.ok(closeTo(g.outputs[name]!.data, e.data), `job ${i} output ${name}: ${g.outputs[name]!.data} against ${e.data} alone`);
      }
    }
    // The outputs of the jobs share no memory: a job's rows are its own copy.
    const buffers = new Set(got.map((g) => (g as JobResult).outputs['39']!.data.buffer));
    assert.equal(buffers.size, jobs.length);

    // One job with a tensor of the wrong length (the agent's checks would refuse it; the executor must not trust them):
    // the stack cannot be built, every job runs on its own, and only the liar's fails.
    const liar = { ...sampleInputs('kws', 99) };
    const name = Object.keys(liar)[0]!;
    liar[name] = { ...liar[name]!, data: new Float32Array(10) };
    const mixed = [...jobs.slice(0, 4), liar, ...jobs.slice(4)];
    const outcomes = await handOver(stacked, 'kws', mixed);
    assert.equal(stacked.stacking.fallbacks, 1);
    assert.ok(outcomes[4] instanceof MeshError && outcomes[4].code === 'MESH_INFERENCE_FAILED', String(outcomes[4]));
    for (const [i, o] of outcomes.entries()) {
      if (i === 4) continue;
      const own = expected[i < 4 ? i : i - 1]!;
      assert.ok(!(o instanceof MeshError), `job ${i}: ${o}`);
      assert.ok(closeTo(o.outputs['39']!.data, own.outputs['39']!.data), `job ${i}`);
    }
  });

  test('later reads of the same turn: their jobs wait for the check phase and run together in one more run', async (t) => {
    const stacked = (await inline(t, 'kws', await demoFile('kws'), 16)).executor!;
    const jobs = Array.from({ length: 4 }, (_, i) => sampleInputs('kws', i + 1));
    const first = handOver(stacked, 'kws', [jobs[0]!]);
    await null; // the first read's flush (a microtask) has run: its run waits for the check phase
    const second = handOver(stacked, 'kws', [jobs[1]!]);
    await null; // a read of one request over TLS (a read there holds one or two)
    const third = handOver(stacked, 'kws', jobs.slice(2));
    const got = [...(await first), ...(await second), ...(await third)];
    assert.deepEqual(
      stacked.stacking,
      { runs: 1, requests: 3, fallbacks: 0 },
      'the first alone, the three of the two later reads in one run',
    );
    assert.ok(got.every((g) => !(g instanceof MeshError)));
  });

  test('33 jobs together with a batch max of 16: two stacked runs and one alone, each answered once; close() before the flush ends', async (t) => {
    const stacked = (await inline(t, 'kws', await demoFile('kws'), 16)).executor!;
    const calls = new Array(33).fill(0);
    await Promise.all(
      Array.from(
        { length: 33 },
        (_, i) =>
          new Promise<void>((resolve) =>
            stacked.run('kws', sampleInputs('kws', i + 1), () => {
              calls[i]++;
              resolve();
            }),
          ),
      ),
    );
    await new Promise((r) => setTimeout(r, 20));
    assert.deepEqual(calls, new Array(33).fill(1));
    assert.deepEqual(stacked.stacking, { runs: 2, requests: 32, fallbacks: 0 });

    // Closed between the hand-over and the flush: close() ends, and the jobs are dropped, not answered.
    let answered = 0;
    stacked.run('kws', sampleInputs('kws', 1), () => answered++);
    stacked.run('kws', sampleInputs('kws', 2), () => answered++);
    const ended = await Promise.race([stacked.close().then(() => 'closed'), new Promise((r) => setTimeout(r, 2_000, 'hung'))]);
    assert.equal(ended, 'closed');
    await new Promise((r) => setTimeout(r, 20));
    assert.equal(answered, 0);
  });

  test("a job that runs alone adds the executor's own hand-off to its estimate, not another inline model's run queued before it", async (t) => {
    // Rows mix (so it runs one request at a time), and 400 Sin nodes make its run cost a few tenths of a millisecond.
    const nodes = [
      node('ReduceMean', ['x'], ['m'], [intsAttribute('axes', [0]), intAttribute('keepdims', 1)]),
      node('Sub', ['x', 'm'], ['y0']),
    ];
    for (let i = 0; i < 400; i++) nodes.push(node('Sin', [`y${i}`], [`y${i + 1}`]));
    nodes.push(node('Identity', ['y400'], ['y']));
    const specs = [
      { name: 'kws', path: await demoFile('kws'), providers: ['cpu'], warmup: undefined },
      { name: 'slow', path: await written(t, 'slow', model(nodes)), providers: ['cpu'], warmup: undefined },
    ];
    const result = await loadInline(specs, { intraOpThreads: 1, warmupRuns: 5, inlineMaxMs: 5, inlineBatchMax: 16 });
    t.after(() => result.executor?.close());
    assert.deepEqual(
      result.probes.map((p) => [p.name, p.inline, p.batching?.on]),
      [
        ['kws', true, true],
        ['slow', true, false],
      ],
    );
    const executor = result.executor!;
    const slowInput = { x: { dtype: 'float32' as const, shape: [1, WIDTH], data: new Float32Array(WIDTH).fill(0.5) } };
    // Each pair is one read's worth: a wake-word request (stackable, alone in its read), then one for the other model,
    // whose run is queued before the wake-word flush. Each pair's hand-off sample is backed out of the EWMA (alpha 0.1);
    // medians, so that one preemption on a busy machine does not decide.
    const samples: number[] = [];
    const slowRuns: number[] = [];
    for (let i = 0; i < 100; i++) {
      const before = executor.handoffMs;
      const [, [slow]] = await Promise.all([handOver(executor, 'kws', [sampleInputs('kws', 1)]), handOver(executor, 'slow', [slowInput])]);
      assert.ok(slow && !(slow instanceof MeshError), String(slow));
      samples.push((executor.handoffMs - 0.9 * before) / 0.1);
      slowRuns.push(slow.execMs);
    }
    const median = (xs: number[]) => xs.sort((a, b) => a - b)[xs.length >> 1]!;
    assert.ok(
      median(samples) < median(slowRuns) / 2,
      `hand-off sample median ${median(samples).toFixed(4)} ms, the other model's run ${median(slowRuns).toFixed(4)} ms`,
    );
  });

  test('a callback that throws does not strand the stacked jobs after it, and close() still ends', async (t) => {
    const stacked = (await inline(t, 'kws', await demoFile('kws'), 16)).executor!;
    const called: number[] = [];
    const thrown: unknown[] = [];
    stacked.onCallbackError = (err) => void thrown.push(err);
    await new Promise<void>((resolve) => {
      for (let i = 0; i < 4; i++)
        stacked.run('kws', sampleInputs('kws', i + 1), () => {
          called.push(i);
          if (i === 1) throw new Error('a caller that throws');
          if (called.length === 4) resolve();
        });
    });
    assert.deepEqual(
      called.sort((a, b) => a - b),
      [0, 1, 2, 3],
    );
    assert.equal(stacked.stacking.runs, 1);
    const ended = await Promise.race([stacked.close().then(() => 'closed'), new Promise((r) => setTimeout(r, 2_000, 'hung'))]);
    assert.equal(ended, 'closed');
    assert.deepEqual(
      thrown.map((e) => (e as Error).message),
      ['a caller that throws'],
      'the throw still surfaces, once',
    );
  });

  test('an agent answers a burst of wake-word requests stacked, each with its own outputs, and counts the stacked runs', async (t) => {
    const broker = await brokerFor(t);
    const agent = await agentFor(t, { brokerUrl: broker.url, modelsDir: await kwsOnlyDir(t) });
    const alone = (await inline(t, 'kws', await demoFile('kws'), 1)).executor!;
    const raw = await rawClient(t, broker.url, generateIdentity('app'));
    const inputs = Array.from({ length: 32 }, (_, i) => sampleInputs('kws', i + 1));
    const requests: InferRequest[] = inputs.map((x) => ({
      v: PROTOCOL_VERSION,
      kind: 'req',
      id: newRequestId(),
      deadline: Date.now() + 10_000,
      model: 'kws',
      inputs: encodeTensorMap(x),
    }));
    const replies = await Promise.all(requests.map((r) => raw.request(agent.id, r.id, r, 10_000)));
    assert.ok(agent.counters.stacked.runs > 0, `stacked runs ${JSON.stringify(agent.counters.stacked)}`);
    for (const [i, r] of replies.entries()) {
      assert.equal(r.kind, 'res', JSON.stringify(r));
      const own = (await handOver(alone, 'kws', [inputs[i]!]))[0] as JobResult;
      const got = decodeTensorMap((r as InferReply).outputs);
      assert.ok(closeTo(got['39']!.data, own.outputs['39']!.data), `request ${i}`);
    }
    assert.equal(agent.counters.served, 32);
  });

  test('inlineBatchMax must be an integer from 1 to 1024', () => {
    for (const inlineBatchMax of [0, 1.5, 2000, Number.NaN])
      assert.throws(() => resolveOptions({ brokerUrl: 'mqtt://127.0.0.1:1', modelsDir: '/tmp', inlineBatchMax }), /inlineBatchMax/);
  });
});
