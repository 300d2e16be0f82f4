// @ts-check
/**
 * One inference worker: holds an onnxruntime session per model for its whole life (creating and
 * releasing sessions repeatedly leaks) and runs one job at a time, so `session.run`, which blocks
 * the thread it runs on, never blocks the agent's event loop.
 *
 * Plain JavaScript (type-checked through JSDoc) so a worker starts without a TypeScript loader:
 * each loader costs a thread, ~30 MB and ~250 ms per worker. Its messages are typed in
 * worker-protocol.ts.
 */
import { parentPort } from 'node:worker_threads';
// The errors module alone: the whole protocol package would cost every worker its schema compilers.
import { MeshError } from '@edge-mesh/protocol/errors';
import * as ort from 'onnxruntime-node';

/** @typedef {import('./worker-protocol.ts').ToWorker} ToWorker */
/** @typedef {import('./worker-protocol.ts').FromWorker} FromWorker */
/** @typedef {import('./worker-protocol.ts').LoadedModel} LoadedModel */
/** @typedef {import('./worker-protocol.ts').WorkerModelSpec} WorkerModelSpec */
/** @typedef {import('@edge-mesh/protocol').TensorInfo} TensorInfo */
/** @typedef {import('@edge-mesh/protocol').Tensor} Tensor */

/** Typed array per dtype, as onnxruntime-node expects them (float16 as raw 16-bit patterns). */
const ARRAYS = /** @type {const} */ ({
  float32: Float32Array,
  float64: Float64Array,
  float16: Uint16Array,
  int8: Int8Array,
  uint8: Uint8Array,
  int16: Int16Array,
  uint16: Uint16Array,
  int32: Int32Array,
  uint32: Uint32Array,
  int64: BigInt64Array,
  uint64: BigUint64Array,
  bool: Uint8Array,
});

if (!parentPort) throw new MeshError('MESH_INTERNAL', 'worker.mjs must run in a worker thread');
const port = parentPort;
/** @type {Map<string, ort.InferenceSession>} */
const sessions = new Map();

/**
 * @param {FromWorker} message
 * @param {ArrayBuffer[]} [transfer]
 */
function send(message, transfer = []) {
  port.postMessage(message, transfer);
}

/**
 * @param {readonly ort.InferenceSession.ValueMetadata[]} meta
 * @returns {TensorInfo[]}
 */
function describe(meta) {
  return meta.map((m) => {
    if (!m.isTensor) return { name: m.name, dtype: 'non-tensor', shape: [] };
    const shape = m.shape.map((d) => (typeof d === 'number' && d >= 0 ? d : typeof d === 'string' ? d : ''));
    return { name: m.name, dtype: m.type, shape };
  });
}

/**
 * Deterministic, non-constant warm-up data: constant inputs can take fast paths real data never does.
 * @param {TensorInfo} info
 * @param {{ shape?: number[]; fill?: number } | undefined} spec
 */
function warmupTensor(info, spec) {
  const shape = spec?.shape ?? info.shape.map((d) => (typeof d === 'number' ? d : 1));
  const count = shape.reduce((a, b) => a * b, 1);
  const Ctor = ARRAYS[/** @type {keyof typeof ARRAYS} */ (info.dtype)];
  if (!Ctor) throw new MeshError('MESH_BAD_INPUT', `input ${info.name} has unsupported type ${info.dtype}`);
  const data = new Ctor(count);
  for (let i = 0; i < count; i++) {
    const value = spec?.fill ?? Math.sin(i * 0.37) * 0.5;
    if (data instanceof BigInt64Array || data instanceof BigUint64Array) data[i] = BigInt(Math.round(value));
    else if (info.dtype === 'float32' || info.dtype === 'float64') data[i] = value;
    else data[i] = Math.round(Math.abs(value));
  }
  return new ort.Tensor(/** @type {any} */ (info.dtype), /** @type {any} */ (data), shape);
}

/**
 * @param {WorkerModelSpec} spec
 * @param {number} intraOpThreads
 * @param {number} warmupRuns
 * @returns {Promise<LoadedModel>}
 */
async function load(spec, intraOpThreads, warmupRuns) {
  /** @type {ort.InferenceSession.SessionOptions} */
  const options = {
    intraOpNumThreads: intraOpThreads,
    interOpNumThreads: 1,
    executionMode: 'sequential',
    graphOptimizationLevel: 'all',
    // The memory pattern plans one block for all of a run's intermediate tensors and keeps a plan per
    // input shape it has seen; the arena alone serves them as well. Off, the OCR detector holds 13 MB
    // less per worker at the same run time; the wake-word model is unchanged (docs/agent.md).
    enableMemPattern: false,
  };
  /** @type {ort.InferenceSession | undefined} */
  let session;
  let provider = 'cpu';
  for (const candidate of spec.providers) {
    try {
      session = await ort.InferenceSession.create(spec.path, { ...options, executionProviders: [candidate] });
      provider = candidate;
      break;
    } catch {
      // The agent already logged which providers it would try; CPU is always last in the list.
    }
  }
  session ??= await ort.InferenceSession.create(spec.path, { ...options, executionProviders: ['cpu'] });
  sessions.set(spec.name, session);
  const inputs = describe(session.inputMetadata);
  const outputs = describe(session.outputMetadata);
  /** @type {Record<string, ort.Tensor>} */
  const feeds = {};
  for (const info of inputs) feeds[info.name] = warmupTensor(info, spec.warmup?.[info.name]);
  /** @type {number[]} */
  const times = [];
  // The first run pays for lazy allocations; it is not part of the measurement.
  await session.run(feeds);
  for (let i = 0; i < warmupRuns; i++) {
    const t0 = performance.now();
    await session.run(feeds);
    times.push(performance.now() - t0);
  }
  times.sort((a, b) => a - b);
  return { name: spec.name, inputs, outputs, provider, latencyMs: times[Math.floor(times.length / 2)] ?? 0 };
}

/**
 * @param {number} job
 * @param {string} model
 * @param {Record<string, Tensor>} inputs
 */
async function run(job, model, inputs) {
  const session = sessions.get(model);
  const t0 = performance.now();
  if (!session) {
    send({ type: 'failed', job, message: `model ${model} is not loaded in this worker`, execMs: 0 });
    return;
  }
  try {
    /** @type {Record<string, ort.Tensor>} */
    const feeds = {};
    for (const [name, t] of Object.entries(inputs))
      feeds[name] = new ort.Tensor(/** @type {any} */ (t.dtype), /** @type {any} */ (t.data), t.shape);
    const results = await session.run(feeds);
    const execMs = performance.now() - t0;
    /** @type {Record<string, Tensor>} */
    const outputs = {};
    /** @type {Set<ArrayBuffer>} */
    const transfer = new Set();
    for (const [name, value] of Object.entries(results)) {
      const data = /** @type {Tensor['data']} */ (value.data);
      outputs[name] = { dtype: /** @type {Tensor['dtype']} */ (value.type), shape: [...value.dims], data };
      if (data.buffer instanceof ArrayBuffer) transfer.add(data.buffer);
    }
    send({ type: 'done', job, outputs, execMs }, [...transfer]);
  } catch (err) {
    send({ type: 'failed', job, message: err instanceof Error ? err.message : String(err), execMs: performance.now() - t0 });
  }
}

/** Batches run in arrival order, one job at a time. */
let queue = Promise.resolve();

port.on('message', (/** @type {ToWorker} */ message) => {
  if (message.type === 'run') {
    queue = queue.then(async () => {
      for (const { job, model, inputs } of message.jobs) await run(job, model, inputs);
    });
    return;
  }
  void (async () => {
    try {
      /** @type {LoadedModel[]} */
      const loaded = [];
      for (const spec of message.models) loaded.push(await load(spec, message.intraOpThreads, message.warmupRuns));
      send({ type: 'ready', models: loaded });
    } catch (err) {
      send({ type: 'fatal', message: err instanceof Error ? err.message : String(err) });
    }
  })();
});
