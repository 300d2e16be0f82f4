/**
 * The router's HTTP front: the Open Inference Protocol (KServe v2) JSON API over `router.infer()`,
 * operator endpoints and Prometheus metrics.
 *
 *   const http = await startRouterHttp(router, { port: 8080 });
 *   // POST http://127.0.0.1:8080/v2/models/kws/infer
 *   //   { "inputs": [{ "name": "onnx::Flatten_0", "shape": [1,25,96], "datatype": "FP32", "data": [...] }] }
 *   await http.close(); // closes the server only; the router stays up
 *
 * Every error answers one body shape, `{ error, code, details? }`, with the code's httpStatus (./http-errors.ts,
 * docs/errors.md).
 */

import net from 'node:net';
import { Transform } from 'node:stream';
import { PROMTOOL_REJECTED_DEFAULT_METRICS } from '@edge-mesh/client';
import {
  DEFAULT_MAX_MESSAGE_BYTES,
  type DType,
  MeshError,
  type ModelInfo,
  type Tensor,
  tensorFromJson,
  tensorToJson,
  toMeshError,
} from '@edge-mesh/protocol';
import swagger from '@fastify/swagger';
import Fastify, { type FastifyInstance, type FastifyReply, type FastifyRequest } from 'fastify';
import { Counter, collectDefaultMetrics, Gauge, Histogram, Registry as PromRegistry } from 'prom-client';
import type { ConcurrencySnapshot } from './concurrency.ts';
import type { RouterHandle, RouterHttpHandle, RouterHttpOptions, RouterInferResult } from './handle.ts';
import { callerOf, installHttpAuth } from './http-auth.ts';
import { ANY_ERROR, ERROR_BODY_SCHEMA, errorResponse, installErrorHandlers, SMALL_BODY_LIMIT } from './http-errors.ts';
import {
  assertModelReady,
  BINARY_BODY_TYPE,
  BINARY_SECTION,
  type BinaryCarrier,
  binaryInputs,
  binaryResponse,
  DTYPE_TO_KSERVE,
  deadlineFromParameters,
  HEADER_LENGTH,
  inferTarget,
  KSERVE_TO_DTYPE,
  type KServeDatatype,
  kserveDatatypeOf,
  modelConfig,
  modelFor as modelForIn,
  modelInfoOf,
  modelMetadata,
  ONNX_TYPE_TO_DTYPE,
  refuseUnsupported,
  repositoryIndex,
  servedModels as servedModelsOf,
  serverMetadata,
  serverReady,
  splitBinaryBody,
  statsFor,
  tensorBytes,
  wantsBinary,
} from './kserve.ts';
import { registerRelayRoutes } from './relay.ts';

/** Node's process.arch values: the CPU part of a hardware class an agent may claim (estimates.ts hardwareClassOf). */
const ARCHES = new Set(['arm', 'arm64', 'ia32', 'loong64', 'mips', 'mipsel', 'ppc', 'ppc64', 'riscv64', 's390', 's390x', 'x64', 'unknown']);

/**
 * A hardware class as a metric label: the agent's status names its arch, so an agent could invent a new class per
 * status; anything outside the fixed set counts as `other`.
 */
export function hardwareLabel(hardwareClass: string | undefined): string {
  if (hardwareClass === undefined) return 'none';
  if (hardwareClass === 'gpu-trt' || hardwareClass === 'gpu-cuda') return hardwareClass;
  if (hardwareClass.startsWith('cpu-') && ARCHES.has(hardwareClass.slice(4))) return hardwareClass;
  return 'other';
}

import { registerSettlementRoutes } from './settlements.ts';

// The datatype mapping moved to kserve.ts (shared with grpc.ts); exported from here as before.
export { KSERVE_TO_DTYPE, type KServeDatatype, kserveDatatypeOf };

// IEEE half <-> float, for FP16 carried as raw 16-bit patterns in the mesh.
const f32 = new Float32Array(1);
const u32 = new Uint32Array(f32.buffer);
function floatToHalf(value: number): number {
  f32[0] = value;
  const x = u32[0]!;
  const sign = (x >>> 16) & 0x8000;
  const exp = (x >>> 23) & 0xff;
  let mant = x & 0x7fffff;
  if (exp === 0xff) return sign | 0x7c00 | (mant ? 0x200 : 0);
  const e = exp - 127 + 15;
  if (e >= 0x1f) return sign | 0x7c00;
  if (e <= 0) {
    if (e < -10) return sign;
    mant |= 0x800000;
    const shift = 14 - e;
    let half = mant >>> shift;
    if ((mant >>> (shift - 1)) & 1 && (mant & ((1 << (shift - 1)) - 1) || half & 1)) half++;
    return sign | half;
  }
  let half = sign | (e << 10) | (mant >>> 13);
  if (mant & 0x1000 && (mant & 0xfff || half & 1)) half++;
  return half;
}
function halfToFloat(h: number): number {
  const sign = h & 0x8000 ? -1 : 1;
  const exp = (h >>> 10) & 0x1f;
  const mant = h & 0x3ff;
  if (exp === 0) return sign * mant * 2 ** -24;
  if (exp === 0x1f) return mant ? Number.NaN : sign * Number.POSITIVE_INFINITY;
  return sign * (1 + mant / 1024) * 2 ** (exp - 15);
}

interface KServeTensor {
  name: string;
  shape: number[];
  datatype: KServeDatatype;
  /** Absent when `parameters.binary_data_size` says the bytes follow the JSON header (kserve.ts). */
  data?: unknown[];
  parameters?: Record<string, unknown>;
}

interface InferBody extends BinaryCarrier {
  id?: string;
  inputs: KServeTensor[];
  outputs?: { name: string; parameters?: Record<string, unknown> }[];
  parameters?: { deadline_ms?: number } & Record<string, unknown>;
}

const inferBodySchema = {
  type: 'object',
  required: ['inputs'],
  properties: {
    id: { type: 'string', maxLength: 256 },
    parameters: { type: 'object', properties: { deadline_ms: { type: 'integer', minimum: 1, maximum: 600_000 } } },
    inputs: {
      type: 'array',
      minItems: 1,
      maxItems: 64,
      items: {
        type: 'object',
        required: ['name', 'shape', 'datatype'],
        properties: {
          name: { type: 'string', minLength: 1, maxLength: 128 },
          shape: { type: 'array', maxItems: 8, items: { type: 'integer', minimum: 0 } },
          datatype: { type: 'string', enum: Object.keys(KSERVE_TO_DTYPE) },
          data: { type: 'array' },
          parameters: { type: 'object' },
        },
      },
    },
    outputs: {
      type: 'array',
      maxItems: 64,
      items: {
        type: 'object',
        required: ['name'],
        properties: { name: { type: 'string', maxLength: 128 }, parameters: { type: 'object' } },
      },
    },
  },
} as const;

const TENSOR_METADATA_SCHEMA = {
  type: 'object',
  properties: { name: { type: 'string' }, datatype: { type: 'string' }, shape: { type: 'array', items: { type: 'integer' } } },
} as const;

/** The 200 body of an infer request answered as JSON (a binary answer carries the same object as its header). */
const INFER_RESPONSE_SCHEMA = {
  type: 'object',
  properties: {
    model_name: { type: 'string' },
    model_version: { type: 'string' },
    id: { type: 'string' },
    parameters: {
      type: 'object',
      properties: {
        agent: { type: 'string' },
        attempts: { type: 'integer' },
        hedged: { type: 'boolean' },
        total_ms: { type: 'number' },
        stages: { type: 'string' },
      },
    },
    outputs: {
      type: 'array',
      items: {
        type: 'object',
        properties: {
          name: { type: 'string' },
          datatype: { type: 'string' },
          shape: { type: 'array', items: { type: 'integer' } },
          data: { type: 'array', items: {} },
          parameters: { type: 'object', properties: { binary_data_size: { type: 'integer' } } },
        },
      },
    },
  },
} as const;

function fromKServe(input: KServeTensor): Tensor {
  const dtype = KSERVE_TO_DTYPE[input.datatype];
  if (input.data === undefined) {
    throw new MeshError('MESH_BAD_REQUEST', `input ${input.name} has neither data nor parameters.binary_data_size`, {
      details: { input: input.name },
    });
  }
  if (dtype === 'float16') {
    const values = (input.data as unknown[]).flat(Infinity).map((v) => {
      if (typeof v !== 'number') throw new MeshError('MESH_BAD_TENSOR', `input ${input.name}: FP16 values must be numbers`);
      // 65504 is FP16's largest finite value; past it (and for 1e400, which JSON.parse makes Infinity) the half is infinite.
      if (!Number.isFinite(v) || Math.abs(v) > 65520)
        throw new MeshError('MESH_BAD_TENSOR', `input ${input.name}: ${String(v)} is out of range for FP16`);
      return floatToHalf(v);
    });
    return tensorFromJson(input.name, dtype, input.shape, values);
  }
  try {
    return tensorFromJson(input.name, dtype, input.shape, input.data);
  } catch (err) {
    // BigInt(1.5) and friends throw RangeError / SyntaxError: a bad tensor all the same.
    throw toMeshError(err, 'MESH_BAD_TENSOR');
  }
}

function toKServe(
  name: string,
  tensor: Tensor,
): { name: string; shape: number[]; datatype: KServeDatatype; data: (number | string | boolean)[] } {
  const json = tensorToJson(tensor);
  let data: (number | string | boolean)[] = json.data;
  if (tensor.dtype === 'bool') data = json.data.map((v) => v !== 0);
  else if (tensor.dtype === 'float16') data = json.data.map((v) => halfToFloat(Number(v)));
  return { name, shape: json.shape, datatype: DTYPE_TO_KSERVE[tensor.dtype], data };
}

/**
 * JSON text one tensor element may take in a KServe body: a float64 printed in full ("-1.2345678901234567e-308")
 * is 24 characters, plus its comma; nested arrays add brackets. 32 bytes covers every datatype.
 */
export const JSON_BYTES_PER_ELEMENT = 32;
/** Room for the body's keys, names, parameters and whitespace on top of the tensors. */
export const BODY_MARGIN_BYTES = 64 * 1024;

/** Bytes per element of each mesh dtype, for the bound on a symbolic dimension. */
const DTYPE_BYTES: Record<DType, number> = {
  bool: 1,
  uint8: 1,
  int8: 1,
  uint16: 2,
  int16: 2,
  float16: 2,
  uint32: 4,
  int32: 4,
  float32: 4,
  uint64: 8,
  int64: 8,
  float64: 8,
};

/**
 * The largest infer body a model can need (docs/routing.md, "Request bodies"): its inputs' element counts from the
 * agent's status, JSON_BYTES_PER_ELEMENT each, plus BODY_MARGIN_BYTES, capped by `bodyLimit`. An input with a
 * symbolic or free dimension is bounded by what the agent accepts at all: a message of DEFAULT_MAX_MESSAGE_BYTES,
 * so at most that many bytes of its dtype. An unknown model gets only the margin, since its request is refused anyway.
 */
export function modelBodyLimit(info: ModelInfo | undefined, bodyLimit: number): number {
  if (info === undefined) return Math.min(bodyLimit, BODY_MARGIN_BYTES);
  let elements = 0;
  for (const input of info.inputs) {
    let n = 1;
    let free = false;
    for (const d of input.shape) {
      if (typeof d === 'number' && Number.isInteger(d) && d >= 0) n *= d;
      else free = true;
    }
    const dtype = (Object.hasOwn(DTYPE_TO_KSERVE, input.dtype) ? input.dtype : ONNX_TYPE_TO_DTYPE[input.dtype]) as DType | undefined;
    const maxElements = Math.floor(DEFAULT_MAX_MESSAGE_BYTES / (dtype ? DTYPE_BYTES[dtype] : 1));
    elements += free ? maxElements : Math.min(n, maxElements);
  }
  return Math.min(bodyLimit, elements * JSON_BYTES_PER_ELEMENT + BODY_MARGIN_BYTES);
}

/** A stream that passes `payload` on and fails with MESH_TOO_LARGE as soon as more than `limit` bytes went through. */
function cappedBody(payload: NodeJS.ReadableStream, limit: number, model: string): Transform {
  let seen = 0;
  const capped = new Transform({
    transform(chunk: Buffer, _encoding, callback) {
      seen += chunk.length;
      if (seen > limit) {
        callback(tooLarge(limit, model));
        return;
      }
      callback(null, chunk);
    },
  });
  payload.on('error', (err) => capped.destroy(err));
  payload.pipe(capped);
  return capped;
}

function tooLarge(limit: number, model: string): MeshError {
  return new MeshError('MESH_TOO_LARGE', `the body is over the ${limit}-byte limit for model ${model}`, {
    details: { limitBytes: limit, model },
  });
}

/** How many model names `edge_mesh_model_live_agents` remembers (docs/operations.md, "Metrics"). */
const MAX_REMEMBERED_MODELS = 256;

/** Starts the HTTP API for `router`; resolves once it listens. */
export async function startRouterHttp(router: RouterHandle, options: RouterHttpOptions = {}): Promise<RouterHttpHandle> {
  const { port = 0, host = '127.0.0.1', defaultDeadlineMs, bodyLimit = 64 * 1024 * 1024, processMetrics = true } = options;

  const metrics = new PromRegistry();
  if (processMetrics) {
    collectDefaultMetrics({ register: metrics });
    for (const name of PROMTOOL_REJECTED_DEFAULT_METRICS) metrics.removeSingleMetric(name);
  }
  const buckets = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10];
  // Labels are bounded: models the fleet serves (others collapse to _unknown), hardware classes from a fixed set
  // (hardwareLabel below), MESH_* codes. No agent id: the series count must not grow with the fleet.
  const requestSeconds = new Histogram({
    name: 'edge_mesh_request_duration_seconds',
    help: 'Requests the router forwarded (HTTP, gRPC and library infer), from start to answer or failure, by model and the hardware class that answered ("none" on failure)',
    labelNames: ['model', 'hardware_class'] as const,
    buckets,
    registers: [metrics],
  });
  const routedTotal = new Counter({
    name: 'edge_mesh_routed_requests_total',
    help: 'Routed traffic by model, hardware class, way (forward: the router sent it; lease: a route lease granted to an SDK client, which then sends to agents itself) and outcome (ok or the MESH_* code)',
    labelNames: ['model', 'hardware_class', 'via', 'outcome'] as const,
    registers: [metrics],
  });
  const attemptSeconds = new Histogram({
    name: 'edge_mesh_attempt_duration_seconds',
    help: 'Latency of each attempt the router sent to an agent (hedges and retries included), by model, hardware class and outcome',
    labelNames: ['model', 'hardware_class', 'outcome'] as const,
    buckets,
    registers: [metrics],
  });
  const requestsTotal = new Counter({
    name: 'edge_mesh_http_infer_requests_total',
    help: 'HTTP infer requests received, by model',
    labelNames: ['model'] as const,
    registers: [metrics],
  });
  const errorsTotal = new Counter({
    name: 'edge_mesh_request_errors_total',
    help: 'Failed HTTP requests by model and MESH_* code',
    labelNames: ['model', 'code'] as const,
    registers: [metrics],
  });
  // The adaptive concurrency limit (concurrency.ts), read when scraped; absent when the router runs without it.
  if (router.concurrency()) {
    const concurrencyGauge = (name: string, help: string, read: (c: ConcurrencySnapshot) => number) =>
      new Gauge({
        name,
        help,
        registers: [metrics],
        collect() {
          const c = router.concurrency();
          if (c) this.set(read(c));
        },
      });
    concurrencyGauge(
      'edge_mesh_router_concurrency_limit',
      'Adaptive concurrency limit on forwarded HTTP and gRPC requests',
      (c) => c.limit,
    );
    concurrencyGauge(
      'edge_mesh_router_concurrency_outstanding',
      'Forwarded HTTP and gRPC requests in flight under the limit',
      (c) => c.outstanding,
    );
    concurrencyGauge('edge_mesh_router_concurrency_min_rtt_seconds', "The limit's latency baseline (minRTT), seconds", (c) =>
      Number.isNaN(c.minRttMs) ? 0 : c.minRttMs / 1000,
    );
    new Counter({
      name: 'edge_mesh_router_concurrency_refused_total',
      help: 'Forwarded HTTP and gRPC requests refused for the adaptive concurrency limit (MESH_OVERLOADED)',
      registers: [metrics],
      collect() {
        const c = router.concurrency();
        if (!c) return;
        this.reset();
        this.inc(c.refused);
      },
    });
  }
  // Models stay at 0 once their last agent has gone (a clean shutdown clears its retained status, and the model with
  // it), so "no live agent for a model" is a plain comparison in an alert rule
  // (packaging/prometheus/edge-mesh-rules.yml) rather than an absent() per model name. Agents name the models: the
  // remembered set is capped so agents announcing made-up names cannot grow the series count without bound.
  const seenModels = new Set<string>();
  new Gauge({
    name: 'edge_mesh_model_live_agents',
    help: 'Live agents serving each model, for every model an agent announced since the router started (0 when none is live now)',
    labelNames: ['model'] as const,
    registers: [metrics],
    collect() {
      this.reset();
      const live = new Map<string, number>();
      for (const a of router.agents()) {
        const up = a.up && a.status.state === 'online';
        for (const m of a.status.models ?? []) {
          if (seenModels.size < MAX_REMEMBERED_MODELS) seenModels.add(m.name);
          if (up) live.set(m.name, (live.get(m.name) ?? 0) + 1);
        }
      }
      for (const model of seenModels) this.set({ model }, live.get(model) ?? 0);
    },
  });
  const hardwareOf = (agentId: string | undefined) =>
    agentId === undefined ? 'none' : hardwareLabel(router.registry.agents.get(agentId)?.hardwareClass);
  const unsubscribe = router.onAttempt((a) => {
    attemptSeconds.observe(
      { model: modelLabel(a.model), hardware_class: hardwareOf(a.agentId), outcome: a.ok ? 'ok' : (a.code ?? 'error') },
      a.e2eMs / 1000,
    );
  });
  const unsubscribeRouted = router.onRouted((r) => {
    const labels = { model: modelLabel(r.model), hardware_class: hardwareOf(r.agentId) };
    routedTotal.inc({ ...labels, via: r.via, outcome: r.ok ? 'ok' : (r.code ?? 'error') });
    if (r.via === 'forward' && r.totalMs !== undefined) requestSeconds.observe(labels, r.totalMs / 1000);
  });

  const modelInfo = (name: string) => modelInfoOf(router, name);
  /** Label value for a model name: unknown names collapse so clients cannot blow up the series count. */
  const modelLabel = (name: string) => (modelInfo(name) ? name : '_unknown');

  const { tls } = options;
  for (const entry of options.trustProxy ?? []) {
    const [address, bits] = entry.split('/');
    const family = net.isIP(address ?? '');
    if (family === 0 || (bits !== undefined && !(/^\d+$/.test(bits) && Number(bits) <= (family === 4 ? 32 : 128))))
      throw new MeshError('MESH_CONFIG', `trustProxy: ${JSON.stringify(entry)} is not an IP address or CIDR range`);
  }
  const app = Fastify({
    logger: false,
    bodyLimit,
    // fastify's trustProxy (proxy-addr): request.ip is the rightmost X-Forwarded-For hop not in this list.
    ...(options.trustProxy && options.trustProxy.length > 0 ? { trustProxy: options.trustProxy } : {}),
    ...(tls
      ? {
          https: {
            cert: tls.cert,
            key: tls.key,
            ...(tls.ca !== undefined ? { ca: tls.ca } : {}),
            requestCert: tls.requireClientCert === true,
            rejectUnauthorized: tls.requireClientCert === true,
          },
        }
      : {}),
  }) as unknown as FastifyInstance;

  // OpenAPI 3 description, generated from the routes' schemas, served at /openapi.json.
  await app.register(swagger, {
    openapi: {
      openapi: '3.0.3',
      info: {
        title: 'edge-mesh router',
        version: '1',
        description: [
          'Open Inference Protocol (KServe v2) over the mesh, plus operator endpoints.',
          '',
          'Every error, whatever failed (a route, a malformed or oversized body, a schema violation, an unknown route), answers',
          'one body shape, the `HttpError` schema: `{ "error": "<message>", "code": "MESH_…", "details": { … } }`.',
          "`error` is the KServe v2 error field; `code` is a MESH_* code, and the HTTP status is that code's status;",
          '`details` carries structured context when there is some (schema violations under `violations`, the body limit',
          'under `limitBytes`, a chain revert under `reason`). The codes, their statuses and whether a retry may succeed',
          'are listed in docs/errors.md.',
        ].join('\n'),
      },
      components: { schemas: { HttpError: { ...ERROR_BODY_SCHEMA, required: [...ERROR_BODY_SCHEMA.required] } } },
      tags: [
        { name: 'kserve', description: 'Open Inference Protocol (KServe v2): health, model metadata, inference' },
        { name: 'operator', description: 'Agents, routing counters, metrics' },
      ],
    },
  });
  const nameParam = { type: 'object', required: ['name'], properties: { name: { type: 'string', description: 'model name' } } } as const;
  const doc = (
    tags: string,
    summary: string,
    { response = {}, ...extra }: { response?: Record<string, unknown> } & Record<string, unknown> = {},
  ) => ({
    schema: { tags: [tags], summary, ...extra, response: { ...response, ...ANY_ERROR } },
  });

  // Before any route: the credential check (./http-auth.ts) runs on every request, the 404s' included.
  if (options.auth) installHttpAuth(app, router.id, options.auth);
  if (router.rollouts) {
    const { installRolloutRoutes } = await import('./rollout.ts');
    installRolloutRoutes(app, router.rollouts);
  }
  installErrorHandlers(app, {
    bodyLimit,
    onError: (mesh, request) => {
      const params = request.params as { name?: unknown } | undefined;
      const model = typeof params?.name === 'string' ? modelLabel(params.name) : '';
      errorsTotal.inc({ model, code: mesh.code });
    },
  });

  app.get('/openapi.json', doc('operator', 'This OpenAPI description'), async () => app.swagger());
  app.get('/v2', doc('kserve', 'Server metadata: name, version and the extensions this router implements'), async () => serverMetadata());
  app.get('/v2/health/live', doc('kserve', 'Liveness: the router process answers'), async () => ({ live: true }));
  app.get(
    '/v2/health/ready',
    doc('kserve', 'Readiness: connected to the broker with at least one live agent', {
      response: { 503: errorResponse('MESH_NO_AGENT (details.ready is false)') },
    }),
    async () => {
      if (!serverReady(router)) {
        throw new MeshError('MESH_NO_AGENT', 'no live agent known', { details: { ready: false, connected: router.connected } });
      }
      return { ready: true };
    },
  );

  /** The version rule (kserve.ts, `modelFor`): a version no agent serves is unknown; infer needs it to be the only live one. */
  const modelFor = (name: string, version?: string, forInfer = false) => modelForIn(router, name, version, forInfer);
  const versionParams = {
    type: 'object',
    required: ['name', 'version'],
    properties: { name: { type: 'string', description: 'model name' }, version: { type: 'string', description: 'model version' } },
  } as const;
  type ModelParams = { name: string; version?: string };

  /** GET `/v2/models/{name}<suffix>` and its `/v2/models/{name}/versions/{version}<suffix>` twin, served by one handler. */
  const modelRoutes = (suffix: string, summary: string, response: Record<string, unknown>, handler: (params: ModelParams) => unknown) => {
    for (const [path, params] of [
      [`/v2/models/:name${suffix}`, nameParam],
      [`/v2/models/:name/versions/:version${suffix}`, versionParams],
    ] as const) {
      app.get<{ Params: ModelParams }>(path, doc('kserve', summary, { params, response }), async (request) => handler(request.params));
    }
  };
  const metadataSchema = {
    type: 'object',
    properties: {
      name: { type: 'string' },
      versions: { type: 'array', items: { type: 'string' } },
      platform: { type: 'string' },
      inputs: { type: 'array', items: TENSOR_METADATA_SCHEMA },
      outputs: { type: 'array', items: TENSOR_METADATA_SCHEMA },
    },
  } as const;
  const unknown = { 404: errorResponse('MESH_UNKNOWN_MODEL') };
  modelRoutes('', 'Model metadata: inputs, outputs, versions', { 200: metadataSchema, ...unknown }, ({ name, version }) =>
    modelMetadata(router, name, version),
  );
  modelRoutes(
    '/ready',
    'Whether a live agent serves the model (and, with a version, only that version)',
    { ...unknown, 503: errorResponse('MESH_NO_AGENT (details.ready is false)') },
    ({ name, version }) => {
      assertModelReady(router, name, version);
      return { name, ready: true };
    },
  );
  modelRoutes('/config', "Model configuration (Triton's model_configuration extension, its JSON form)", unknown, ({ name, version }) =>
    modelConfig(modelFor(name, version).info, kserveDatatypeOf),
  );

  // Shared with the gRPC service of the same router (kserve.ts, statsFor).
  const stats = statsFor(router);
  app.get(
    '/v2/models/stats',
    doc('kserve', "Inference statistics of every model (Triton's statistics extension), from this router's HTTP requests"),
    async () => stats.report(servedModelsOf(router)),
  );
  modelRoutes('/stats', "Inference statistics of one model (Triton's statistics extension)", unknown, ({ name, version }) => {
    const { info } = modelFor(name, version);
    return stats.report([{ name: info.name, version: info.version }]);
  });

  app.post<{ Body: { ready?: boolean } | undefined }>(
    '/v2/repository/index',
    {
      ...doc('kserve', 'The repository index: every model an agent announced, READY while a live agent serves it', {
        body: { type: 'object', nullable: true, properties: { ready: { type: 'boolean' } } },
      }),
      bodyLimit: SMALL_BODY_LIMIT,
    },
    async (request) => repositoryIndex(router, request.body?.ready === true),
  );

  // A body that carries Inference-Header-Content-Length is the binary extension's, whatever Content-Type its sender
  // gave it (Triton's Python client gives none): preParsing below names it BINARY_BODY_TYPE, parsed here.
  app.addContentTypeParser([BINARY_BODY_TYPE, 'application/octet-stream'], { parseAs: 'buffer', bodyLimit }, (request, body, done) => {
    try {
      done(null, splitBinaryBody(body as Buffer, request.headers[HEADER_LENGTH]));
    } catch (err) {
      done(err as Error, undefined);
    }
  });

  const inferRoute = {
    // Each model's body is bounded by its input shapes before a byte of JSON is parsed: a declared length over the
    // limit is refused at once, a longer stream as soon as it passes the limit (docs/routing.md, "Request bodies").
    preParsing: async (request: FastifyRequest, _reply: unknown, payload: NodeJS.ReadableStream) => {
      const model = (request.params as { name: string }).name;
      const limit = modelBodyLimit(modelInfo(model)?.info, bodyLimit);
      const declared = Number(request.headers['content-length']);
      if (Number.isFinite(declared) && declared > limit) throw tooLarge(limit, model);
      if (request.headers[HEADER_LENGTH] !== undefined) request.headers['content-type'] = BINARY_BODY_TYPE;
      return cappedBody(payload, limit, model);
    },
    schema: {
      tags: ['kserve'],
      summary:
        "Run inference: JSON tensors, or binary ones after a JSON header (Inference-Header-Content-Length); parameters.deadline_ms (or Triton's timeout, in µs) bounds the request, retries and hedges included",
      body: inferBodySchema,
      response: {
        200: INFER_RESPONSE_SCHEMA,
        400: errorResponse('MESH_BAD_REQUEST (bad JSON, schema violation: details.violations), MESH_BAD_TENSOR, MESH_BAD_INPUT'),
        404: errorResponse('MESH_UNKNOWN_MODEL'),
        413: errorResponse('MESH_TOO_LARGE: the body is over the limit (details.limitBytes)'),
        429: errorResponse('MESH_BUSY, MESH_RATE_LIMITED: retry, later or elsewhere'),
        500: errorResponse('MESH_INFERENCE_FAILED, MESH_MODEL_INTEGRITY, MESH_INTERNAL'),
        502: errorResponse('MESH_AGENT_LOST'),
        503: errorResponse(
          'MESH_NO_AGENT, MESH_NOT_CONNECTED, MESH_SHUTTING_DOWN, MESH_OVERLOADED (the adaptive concurrency limit: details.limit, .held, .share)',
        ),
        504: errorResponse('MESH_DEADLINE_EXCEEDED, MESH_TIMEOUT'),
        ...ANY_ERROR,
      },
    },
  };
  const infer = async (params: ModelParams, body: InferBody, reply: FastifyReply, caller: string) => {
    const model = params.name;
    const started = performance.now();
    const label = modelLabel(model);
    requestsTotal.inc({ model: label });
    inferTarget(router, model, params.version);
    refuseUnsupported(body.parameters);
    const binary = binaryInputs(
      body.inputs.map((i) => ({ name: i.name, shape: i.shape, dtype: KSERVE_TO_DTYPE[i.datatype], parameters: i.parameters })),
      body[BINARY_SECTION],
    );
    const inputs: Record<string, Tensor> = Object.create(null);
    for (const input of body.inputs) {
      if (Object.hasOwn(inputs, input.name)) {
        throw new MeshError('MESH_BAD_REQUEST', `input ${input.name} appears twice`, { details: { input: input.name } });
      }
      inputs[input.name] = binary.get(input.name) ?? fromKServe(input);
    }
    const deadlineMs = deadlineFromParameters(body.parameters) ?? defaultDeadlineMs;
    const version = modelInfo(model)?.info.version ?? '';
    let result: RouterInferResult;
    try {
      result = await router.infer(model, inputs, { ...(deadlineMs !== undefined ? { deadlineMs } : {}), limited: true, caller });
    } catch (err) {
      const ms = performance.now() - started;
      stats.failed(model, version, ms);
      throw toMeshError(err);
    }
    const ms = performance.now() - started;
    stats.ok(model, version, ms, result.timings.queueMs, result.timings.execMs);
    const wanted = body.outputs?.map((o) => o.name);
    const names = Object.keys(result.outputs).filter((n) => !wanted || wanted.includes(n));
    if (wanted) {
      const missing = wanted.filter((n) => !Object.hasOwn(result.outputs, n));
      if (missing.length > 0) {
        throw new MeshError('MESH_BAD_INPUT', `model ${model} has no output ${missing.join(', ')}`, { details: { outputs: missing } });
      }
    }
    const sections: Buffer[] = [];
    const outputs = names.map((n) => {
      const tensor = result.outputs[n]!;
      if (!wantsBinary(n, body.outputs, body.parameters)) return toKServe(n, tensor);
      const bytes = tensorBytes(tensor);
      sections.push(bytes);
      return { name: n, shape: [...tensor.shape], datatype: DTYPE_TO_KSERVE[tensor.dtype], parameters: { binary_data_size: bytes.length } };
    });
    const response = {
      model_name: model,
      ...(versionOf(modelInfo(model)?.info) ?? {}),
      id: body.id ?? result.requestId,
      parameters: {
        agent: result.agentId,
        attempts: result.attempts,
        hedged: result.hedged,
        total_ms: result.timings.totalMs,
        // A pipeline's stages as "stage:model@agent" (parameters carry scalars only).
        ...(result.stages ? { stages: result.stages.map((s) => `${s.stage}:${s.model}@${s.agentId}`).join(',') } : {}),
      },
      outputs,
    };
    if (sections.length === 0) return response;
    const { body: bytes, headerLength } = binaryResponse(response, sections);
    return reply.header('content-type', 'application/octet-stream').header(HEADER_LENGTH, String(headerLength)).send(bytes);
  };
  app.post<{ Params: { name: string }; Body: InferBody }>(
    '/v2/models/:name/infer',
    { ...inferRoute, schema: { ...inferRoute.schema, params: nameParam } },
    async (request, reply) => infer(request.params, request.body, reply, callerOf(request)),
  );
  app.post<{ Params: { name: string; version: string }; Body: InferBody }>(
    '/v2/models/:name/versions/:version/infer',
    { ...inferRoute, schema: { ...inferRoute.schema, params: versionParams } },
    async (request, reply) => infer(request.params, request.body, reply, callerOf(request)),
  );

  app.get('/v1/agents', doc('operator', 'Agents the router knows: state, models, load, RTT, failure rate, ejection'), async () => ({
    agents: router.agents().map(({ id, up, status }) => {
      const entry = router.registry.agents.get(id);
      return {
        id,
        up,
        state: status.state,
        version: status.version,
        hardware: status.hardware,
        workers: status.workers,
        queueLimit: status.queueLimit,
        models: (status.models ?? []).map((m) => ({
          name: m.name,
          version: m.version,
          sha256: m.sha256,
          latencyMs: m.latencyMs,
          priceMicros: m.priceMicros,
        })),
        load: entry
          ? {
              reportedInFlight: entry.reportedRif,
              outstanding: entry.outstanding,
              rttMs: Number.isFinite(entry.rttMs) ? entry.rttMs : null,
              pFail: entry.pFail,
              ejected: entry.ejectedUntilMs > Date.now(),
              lastSeenMs: entry.lastSeenMs,
            }
          : null,
      };
    }),
  }));
  app.get(
    '/v1/routing',
    doc(
      'operator',
      'Routing counters: requests, retries, hedges, cancels, silence failovers, leases, budget refusals, attempts per agent; and the policy forwarding requests',
    ),
    async () => ({ router: router.id, connected: router.connected, policy: router.policy, counters: router.counters }),
  );
  if (options.chain) await registerSettlementRoutes(app, router, options.chain);
  if (options.relay) await registerRelayRoutes(app, options.relay);
  if (options.console !== false) {
    // Loaded with the HTTP API: the operator console's page and its endpoints (console.ts, docs/console.md).
    const { registerConsoleRoutes } = await import('./console.ts');
    await registerConsoleRoutes(app, router, options.console ?? {});
  }

  app.get(
    '/metrics',
    doc(
      'operator',
      'Prometheus text: routed traffic (forwarded and leased) and latency histograms per model and hardware class, error counters, process metrics',
    ),
    async (_request, reply) => {
      const text = await metrics.metrics();
      return reply.header('content-type', metrics.contentType).send(text);
    },
  );

  await app.listen({ port, host });
  const address = app.server.address();
  const boundPort = typeof address === 'object' && address ? address.port : port;
  const urlHost = host.includes(':') ? `[${host}]` : host;
  let closed = false;
  return {
    app,
    port: boundPort,
    url: `${tls ? 'https' : 'http'}://${urlHost}:${boundPort}`,
    metrics,
    async close() {
      if (closed) return;
      closed = true;
      unsubscribe();
      unsubscribeRouted();
      await app.close();
    },
  };
}

function versionOf(info: ModelInfo | undefined): { model_version: string } | undefined {
  return info ? { model_version: info.version } : undefined;
}
