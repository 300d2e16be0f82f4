/**
 * The router's KServe v2 gRPC front: `inference.GRPCInferenceService` over `router.infer()` (docs/routing.md,
 * "The gRPC API"), with Triton's ModelConfig, ModelStatistics and RepositoryIndex.
 *
 *   const grpc = await startRouterGrpc(router, { port: 8001 });
 *   // a Triton gRPC client: InferenceServerClient("127.0.0.1:8001").infer("kws", [...])
 *   await grpc.close(); // closes the server only; the router stays up
 *
 * The rules are the HTTP API's, taken from kserve.ts: the datatype mapping, the version rule, the deadline from
 * `parameters` (the mesh's `deadline_ms` or Triton's `timeout` in µs), sequence requests and BYTES refused, one
 * statistics store. Inputs come as `raw_input_contents` (one little-endian byte string per input, in input order:
 * what Triton's gRPC client sends, triton-inference-server/client src/python/library/tritonclient/grpc/_utils.py,
 * `_get_inference_request`) or as typed `contents`; outputs always go back as `raw_output_contents`. A gRPC deadline
 * bounds the mesh request. Errors carry a gRPC status (GRPC_STATUS_OF below), the MESH_* code first in the message
 * and in the `mesh-code` trailing metadata.
 *
 * The service is described by ../proto/kserve_v2.proto, loaded with @grpc/proto-loader.
 */
import { fileURLToPath } from 'node:url';
import type { HttpScope } from '@edge-mesh/protocol';
import {
  DEFAULT_MAX_MESSAGE_BYTES,
  decodeTensor,
  MeshError,
  type MeshErrorCode,
  type Tensor,
  tensorFromJson,
  toMeshError,
} from '@edge-mesh/protocol';
import * as grpc from '@grpc/grpc-js';
import * as protoLoader from '@grpc/proto-loader';
import type { RouterGrpcHandle, RouterGrpcOptions, RouterHandle, RouterInferResult } from './handle.ts';
import { addressCaller, createCredentialCheck } from './http-auth.ts';
import {
  assertModelReady,
  DTYPE_TO_KSERVE,
  deadlineFromParameters,
  inferTarget,
  KSERVE_TO_DTYPE,
  kserveDatatypeOf,
  modelConfig,
  modelFor,
  modelInfoOf,
  modelMetadata,
  refuseUnsupported,
  repositoryIndex,
  servedModels,
  serverMetadata,
  serverReady,
  statsFor,
  tensorBytes,
} from './kserve.ts';

/** Where the service description lives: router/proto/, beside src/ and dist/. */
export const KSERVE_PROTO_PATH = fileURLToPath(new URL('../proto/kserve_v2.proto', import.meta.url));

/**
 * How proto-loader turns messages into objects: field names as in the .proto, 64-bit integers as decimal strings
 * (no precision lost for INT64 / UINT64 contents), enums by name, defaults filled in, and the name of the set
 * member of each oneof (`parameter_choice`).
 */
export const KSERVE_PROTO_OPTIONS: protoLoader.Options = { keepCase: true, longs: String, enums: String, defaults: true, oneofs: true };

/** gRPC status for each MESH_* code; every code has one, so a new code cannot be left unmapped. */
export const GRPC_STATUS_OF: Record<MeshErrorCode, grpc.status> = {
  MESH_BAD_REQUEST: grpc.status.INVALID_ARGUMENT,
  MESH_BAD_TENSOR: grpc.status.INVALID_ARGUMENT,
  MESH_BAD_INPUT: grpc.status.INVALID_ARGUMENT,
  MESH_RECEIPT_INVALID: grpc.status.INVALID_ARGUMENT,
  MESH_VOUCHER_INVALID: grpc.status.INVALID_ARGUMENT,
  // gRPC answers its own message size limit with RESOURCE_EXHAUSTED too.
  MESH_TOO_LARGE: grpc.status.RESOURCE_EXHAUSTED,
  MESH_BUSY: grpc.status.RESOURCE_EXHAUSTED,
  MESH_RATE_LIMITED: grpc.status.RESOURCE_EXHAUSTED,
  MESH_UNKNOWN_MODEL: grpc.status.NOT_FOUND,
  MESH_NOT_FOUND: grpc.status.NOT_FOUND,
  MESH_NO_AGENT: grpc.status.UNAVAILABLE,
  MESH_NOT_CONNECTED: grpc.status.UNAVAILABLE,
  MESH_SHUTTING_DOWN: grpc.status.UNAVAILABLE,
  MESH_OVERLOADED: grpc.status.UNAVAILABLE,
  MESH_AGENT_LOST: grpc.status.UNAVAILABLE,
  MESH_CHAIN_UNREACHABLE: grpc.status.UNAVAILABLE,
  MESH_TLS: grpc.status.UNAVAILABLE,
  MESH_DEADLINE_EXCEEDED: grpc.status.DEADLINE_EXCEEDED,
  MESH_TIMEOUT: grpc.status.DEADLINE_EXCEEDED,
  MESH_CANCELLED: grpc.status.CANCELLED,
  MESH_UNAUTHORIZED: grpc.status.UNAUTHENTICATED,
  MESH_FORBIDDEN: grpc.status.PERMISSION_DENIED,
  MESH_PAYMENT_REQUIRED: grpc.status.FAILED_PRECONDITION,
  MESH_CREDIT_EXCEEDED: grpc.status.FAILED_PRECONDITION,
  MESH_CHAIN_REVERTED: grpc.status.FAILED_PRECONDITION,
  MESH_INFERENCE_FAILED: grpc.status.INTERNAL,
  MESH_MODEL_INTEGRITY: grpc.status.INTERNAL,
  MESH_CONFIG: grpc.status.INTERNAL,
  MESH_INTERNAL: grpc.status.INTERNAL,
};

/** Trailing metadata key that carries the MESH_* code of a failed call. */
export const MESH_CODE_METADATA = 'mesh-code';

/** Loads the service description (the same one a test's or an app's client can load). */
export function loadKServeProto(): grpc.GrpcObject {
  return grpc.loadPackageDefinition(protoLoader.loadSync(KSERVE_PROTO_PATH, KSERVE_PROTO_OPTIONS));
}

/** A gRPC error object for anything thrown: the code's status, "MESH_X: message", `mesh-code` in the trailers. */
export function grpcErrorOf(err: unknown): Partial<grpc.StatusObject> {
  const mesh = toMeshError(err);
  const metadata = new grpc.Metadata();
  metadata.set(MESH_CODE_METADATA, mesh.code);
  return { code: GRPC_STATUS_OF[mesh.code], details: `${mesh.code}: ${mesh.message}`, metadata };
}

// ---- message shapes as proto-loader gives and takes them (KSERVE_PROTO_OPTIONS) ----

type Long = string;

export interface InferParameterMessage {
  parameter_choice?: 'bool_param' | 'int64_param' | 'string_param' | 'double_param' | 'uint64_param';
  bool_param?: boolean;
  int64_param?: Long | number;
  string_param?: string;
  double_param?: number;
  uint64_param?: Long | number;
}

export interface TensorContentsMessage {
  bool_contents: boolean[];
  int_contents: number[];
  int64_contents: Long[];
  uint_contents: number[];
  uint64_contents: Long[];
  fp32_contents: number[];
  fp64_contents: number[];
  bytes_contents: Buffer[];
}

interface InferInputMessage {
  name: string;
  datatype: string;
  shape: Long[];
  parameters: Record<string, InferParameterMessage>;
  contents: TensorContentsMessage | null;
}

interface InferRequestMessage {
  model_name: string;
  model_version: string;
  id: string;
  parameters: Record<string, InferParameterMessage>;
  inputs: InferInputMessage[];
  outputs: { name: string; parameters: Record<string, InferParameterMessage> }[];
  raw_input_contents: Buffer[];
}

/** A KServe parameter map as plain values, 64-bit integers as numbers where they are safe (else kept as strings). */
export function parametersOf(map: Record<string, InferParameterMessage> | undefined): Record<string, unknown> {
  const out: Record<string, unknown> = Object.create(null);
  for (const [key, p] of Object.entries(map ?? {})) {
    const choice = p.parameter_choice;
    if (choice === undefined) continue;
    const value = p[choice];
    if (choice === 'int64_param' || choice === 'uint64_param') {
      const n = Number(value);
      out[key] = Number.isSafeInteger(n) ? n : String(value);
    } else {
      out[key] = value;
    }
  }
  return out;
}

const MAX_TENSORS = 64;
const MAX_NAME = 128;
const MAX_DIMS = 8;

/** A shape from int64 strings: whole, non-negative, safe numbers, at most MAX_DIMS of them. */
function shapeOf(name: string, shape: readonly (Long | number)[]): number[] {
  if (shape.length > MAX_DIMS)
    throw new MeshError('MESH_BAD_TENSOR', `input ${name}: more than ${MAX_DIMS} dimensions`, { details: { input: name } });
  return shape.map((d) => {
    const n = Number(d);
    if (!Number.isSafeInteger(n) || n < 0) {
      throw new MeshError('MESH_BAD_TENSOR', `input ${name}: dimension ${String(d)} is not a non-negative integer`, {
        details: { input: name },
      });
    }
    return n;
  });
}

const INT_RANGE = {
  int8: [-128, 127],
  int16: [-32768, 32767],
  int32: [-2147483648, 2147483647],
  uint8: [0, 255],
  uint16: [0, 65535],
  uint32: [0, 4294967295],
} as const;

/** The typed-contents list each datatype reads (FP16 has none in the protocol: raw bytes only). */
const CONTENTS_FIELD: Record<string, keyof TensorContentsMessage> = {
  BOOL: 'bool_contents',
  INT8: 'int_contents',
  INT16: 'int_contents',
  INT32: 'int_contents',
  INT64: 'int64_contents',
  UINT8: 'uint_contents',
  UINT16: 'uint_contents',
  UINT32: 'uint_contents',
  UINT64: 'uint64_contents',
  FP32: 'fp32_contents',
  FP64: 'fp64_contents',
};

/** A tensor from typed `contents`: only the datatype's own list may hold values, integers must fit their type. */
function fromContents(name: string, datatype: string, shape: number[], contents: TensorContentsMessage): Tensor {
  const field = CONTENTS_FIELD[datatype];
  if (field === undefined) {
    throw new MeshError('MESH_BAD_REQUEST', `input ${name}: ${datatype} data can only travel in raw_input_contents`, {
      details: { input: name },
    });
  }
  for (const [other, list] of Object.entries(contents)) {
    if (other !== field && Array.isArray(list) && list.length > 0) {
      throw new MeshError('MESH_BAD_TENSOR', `input ${name}: a ${datatype} tensor carries its values in ${field}, not ${other}`, {
        details: { input: name },
      });
    }
  }
  const dtype = KSERVE_TO_DTYPE[datatype as keyof typeof KSERVE_TO_DTYPE];
  const values = contents[field] as unknown[];
  if (dtype in INT_RANGE) {
    const [lo, hi] = INT_RANGE[dtype as keyof typeof INT_RANGE];
    for (const v of values as number[]) {
      if (!Number.isInteger(v) || v < lo || v > hi) {
        throw new MeshError('MESH_BAD_TENSOR', `input ${name}: ${v} is out of range for ${datatype}`, { details: { input: name } });
      }
    }
  }
  try {
    return tensorFromJson(name, dtype, shape, dtype === 'bool' ? (values as boolean[]).map((b) => (b ? 1 : 0)) : values);
  } catch (err) {
    throw toMeshError(err, 'MESH_BAD_TENSOR');
  }
}

/** Whether a typed-contents message holds any value at all. */
function hasContents(contents: TensorContentsMessage | null): boolean {
  return contents !== null && Object.values(contents).some((list) => Array.isArray(list) && list.length > 0);
}

/**
 * The request's input tensors. Raw and typed contents do not mix: with `raw_input_contents` there must be exactly one
 * byte string per input and no typed contents (the protocol's rule); each byte string must be exactly shape × item
 * size bytes (decodeTensor checks, and copies into an aligned array).
 */
export function inputsOf(request: Pick<InferRequestMessage, 'inputs' | 'raw_input_contents'>): Record<string, Tensor> {
  const { inputs, raw_input_contents: raw } = request;
  if (inputs.length === 0 || inputs.length > MAX_TENSORS) {
    throw new MeshError('MESH_BAD_REQUEST', `a request needs 1 to ${MAX_TENSORS} inputs, got ${inputs.length}`);
  }
  const useRaw = raw.length > 0;
  if (useRaw && raw.length !== inputs.length) {
    throw new MeshError(
      'MESH_BAD_REQUEST',
      `raw_input_contents has ${raw.length} entries for ${inputs.length} inputs: one per input, in input order`,
      {
        details: { raw: raw.length, inputs: inputs.length },
      },
    );
  }
  const out: Record<string, Tensor> = Object.create(null);
  inputs.forEach((input, i) => {
    const { name, datatype } = input;
    if (typeof name !== 'string' || name.length === 0 || name.length > MAX_NAME) {
      throw new MeshError('MESH_BAD_REQUEST', `input ${i}: a name of 1 to ${MAX_NAME} characters is needed`);
    }
    if (Object.hasOwn(out, name)) throw new MeshError('MESH_BAD_REQUEST', `input ${name} appears twice`, { details: { input: name } });
    if (!Object.hasOwn(KSERVE_TO_DTYPE, datatype)) {
      throw new MeshError(
        'MESH_BAD_REQUEST',
        `input ${name}: datatype ${JSON.stringify(datatype)} is not one the mesh carries (BYTES is not)`,
        {
          details: { input: name, datatype },
        },
      );
    }
    const dtype = KSERVE_TO_DTYPE[datatype as keyof typeof KSERVE_TO_DTYPE];
    const shape = shapeOf(name, input.shape);
    if (useRaw) {
      if (hasContents(input.contents)) {
        throw new MeshError('MESH_BAD_REQUEST', `input ${name}: typed contents and raw_input_contents cannot both be given`, {
          details: { input: name },
        });
      }
      out[name] = decodeTensor(name, { dtype, shape, data: raw[i]! });
    } else {
      if (input.contents === null) {
        throw new MeshError('MESH_BAD_REQUEST', `input ${name} has neither contents nor raw_input_contents`, { details: { input: name } });
      }
      out[name] = fromContents(name, datatype, shape, input.contents);
    }
  });
  return out;
}

/** The mesh deadline: the smaller of the request's parameters and what is left of the gRPC deadline, if either is set. */
export function meshDeadlineMs(parameters: Record<string, unknown>, grpcDeadline: grpc.Deadline, now = Date.now()): number | undefined {
  const fromParameters = deadlineFromParameters(parameters);
  const at = grpcDeadline instanceof Date ? grpcDeadline.getTime() : grpcDeadline;
  if (!Number.isFinite(at)) return fromParameters;
  const left = Math.floor(at - now);
  if (left <= 0) throw new MeshError('MESH_DEADLINE_EXCEEDED', 'the gRPC deadline passed before the request was routed');
  const bounded = Math.min(left, 600_000);
  return fromParameters === undefined ? bounded : Math.min(fromParameters, bounded);
}

const param = {
  string: (v: string) => ({ string_param: v }),
  int: (v: number) => ({ int64_param: v }),
  bool: (v: boolean) => ({ bool_param: v }),
  double: (v: number) => ({ double_param: v }),
};

/** Starts the gRPC service for `router`; resolves once it listens. */
export async function startRouterGrpc(router: RouterHandle, options: RouterGrpcOptions = {}): Promise<RouterGrpcHandle> {
  const { port = 0, host = '127.0.0.1', maxMessageBytes = DEFAULT_MAX_MESSAGE_BYTES + 64 * 1024 } = options;
  const stats = statsFor(router);
  const proto = loadKServeProto() as unknown as { inference: { GRPCInferenceService: { service: grpc.ServiceDefinition } } };
  const server = new grpc.Server({ 'grpc.max_receive_message_length': maxMessageBytes });
  const check = options.auth ? createCredentialCheck(router.id, options.auth) : undefined;
  /** The address of a call's peer ("ipv4:1.2.3.4:5", "ipv6:[::1]:5"), for the limit on failed credentials. */
  const peerAddress = (peer: string) =>
    peer
      .replace(/^ipv[46]:/, '')
      .replace(/:\d+$/, '')
      .replace(/^\[|\]$/g, '');

  // Every method: the credential check for its scope, then the handler's value, or its error as a coded gRPC status;
  // the server keeps serving either way.
  // `caller` names who made the call, for the concurrency limit's shares: the credential's id, or the address when
  // the router takes no credentials.
  const unary =
    <Req, Res>(
      fn: (request: Req, call: grpc.ServerUnaryCall<Req, Res>, caller: string) => Res | Promise<Res>,
      scope: HttpScope | 'open' = 'infer',
    ) =>
    (call: grpc.ServerUnaryCall<Req, Res>, callback: grpc.sendUnaryData<Res>) => {
      Promise.resolve()
        .then(() => {
          const address = peerAddress(call.getPeer());
          let caller = addressCaller(address);
          if (check && scope !== 'open') {
            const [authorization] = call.metadata.get('authorization');
            caller = check(typeof authorization === 'string' ? authorization : undefined, address, scope, Date.now()).id;
          }
          return fn(call.request, call, caller);
        })
        .then(
          (res) => callback(null, res),
          (err: unknown) => callback(grpcErrorOf(err)),
        );
    };
  type Named = { name: string; version: string };
  const versionOf = (v: string) => (v === '' ? undefined : v);
  const needName = (name: string) => {
    if (name === '') throw new MeshError('MESH_BAD_REQUEST', 'a model name is needed');
    return name;
  };

  const infer = async (request: InferRequestMessage, call: grpc.ServerUnaryCall<InferRequestMessage, unknown>, caller: string) => {
    const model = needName(request.model_name);
    const version = versionOf(request.model_version);
    inferTarget(router, model, version);
    if (request.id.length > 256) throw new MeshError('MESH_BAD_REQUEST', 'id is longer than 256 characters');
    const parameters = parametersOf(request.parameters);
    refuseUnsupported(parameters);
    if (request.outputs.length > MAX_TENSORS) throw new MeshError('MESH_BAD_REQUEST', `at most ${MAX_TENSORS} outputs may be named`);
    const inputs = inputsOf(request);
    const deadlineMs = meshDeadlineMs(parameters, call.getDeadline());
    const started = performance.now();
    const served = modelInfoOf(router, model)?.info.version ?? '';
    let result: RouterInferResult;
    try {
      result = await router.infer(model, inputs, { ...(deadlineMs !== undefined ? { deadlineMs } : {}), limited: true, caller });
    } catch (err) {
      stats.failed(model, served, performance.now() - started);
      throw err;
    }
    stats.ok(model, served, performance.now() - started, result.timings.queueMs, result.timings.execMs);
    const wanted = request.outputs.map((o) => o.name);
    const missing = wanted.filter((n) => !Object.hasOwn(result.outputs, n));
    if (missing.length > 0) {
      throw new MeshError('MESH_BAD_INPUT', `model ${model} has no output ${missing.join(', ')}`, { details: { outputs: missing } });
    }
    const names = wanted.length > 0 ? wanted : Object.keys(result.outputs);
    const tensors = names.map((n) => [n, result.outputs[n]!] as const);
    return {
      model_name: model,
      model_version: modelInfoOf(router, model)?.info.version ?? '',
      id: request.id !== '' ? request.id : result.requestId,
      parameters: {
        agent: param.string(result.agentId),
        attempts: param.int(result.attempts),
        hedged: param.bool(result.hedged),
        total_ms: param.double(result.timings.totalMs),
      },
      outputs: tensors.map(([name, t]) => ({ name, datatype: DTYPE_TO_KSERVE[t.dtype], shape: [...t.shape] })),
      raw_output_contents: tensors.map(([, t]) => tensorBytes(t)),
    };
  };

  server.addService(proto.inference.GRPCInferenceService.service, {
    ServerLive: unary(() => ({ live: true }), 'open'),
    ServerReady: unary(() => ({ ready: serverReady(router) }), 'open'),
    ServerMetadata: unary(() => serverMetadata()),
    // Unknown model or version: NOT_FOUND, as for metadata; known but not served by a live agent: ready false.
    ModelReady: unary((request: Named) => {
      const name = needName(request.name);
      const version = versionOf(request.version);
      modelFor(router, name, version);
      try {
        assertModelReady(router, name, version);
        return { ready: true };
      } catch (err) {
        if (err instanceof MeshError && err.code === 'MESH_NO_AGENT') return { ready: false };
        throw err;
      }
    }),
    ModelMetadata: unary((request: Named) => modelMetadata(router, needName(request.name), versionOf(request.version))),
    ModelConfig: unary((request: Named) => ({
      config: modelConfig(modelFor(router, needName(request.name), versionOf(request.version)).info, kserveDatatypeOf),
    })),
    ModelStatistics: unary((request: Named) => {
      if (request.name === '') return stats.report(servedModels(router));
      const { info } = modelFor(router, request.name, versionOf(request.version));
      return stats.report([{ name: info.name, version: info.version }]);
    }, 'read'),
    // One repository: repository_name is not checked.
    RepositoryIndex: unary(
      (request: { repository_name: string; ready: boolean }) => ({ models: repositoryIndex(router, request.ready) }),
      'read',
    ),
    ModelInfer: unary(infer),
  });

  const hostPart = host.includes(':') ? `[${host}]` : host;
  const boundPort = await new Promise<number>((resolve, reject) => {
    const { tls } = options;
    const credentials = tls
      ? grpc.ServerCredentials.createSsl(
          tls.ca !== undefined ? Buffer.from(tls.ca) : null,
          [{ private_key: Buffer.from(tls.key), cert_chain: Buffer.from(tls.cert) }],
          tls.requireClientCert === true,
        )
      : grpc.ServerCredentials.createInsecure();
    server.bindAsync(`${hostPart}:${port}`, credentials, (err, p) => {
      if (err) reject(new MeshError('MESH_CONFIG', `cannot listen for gRPC on ${hostPart}:${port}: ${err.message}`, { cause: err }));
      else resolve(p);
    });
  });
  let closed = false;
  return {
    port: boundPort,
    address: `${hostPart}:${boundPort}`,
    async close() {
      if (closed) return;
      closed = true;
      // Calls in flight get a moment to finish; then the rest are cut.
      await new Promise<void>((resolve) => {
        const force = setTimeout(() => {
          server.forceShutdown();
          resolve();
        }, 1_000);
        server.tryShutdown(() => {
          clearTimeout(force);
          resolve();
        });
      });
    },
  };
}
