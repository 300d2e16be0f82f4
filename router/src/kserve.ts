/**
 * The parts of the Open Inference Protocol (KServe v2) and of Triton's HTTP extensions that sit beside the
 * JSON tensors of http.ts (docs/routing.md, "The HTTP API"):
 *
 * - the binary tensor data extension: a body is a JSON header of `Inference-Header-Content-Length` bytes
 *   followed by the raw little-endian bytes of each input whose `parameters.binary_data_size` is set, in the
 *   order of the inputs; outputs asked for with `parameters.binary_data` (or the request's
 *   `parameters.binary_data_output`) come back the same way. Followed: the extension as Triton documents it
 *   (triton-inference-server/server, docs/protocol/extension_binary_data.md) and as Triton's Python client
 *   builds its default request (triton-inference-server/client,
 *   src/python/library/tritonclient/http/_utils.py, `_get_inference_request`: no `outputs` means
 *   `binary_data_output: true`; `timeout` in microseconds);
 * - the model configuration extension (`/config`) in Triton's JSON form of a model config;
 * - the statistics extension (`/stats`), from what this router saw of its HTTP requests;
 * - the repository index.
 *
 * - what the HTTP routes (http.ts) and the gRPC service (grpc.ts) share: the datatype mapping, the version rule
 *   (`modelFor`), model metadata, the repository index, readiness, the request parameters (deadline, refused
 *   sequence requests) and one statistics store per router, so both fronts count into the same `/stats`.
 *
 * Pure functions over the router handle and a small counter store; the routes are in http.ts and grpc.ts.
 */
import { type DType, decodeTensor, encodeTensor, MeshError, type ModelInfo, type Tensor } from '@edge-mesh/protocol';
import type { RouterHandle } from './handle.ts';

/** KServe v2 datatypes and the mesh dtypes they map to (BYTES has no mesh counterpart). */
export const KSERVE_TO_DTYPE = {
  BOOL: 'bool',
  UINT8: 'uint8',
  UINT16: 'uint16',
  UINT32: 'uint32',
  UINT64: 'uint64',
  INT8: 'int8',
  INT16: 'int16',
  INT32: 'int32',
  INT64: 'int64',
  FP16: 'float16',
  FP32: 'float32',
  FP64: 'float64',
} as const satisfies Record<string, DType>;
export type KServeDatatype = keyof typeof KSERVE_TO_DTYPE;

export const DTYPE_TO_KSERVE = Object.fromEntries(Object.entries(KSERVE_TO_DTYPE).map(([k, v]) => [v, k])) as Record<DType, KServeDatatype>;

/** ONNX type strings an agent may report in its status, to mesh dtypes. */
export const ONNX_TYPE_TO_DTYPE: Record<string, DType> = {
  'tensor(float)': 'float32',
  'tensor(double)': 'float64',
  'tensor(float16)': 'float16',
  'tensor(int8)': 'int8',
  'tensor(uint8)': 'uint8',
  'tensor(int16)': 'int16',
  'tensor(uint16)': 'uint16',
  'tensor(int32)': 'int32',
  'tensor(uint32)': 'uint32',
  'tensor(int64)': 'int64',
  'tensor(uint64)': 'uint64',
  'tensor(bool)': 'bool',
  float: 'float32',
  double: 'float64',
};

/** The KServe datatype for a dtype string from an agent's status ('float32', 'tensor(float)', ...). */
export function kserveDatatypeOf(dtype: string): string {
  const mesh = (Object.hasOwn(DTYPE_TO_KSERVE, dtype) ? dtype : ONNX_TYPE_TO_DTYPE[dtype]) as DType | undefined;
  return mesh ? DTYPE_TO_KSERVE[mesh] : dtype.toUpperCase();
}

/** The media type http.ts gives a body that carries `Inference-Header-Content-Length`, whatever its sender said. */
export const BINARY_BODY_TYPE = 'application/x-edge-mesh-kserve-binary';
export const HEADER_LENGTH = 'inference-header-content-length';
/** Where a parsed binary body keeps its tensor bytes (beside the JSON header, invisible to schema checks). */
export const BINARY_SECTION = Symbol('kserve binary section');

/** Extensions this router implements fully, as `/v2` lists them. */
export const KSERVE_EXTENSIONS = ['binary_tensor_data', 'model_configuration', 'statistics'] as const;

export interface BinaryCarrier {
  [BINARY_SECTION]?: Buffer;
}

/**
 * The JSON header's length a binary-extension body claims (`Inference-Header-Content-Length`), checked: a whole
 * number within the body's `bodyBytes`, else MESH_BAD_REQUEST. Requests to the router and answers to the sample
 * app's client are framed alike.
 */
export function binaryHeaderLength(headerLength: string | string[] | undefined | null, bodyBytes: number): number {
  const raw = (Array.isArray(headerLength) ? headerLength[0] : headerLength) ?? undefined;
  const length = raw !== undefined && /^\d{1,12}$/.test(raw.trim()) ? Number(raw.trim()) : Number.NaN;
  if (!Number.isSafeInteger(length) || length > bodyBytes) {
    throw new MeshError(
      'MESH_BAD_REQUEST',
      `Inference-Header-Content-Length ${JSON.stringify(raw)} is not a length within the ${bodyBytes}-byte body`,
      {
        details: { headerLength: raw ?? null, bodyBytes },
      },
    );
  }
  return length;
}

/**
 * Splits a binary-extension body: the JSON header (parsed) and the bytes after it. The header length must be a
 * whole number within the body; the header must be a JSON object.
 */
export function splitBinaryBody(body: Buffer, headerLength: string | string[] | undefined): object & BinaryCarrier {
  const length = binaryHeaderLength(headerLength, body.length);
  let header: unknown;
  try {
    header = JSON.parse(body.subarray(0, length).toString('utf8'));
  } catch (err) {
    throw new MeshError('MESH_BAD_REQUEST', `the JSON header of a binary body does not parse: ${(err as Error).message}`);
  }
  if (header === null || typeof header !== 'object' || Array.isArray(header)) {
    throw new MeshError('MESH_BAD_REQUEST', 'the JSON header of a binary body must be an object');
  }
  Object.defineProperty(header, BINARY_SECTION, { value: body.subarray(length), enumerable: false });
  return header as object & BinaryCarrier;
}

/** The `binary_data_size` of an input's parameters, undefined when the input carries JSON data. */
function binarySize(name: string, parameters: Record<string, unknown> | undefined): number | undefined {
  const size = parameters?.binary_data_size;
  if (size === undefined) return undefined;
  if (typeof size !== 'number' || !Number.isSafeInteger(size) || size < 0) {
    throw new MeshError('MESH_BAD_TENSOR', `input ${name}: binary_data_size must be a non-negative integer`, { details: { input: name } });
  }
  return size;
}

export interface BinaryInput {
  name: string;
  shape: number[];
  dtype: DType;
  parameters?: Record<string, unknown>;
}

/**
 * The tensors of the inputs that name a `binary_data_size`, cut from the bytes after the header in input order.
 * Every byte must belong to exactly one input: a short or long section is refused, as is binary data when no
 * input asks for it.
 */
export function binaryInputs(inputs: readonly BinaryInput[], section: Buffer | undefined): Map<string, Tensor> {
  const out = new Map<string, Tensor>();
  let offset = 0;
  const bytes = section ?? Buffer.alloc(0);
  for (const input of inputs) {
    const size = binarySize(input.name, input.parameters);
    if (size === undefined) continue;
    if (section === undefined) {
      throw new MeshError(
        'MESH_BAD_REQUEST',
        `input ${input.name} names binary_data_size but the request has no Inference-Header-Content-Length`,
        {
          details: { input: input.name },
        },
      );
    }
    if (offset + size > bytes.length) {
      throw new MeshError(
        'MESH_BAD_TENSOR',
        `input ${input.name}: binary_data_size ${size} runs past the body (${bytes.length - offset} bytes left)`,
        {
          details: { input: input.name },
        },
      );
    }
    // decodeTensor checks shape × item size against the byte count and copies into an aligned array.
    out.set(input.name, decodeTensor(input.name, { dtype: input.dtype, shape: input.shape, data: bytes.subarray(offset, offset + size) }));
    offset += size;
  }
  if (offset !== bytes.length) {
    throw new MeshError(
      'MESH_BAD_REQUEST',
      `the binary section has ${bytes.length - offset} bytes that no input's binary_data_size accounts for`,
      {
        details: { extraBytes: bytes.length - offset },
      },
    );
  }
  return out;
}

/** Whether an output goes back as binary: its own `binary_data`, else the request's `binary_data_output`. */
export function wantsBinary(
  name: string,
  outputs: readonly { name: string; parameters?: Record<string, unknown> }[] | undefined,
  requestParameters: Record<string, unknown> | undefined,
): boolean {
  const own = outputs?.find((o) => o.name === name)?.parameters?.binary_data;
  if (typeof own === 'boolean') return own;
  return requestParameters?.binary_data_output === true;
}

/** The raw bytes of an output tensor for the binary extension (BOOL as one byte each, FP16 as raw halves: the mesh's own layout). */
export function tensorBytes(tensor: Tensor): Buffer {
  const wire = encodeTensor(tensor);
  return Buffer.from(wire.data.buffer, wire.data.byteOffset, wire.data.byteLength);
}

/** A response body with binary outputs: the JSON header, then each binary output's bytes in output order. */
export function binaryResponse(header: object, sections: readonly Buffer[]): { body: Buffer; headerLength: number } {
  const json = Buffer.from(JSON.stringify(header), 'utf8');
  return { body: Buffer.concat([json, ...sections]), headerLength: json.length };
}

/**
 * The request's deadline from KServe parameters: the mesh's `deadline_ms`, else Triton's `timeout` (microseconds,
 * rounded up to whole milliseconds), else undefined.
 */
export function deadlineFromParameters(parameters: Record<string, unknown> | undefined): number | undefined {
  const ms = parameters?.deadline_ms;
  if (ms !== undefined) {
    // The HTTP body schema checks this too; a gRPC request reaches here unchecked.
    if (typeof ms !== 'number' || !Number.isSafeInteger(ms) || ms < 1 || ms > 600_000) {
      throw new MeshError('MESH_BAD_REQUEST', 'parameters.deadline_ms must be a whole number of milliseconds from 1 to 600000', {
        details: { deadline_ms: ms as never },
      });
    }
    return ms;
  }
  const us = parameters?.timeout;
  if (us === undefined) return undefined;
  if (typeof us !== 'number' || !Number.isSafeInteger(us) || us <= 0 || us > 600_000_000) {
    throw new MeshError('MESH_BAD_REQUEST', 'parameters.timeout must be a positive whole number of microseconds up to 600 s', {
      details: { timeout: us as never },
    });
  }
  return Math.ceil(us / 1000);
}

/** Requests the mesh cannot serve as asked are refused, not half-served: sequence batching has no mesh counterpart. */
export function refuseUnsupported(parameters: Record<string, unknown> | undefined): void {
  const seq = parameters?.sequence_id;
  if (seq !== undefined && seq !== 0 && seq !== '') {
    throw new MeshError(
      'MESH_BAD_REQUEST',
      'sequence requests (parameters.sequence_id) are not supported: each request is routed on its own',
      {
        details: { parameter: 'sequence_id' },
      },
    );
  }
}

/** Triton's name of a data type in a model config (`TYPE_FP32`), from a KServe one (`FP32`). */
const configType = (kserve: string): string => `TYPE_${kserve}`;

/**
 * The model's configuration in Triton's JSON form: platform, inputs and outputs with their types and dims
 * (-1 for a free dimension). The mesh batches nothing itself, so `max_batch_size` is 0 and dims are the
 * model's full shapes.
 */
export function modelConfig(info: ModelInfo, datatypeOf: (dtype: string) => string): Record<string, unknown> {
  const tensors = (list: ModelInfo['inputs']) =>
    list.map((t) => ({
      name: t.name,
      data_type: configType(datatypeOf(t.dtype)),
      dims: t.shape.map((d) => (typeof d === 'number' && d >= 0 ? d : -1)),
    }));
  return {
    name: info.name,
    platform: 'onnxruntime_onnx',
    backend: 'onnxruntime',
    version_policy: { latest: { num_versions: 1 } },
    max_batch_size: 0,
    input: tensors(info.inputs),
    output: tensors(info.outputs),
    parameters: { price_micros: { string_value: String(info.priceMicros ?? 0) } },
  };
}

interface Duration {
  count: number;
  ns: number;
}

interface ModelCounters {
  version: string;
  lastInference: number;
  success: Duration;
  fail: Duration;
  queue: Duration;
  computeInfer: Duration;
}

/**
 * Per-model counters for the statistics extension, from the HTTP requests this router answered (leased requests
 * go from apps straight to agents and are not seen here). Queue and compute times are the answering agent's own.
 */
export class InferStats {
  private readonly models = new Map<string, ModelCounters>();

  private entry(model: string, version: string): ModelCounters {
    let c = this.models.get(model);
    if (!c) {
      c = {
        version,
        lastInference: 0,
        success: { count: 0, ns: 0 },
        fail: { count: 0, ns: 0 },
        queue: { count: 0, ns: 0 },
        computeInfer: { count: 0, ns: 0 },
      };
      this.models.set(model, c);
    }
    c.version = version;
    return c;
  }

  ok(model: string, version: string, totalMs: number, queueMs: number, execMs: number): void {
    const c = this.entry(model, version);
    c.lastInference = Date.now();
    add(c.success, totalMs);
    add(c.queue, queueMs);
    add(c.computeInfer, execMs);
  }

  failed(model: string, version: string, totalMs: number): void {
    const c = this.entry(model, version);
    c.lastInference = Date.now();
    add(c.fail, totalMs);
  }

  /** `{ model_stats: [...] }` for the named models (all known ones when `names` is undefined), in Triton's field names. */
  report(names: readonly { name: string; version: string }[]): { model_stats: unknown[] } {
    return {
      model_stats: names.map(({ name, version }) => {
        const c = this.models.get(name);
        const zero = { count: 0, ns: 0 };
        return {
          name,
          version: c?.version ?? version,
          last_inference: c?.lastInference ?? 0,
          inference_count: c?.success.count ?? 0,
          execution_count: c?.success.count ?? 0,
          inference_stats: {
            success: c?.success ?? zero,
            fail: c?.fail ?? zero,
            queue: c?.queue ?? zero,
            compute_input: zero,
            compute_infer: c?.computeInfer ?? zero,
            compute_output: zero,
          },
          batch_stats: [],
        };
      }),
    };
  }
}

function add(d: Duration, ms: number): void {
  d.count += 1;
  d.ns += Math.max(0, Math.round(ms * 1e6));
}

/** One statistics store per router, shared by its HTTP and gRPC fronts. */
const statsByRouter = new WeakMap<RouterHandle, InferStats>();
export function statsFor(router: RouterHandle): InferStats {
  let stats = statsByRouter.get(router);
  if (!stats) {
    stats = new InferStats();
    statsByRouter.set(router, stats);
  }
  return stats;
}

/** Server metadata, as `/v2` and ServerMetadata answer it. */
export function serverMetadata(): { name: string; version: string; extensions: string[] } {
  return { name: 'edge-mesh-router', version: '2', extensions: [...KSERVE_EXTENSIONS] };
}

/** Ready: connected to the broker with at least one live agent. */
export function serverReady(router: RouterHandle): boolean {
  return router.connected && router.agents().some((a) => a.up);
}

export interface FoundModel {
  info: ModelInfo;
  live: boolean;
  versions: string[];
}

/** Metadata for `name` from a live agent, else from any agent's last status. */
export function modelInfoOf(router: RouterHandle, name: string): FoundModel | undefined {
  const pipeline = router.pipelines?.info(name);
  if (pipeline) return { info: pipeline, live: router.pipelines.ready(name), versions: [pipeline.version] };
  const live = router.models().find((m) => m.name === name);
  const all = router
    .agents()
    .flatMap((a) => a.status.models ?? [])
    .filter((m) => m.name === name);
  const info = live ?? all[0];
  if (!info) return undefined;
  return { info, live: live !== undefined, versions: [...new Set(all.map((m) => m.version))] };
}

export const unknownModel = (name: string): MeshError =>
  new MeshError('MESH_UNKNOWN_MODEL', `no agent serves model ${name}`, { details: { model: name } });

/**
 * The model's metadata for a request naming it, and a version if the request has one. A version no agent serves is
 * unknown. The router does not pin a version when several are live (docs/routing.md, "The HTTP API"), so a
 * versioned request is served only while every live agent of the model runs that version.
 */
export function modelFor(router: RouterHandle, name: string, version?: string, forInfer = false): FoundModel {
  const found = modelInfoOf(router, name);
  if (!found) throw unknownModel(name);
  if (version === undefined) return found;
  if (!found.versions.includes(version)) {
    throw new MeshError('MESH_UNKNOWN_MODEL', `no agent serves version ${version} of model ${name}`, {
      details: { model: name, version, versions: found.versions },
    });
  }
  const liveVersions = new Set(
    router
      .agents()
      .filter((a) => a.up)
      .flatMap((a) => (a.status.models ?? []).filter((m) => m.name === name).map((m) => m.version)),
  );
  if (forInfer && (liveVersions.size !== 1 || !liveVersions.has(version))) {
    throw new MeshError(
      'MESH_NO_AGENT',
      `live agents serve versions ${[...liveVersions].join(', ') || 'none'} of model ${name}, not only ${version}`,
      {
        details: { model: name, version, live: [...liveVersions] },
      },
    );
  }
  const info =
    router
      .agents()
      .flatMap((a) => a.status.models ?? [])
      .find((m) => m.name === name && m.version === version) ?? found.info;
  return { ...found, info };
}

/** Throws unless a live agent serves the model (and, with a version, only that version). */
export function assertModelReady(router: RouterHandle, name: string, version?: string): void {
  const found = modelFor(router, name, version);
  if (!found.live) throw new MeshError('MESH_NO_AGENT', 'no live agent serves the model', { details: { model: name, ready: false } });
  if (version !== undefined) modelFor(router, name, version, true);
}

export interface TensorMetadata {
  name: string;
  datatype: string;
  shape: number[];
}

/** Model metadata in KServe's form: -1 for a free dimension. */
export function modelMetadata(
  router: RouterHandle,
  name: string,
  version?: string,
): { name: string; versions: string[]; platform: string; inputs: TensorMetadata[]; outputs: TensorMetadata[] } {
  const { info, versions } = modelFor(router, name, version);
  const tensors = (list: ModelInfo['inputs']) =>
    list.map((t) => ({
      name: t.name,
      datatype: kserveDatatypeOf(t.dtype),
      shape: t.shape.map((d) => (typeof d === 'number' && d >= 0 ? d : -1)),
    }));
  return { name: info.name, versions, platform: 'onnx', inputs: tensors(info.inputs), outputs: tensors(info.outputs) };
}

/**
 * The model an infer request names, checked before its tensors are read: an unknown model is MESH_UNKNOWN_MODEL
 * (MESH_NO_AGENT while no agent is known at all), a version is held to `modelFor`'s rule.
 */
export function inferTarget(router: RouterHandle, model: string, version?: string): FoundModel {
  const found = modelInfoOf(router, model);
  if (!found) {
    throw router.agents().length > 0
      ? unknownModel(model)
      : new MeshError('MESH_NO_AGENT', `no agent is known yet, so none serves model ${model}`, { details: { model } });
  }
  return version !== undefined ? modelFor(router, model, version, true) : found;
}

/** Every model some agent announced, with the first version seen, for the statistics of all models. */
export function servedModels(router: RouterHandle): { name: string; version: string }[] {
  const seen = new Map<string, string>();
  for (const a of router.agents()) for (const m of a.status.models ?? []) if (!seen.has(m.name)) seen.set(m.name, m.version);
  return [...seen].map(([name, version]) => ({ name, version }));
}

export interface IndexEntry {
  name: string;
  version: string;
  state: string;
  reason: string;
}

/** The repository index: every model an agent announced, READY while a live agent serves it. */
export function repositoryIndex(router: RouterHandle, readyOnly = false): IndexEntry[] {
  const entries = new Map<string, IndexEntry>();
  for (const a of router.agents()) {
    for (const m of a.status.models ?? []) {
      const key = `${m.name}\u0000${m.version}`;
      const ready = a.up;
      const prev = entries.get(key);
      if (prev?.state === 'READY') continue;
      entries.set(key, { name: m.name, version: m.version, state: ready ? 'READY' : 'UNAVAILABLE', reason: ready ? '' : 'no live agent' });
    }
  }
  for (const name of router.pipelines?.names() ?? []) {
    const ready = router.pipelines.ready(name);
    const version = router.pipelines.info(name)!.version;
    entries.set(`${name}\u0000${version}`, {
      name,
      version,
      state: ready ? 'READY' : 'UNAVAILABLE',
      reason: ready ? '' : 'a stage model has no live agent',
    });
  }
  const list = [...entries.values()].sort((x, y) => x.name.localeCompare(y.name) || x.version.localeCompare(y.version));
  return readyOnly ? list.filter((e) => e.state === 'READY') : list;
}
