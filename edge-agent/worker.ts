/**
 * One inference worker: holds an onnxruntime session per model for its whole life (creating and
 * releasing sessions repeatedly leaks) and runs one job at a time, so `session.run`, which blocks
 * the thread it runs on, never blocks the agent's event loop.
 */
import { parentPort } from 'node:worker_threads';
import * as ort from 'onnxruntime-node';
import { DTYPES, isDType, type Tensor, type TensorInfo, type TypedArray } from '../protocol/index.ts';
import type { FromWorker, LoadedModel, ToWorker, WorkerModelSpec } from './worker-protocol.ts';

if (!parentPort) throw new Error('worker.ts must run in a worker thread');
const port = parentPort;
const sessions = new Map<string, ort.InferenceSession>();

function send(message: FromWorker, transfer: ArrayBuffer[] = []): void {
  port.postMessage(message, transfer);
}

function describe(meta: readonly ort.InferenceSession.ValueMetadata[]): TensorInfo[] {
  return meta.map((m) => {
    if (!m.isTensor) return { name: m.name, dtype: 'non-tensor', shape: [] };
    const shape = m.shape.map((d) => (typeof d === 'number' && d >= 0 ? d : typeof d === 'string' ? d : ''));
    return { name: m.name, dtype: m.type, shape };
  });
}

/** Deterministic, non-constant warm-up data: constant inputs can take fast paths real data never does. */
function warmupTensor(info: TensorInfo, spec: { shape?: number[]; fill?: number } | undefined): ort.Tensor {
  const shape = spec?.shape ?? info.shape.map((d) => (typeof d === 'number' ? d : 1));
  const count = shape.reduce((a, b) => a * b, 1);
  if (!isDType(info.dtype)) throw new Error(`input ${info.name} has unsupported type ${info.dtype}`);
  const data = new DTYPES[info.dtype].array(count);
  for (let i = 0; i < count; i++) {
    const value = spec?.fill ?? Math.sin(i * 0.37) * 0.5;
    if (data instanceof BigInt64Array || data instanceof BigUint64Array) data[i] = BigInt(Math.round(value));
    else if (info.dtype === 'float32' || info.dtype === 'float64') data[i] = value;
    else data[i] = Math.round(Math.abs(value));
  }
  return new ort.Tensor(info.dtype, data as never, shape);
}

async function load(spec: WorkerModelSpec, intraOpThreads: number, warmupRuns: number): Promise<LoadedModel> {
  const options: ort.InferenceSession.SessionOptions = {
    intraOpNumThreads: intraOpThreads,
    interOpNumThreads: 1,
    executionMode: 'sequential',
    graphOptimizationLevel: 'all',
  };
  let session: ort.InferenceSession | undefined;
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
  const feeds: Record<string, ort.Tensor> = {};
  for (const info of inputs) feeds[info.name] = warmupTensor(info, spec.warmup?.[info.name]);
  const times: number[] = [];
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

async function run(job: number, model: string, inputs: Record<string, Tensor>): Promise<void> {
  const session = sessions.get(model);
  const t0 = performance.now();
  if (!session) {
    send({ type: 'failed', job, message: `model ${model} is not loaded in this worker`, execMs: 0 });
    return;
  }
  try {
    const feeds: Record<string, ort.Tensor> = {};
    for (const [name, t] of Object.entries(inputs)) feeds[name] = new ort.Tensor(t.dtype, t.data as never, t.shape);
    const results = await session.run(feeds);
    const execMs = performance.now() - t0;
    const outputs: Record<string, Tensor> = {};
    const transfer = new Set<ArrayBuffer>();
    for (const [name, value] of Object.entries(results)) {
      const data = value.data as TypedArray;
      outputs[name] = { dtype: value.type as Tensor['dtype'], shape: [...value.dims], data };
      if (data.buffer instanceof ArrayBuffer) transfer.add(data.buffer);
    }
    send({ type: 'done', job, outputs, execMs }, [...transfer]);
  } catch (err) {
    send({ type: 'failed', job, message: (err as Error).message ?? String(err), execMs: performance.now() - t0 });
  }
}

port.on('message', (message: ToWorker) => {
  if (message.type === 'run') {
    void run(message.job, message.model, message.inputs);
    return;
  }
  void (async () => {
    try {
      const loaded: LoadedModel[] = [];
      for (const spec of message.models) loaded.push(await load(spec, message.intraOpThreads, message.warmupRuns));
      send({ type: 'ready', models: loaded });
    } catch (err) {
      send({ type: 'fatal', message: (err as Error).message ?? String(err) });
    }
  })();
});
