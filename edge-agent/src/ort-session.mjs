// @ts-check
/**
 * onnxruntime sessions as the agent makes and runs them, wherever they live: in an inference worker
 * (worker.mjs) or on the agent's main thread for a model that runs inline (inline.ts). One module, so
 * both make sessions with the same options and convert tensors the same way: a model gives the same
 * bits on either side.
 *
 * Plain JavaScript (type-checked through JSDoc) for the same reason as worker.mjs: a worker starts
 * without a TypeScript loader. It imports onnxruntime-node and the protocol's errors module alone.
 */
// The errors module alone: the whole protocol package would cost every worker its schema compilers.
import { MeshError } from '@edge-mesh/protocol/errors';
import * as ort from 'onnxruntime-node';

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

/**
 * @param {readonly ort.InferenceSession.ValueMetadata[]} meta
 * @returns {TensorInfo[]}
 */
export function describe(meta) {
  return meta.map((m) => {
    if (!m.isTensor) return { name: m.name, dtype: 'non-tensor', shape: [] };
    const shape = m.shape.map((d) => (typeof d === 'number' && d >= 0 ? d : typeof d === 'string' ? d : ''));
    return { name: m.name, dtype: m.type, shape };
  });
}

/**
 * True when every input is a tensor whose every dim is a number: each run then takes tensors of one
 * size, so the warm-up measures what every request will cost (the agent refuses other sizes).
 * @param {readonly TensorInfo[]} inputs
 */
export function fixedShapes(inputs) {
  return inputs.every((i) => i.dtype !== 'non-tensor' && i.shape.every((d) => typeof d === 'number'));
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
 * The warm-up feeds of a model: the manifest's shapes and fills where it gives them.
 * @param {TensorInfo[]} inputs
 * @param {WorkerModelSpec['warmup']} warmup
 * @returns {Record<string, ort.Tensor>}
 */
export function warmupFeeds(inputs, warmup) {
  /** @type {Record<string, ort.Tensor>} */
  const feeds = {};
  for (const info of inputs) feeds[info.name] = warmupTensor(info, warmup?.[info.name]);
  return feeds;
}

/**
 * onnxruntime's two overloads (a path, the bytes) as one call.
 * @param {string | Uint8Array} source
 * @param {ort.InferenceSession.SessionOptions} options
 */
const createFrom = (source, options) =>
  typeof source === 'string' ? ort.InferenceSession.create(source, options) : ort.InferenceSession.create(source, options);

/**
 * A session for `spec`, on the first of its providers that accepts it (CPU last).
 * @param {WorkerModelSpec} spec
 * @param {number} intraOpThreads
 * @param {Uint8Array} [bytes] the model's bytes, when they are not the file's (a model given a batch dimension)
 * @returns {Promise<{ session: ort.InferenceSession; provider: string; inputs: TensorInfo[]; outputs: TensorInfo[] }>}
 */
export async function createSession(spec, intraOpThreads, bytes) {
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
      session = await createFrom(bytes ?? spec.path, { ...options, executionProviders: [candidate] });
      provider = candidate;
      break;
    } catch {
      // The agent already logged which providers it would try; CPU is always last in the list.
    }
  }
  session ??= await createFrom(bytes ?? spec.path, { ...options, executionProviders: ['cpu'] });
  return { session, provider, inputs: describe(session.inputMetadata), outputs: describe(session.outputMetadata) };
}

/**
 * A request's tensors as onnxruntime feeds (no copy: the typed arrays are wrapped).
 * @param {Record<string, Tensor>} inputs
 * @returns {Record<string, ort.Tensor>}
 */
export function toFeeds(inputs) {
  /** @type {Record<string, ort.Tensor>} */
  const feeds = {};
  for (const name of Object.keys(inputs)) {
    const t = /** @type {Tensor} */ (inputs[name]);
    feeds[name] = new ort.Tensor(/** @type {any} */ (t.dtype), /** @type {any} */ (t.data), t.shape);
  }
  return feeds;
}

/**
 * A run's results as the agent's tensors.
 * @param {ort.InferenceSession.ReturnType} results
 * @returns {Record<string, Tensor>}
 */
export function fromResults(results) {
  /** @type {Record<string, Tensor>} */
  const outputs = {};
  for (const name of Object.keys(results)) {
    const value = /** @type {ort.Tensor} */ (results[name]);
    const data = /** @type {Tensor['data']} */ (value.data);
    outputs[name] = { dtype: /** @type {Tensor['dtype']} */ (value.type), shape: value.dims.slice(), data };
  }
  return outputs;
}
