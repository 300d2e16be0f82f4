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
 * Pure functions and a small counter store; the routes are in http.ts.
 */
import { type DType, decodeTensor, encodeTensor, MeshError, type ModelInfo, type Tensor } from '@edge-mesh/protocol';

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
 * Splits a binary-extension body: the JSON header (parsed) and the bytes after it. The header length must be a
 * whole number within the body; the header must be a JSON object.
 */
export function splitBinaryBody(body: Buffer, headerLength: string | string[] | undefined): object & BinaryCarrier {
  const raw = Array.isArray(headerLength) ? headerLength[0] : headerLength;
  const length = raw !== undefined && /^\d{1,12}$/.test(raw.trim()) ? Number(raw.trim()) : Number.NaN;
  if (!Number.isSafeInteger(length) || length > body.length) {
    throw new MeshError(
      'MESH_BAD_REQUEST',
      `Inference-Header-Content-Length ${JSON.stringify(raw)} is not a length within the ${body.length}-byte body`,
      {
        details: { headerLength: raw ?? null, bodyBytes: body.length },
      },
    );
  }
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
  if (typeof ms === 'number') return ms;
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
