/**
 * The router's KServe v2 gRPC service (inference.GRPCInferenceService) driven by a client built with
 * @grpc/grpc-js from the router's own .proto, with requests shaped as Triton's gRPC client sends them: one
 * `raw_input_contents` entry per input in input order, Triton's `timeout` as an int64 parameter in microseconds,
 * no outputs named (triton-inference-server/client, src/python/library/tritonclient/grpc/_utils.py,
 * `_get_inference_request`). Also typed contents, metadata, readiness, config, statistics, the repository index,
 * malformed requests with their status codes, and the gRPC deadline bounding the mesh request.
 * Real broker, agent and router.
 */
import assert from 'node:assert/strict';
import { execFileSync, spawn } from 'node:child_process';
import { once } from 'node:events';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { describe, type TestContext, test } from 'node:test';
import { installedCommand, sampleInputs } from '@edge-mesh/demo';
import { admit, ERROR_CODES, generateIdentity, makeHttpToken, type Tensor } from '@edge-mesh/protocol';
import {
  GRPC_STATUS_OF,
  loadKServeProto,
  MESH_CODE_METADATA,
  makeApiKey,
  type RouterHandle,
  type RouterInferOptions,
  startRouter,
  startRouterGrpc,
} from '@edge-mesh/router';
import * as grpc from '@grpc/grpc-js';
import { agentFor, brokerFor, quiet, ROOT } from './helpers.ts';

const BIN = path.join(ROOT, 'cli/bin/edge-mesh.mjs');

const HAS_OPENSSL = installedCommand('openssl') !== undefined;

// biome-ignore lint/suspicious/noExplicitAny: protobuf messages as proto-loader gives them, read field by field
type Msg = any;

interface Answer {
  ok: boolean;
  value: Msg;
  code: grpc.status | undefined;
  details: string;
  meshCode: string | undefined;
}

/** A promise-returning client for the router's service: each method resolves with the answer or the error's parts. */
function clientFor(t: TestContext, address: string, auth: { credentials?: grpc.ChannelCredentials; authorization?: string } = {}) {
  const proto = loadKServeProto() as unknown as { inference: { GRPCInferenceService: grpc.ServiceClientConstructor } };
  const client = new proto.inference.GRPCInferenceService(address, auth.credentials ?? grpc.credentials.createInsecure(), {
    'grpc.max_send_message_length': 64 * 1024 * 1024,
  });
  t.after(() => client.close());
  return (method: string, request: Msg, deadlineMs = 30_000): Promise<Answer> =>
    new Promise((resolve) => {
      const fn = client[method] as (req: Msg, meta: grpc.Metadata, opts: grpc.CallOptions, cb: grpc.requestCallback<Msg>) => void;
      const metadata = new grpc.Metadata();
      if (auth.authorization !== undefined) metadata.set('authorization', auth.authorization);
      fn.call(client, request, metadata, { deadline: Date.now() + deadlineMs }, (err, value) => {
        if (err) {
          const mesh = err.metadata?.get(MESH_CODE_METADATA)[0];
          resolve({
            ok: false,
            value: undefined,
            code: err.code,
            details: err.details,
            meshCode: mesh === undefined ? undefined : String(mesh),
          });
        } else resolve({ ok: true, value, code: undefined, details: '', meshCode: undefined });
      });
    });
}

async function mesh(t: TestContext) {
  const broker = await brokerFor(t);
  await agentFor(t, { brokerUrl: broker.url });
  const router = await startRouter({
    brokerUrl: broker.url,
    identity: generateIdentity('router'),
    logger: quiet,
    grpcPort: 0,
    http: { port: 0, processMetrics: false },
  });
  t.after(() => router.close());
  for (const model of ['kws', 'vad', 'ocr-det']) await router.waitForModel(model, 20_000);
  assert.ok(router.grpc, 'grpcPort starts the gRPC service');
  const call = clientFor(t, router.grpc.address);
  const version = router.models().find((m) => m.name === 'kws')!.version;
  return { router, call, version };
}

const bytesOf = (t: Tensor): Buffer => Buffer.from(t.data.buffer, t.data.byteOffset, t.data.byteLength);
const KSERVE: Record<string, string> = { float32: 'FP32', int64: 'INT64', float64: 'FP64', bool: 'BOOL' };

/** A ModelInferRequest as tritonclient.grpc builds it: tensors described in `inputs`, their bytes in raw_input_contents. */
function tritonRequest(model: string, inputs: Record<string, Tensor>, extra: Msg = {}): Msg {
  const entries = Object.entries(inputs);
  return {
    model_name: model,
    model_version: '',
    inputs: entries.map(([name, t]) => ({ name, datatype: KSERVE[t.dtype], shape: t.shape })),
    raw_input_contents: entries.map(([, t]) => bytesOf(t)),
    ...extra,
  };
}

/** The outputs of a ModelInferResponse as name → raw bytes, checking one raw entry per output. */
function rawOutputs(res: Msg): Map<string, { bytes: Buffer; datatype: string; shape: number[] }> {
  assert.equal(res.raw_output_contents.length, res.outputs.length, 'one raw_output_contents entry per output');
  const out = new Map();
  res.outputs.forEach((o: Msg, i: number) => {
    assert.equal(o.contents, null, 'outputs carry no typed contents');
    out.set(o.name, { bytes: res.raw_output_contents[i], datatype: o.datatype, shape: o.shape.map(Number) });
  });
  return out;
}

function assertSameAsDirect(res: Msg, direct: Record<string, Tensor>, what: string): void {
  const outs = rawOutputs(res);
  assert.deepEqual([...outs.keys()].sort(), Object.keys(direct).sort(), what);
  for (const [name, t] of Object.entries(direct)) {
    const o = outs.get(name)!;
    assert.ok(o.bytes.equals(bytesOf(t)), `${what}: ${name} has the bits of a direct infer`);
    assert.deepEqual(o.shape, t.shape, `${what}: ${name} shape`);
    assert.equal(o.datatype, KSERVE[t.dtype], `${what}: ${name} datatype`);
  }
}

describe('KServe v2 gRPC service', { timeout: 180_000 }, () => {
  test('docs/errors.md gives every MESH code the gRPC status the service answers with', () => {
    const doc = readFileSync(path.join(ROOT, 'docs', 'errors.md'), 'utf8');
    const section = doc.slice(doc.indexOf('## gRPC statuses'));
    const rows = new Map([...section.matchAll(/^\| `(MESH_[A-Z_]+)` +\| `([A-Z_]+)` +\|$/gm)].map((m) => [m[1]!, m[2]!] as const));
    assert.deepEqual([...rows.keys()].sort(), Object.keys(ERROR_CODES).sort());
    for (const [code, status] of rows)
      assert.equal(GRPC_STATUS_OF[code as keyof typeof GRPC_STATUS_OF], grpc.status[status as keyof typeof grpc.status], code);
  });

  test('raw_input_contents as Triton sends them, and typed contents, give the bits a direct infer gives', async (t) => {
    const { router, call, version } = await mesh(t);

    const kws = sampleInputs('kws');
    const kwsDirect = await router.infer('kws', kws);
    const triton = await call(
      'ModelInfer',
      tritonRequest('kws', kws, { id: 'req-7', parameters: { timeout: { int64_param: 5_000_000 } } }),
    );
    assert.ok(triton.ok, triton.details);
    assert.equal(triton.value.model_name, 'kws');
    assert.equal(triton.value.model_version, version);
    assert.equal(triton.value.id, 'req-7');
    assert.equal(typeof triton.value.parameters.agent.string_param, 'string');
    assertSameAsDirect(triton.value, kwsDirect.outputs, 'kws raw');

    // Three inputs of two datatypes (float32 audio and state, an int64 scalar), raw in input order.
    const vad = sampleInputs('vad');
    const vadDirect = await router.infer('vad', vad);
    const vadRaw = await call('ModelInfer', tritonRequest('vad', vad, { model_version: version }));
    assert.ok(vadRaw.ok, vadRaw.details);
    assertSameAsDirect(vadRaw.value, vadDirect.outputs, 'vad raw');

    // Typed contents: fp32_contents and int64_contents, one output asked for by name.
    const typed = await call('ModelInfer', {
      model_name: 'vad',
      inputs: Object.entries(vad).map(([name, tensor]) => ({
        name,
        datatype: KSERVE[tensor.dtype],
        shape: tensor.shape,
        contents:
          tensor.dtype === 'int64'
            ? { int64_contents: Array.from(tensor.data as BigInt64Array, String) }
            : { fp32_contents: Array.from(tensor.data as Float32Array) },
      })),
      outputs: [{ name: 'output' }],
    });
    assert.ok(typed.ok, typed.details);
    const outs = rawOutputs(typed.value);
    assert.deepEqual([...outs.keys()], ['output']);
    assert.ok(outs.get('output')!.bytes.equals(bytesOf(vadDirect.outputs.output!)), 'typed vad: same bits');

    const kwsTyped = await call('ModelInfer', {
      model_name: 'kws',
      inputs: Object.entries(kws).map(([name, tensor]) => ({
        name,
        datatype: 'FP32',
        shape: tensor.shape,
        contents: { fp32_contents: Array.from(tensor.data as Float32Array) },
      })),
    });
    assert.ok(kwsTyped.ok, kwsTyped.details);
    assertSameAsDirect(kwsTyped.value, kwsDirect.outputs, 'kws typed');
  });

  test('health, metadata, config, statistics and the repository index', async (t) => {
    const { router, call, version } = await mesh(t);
    assert.deepEqual((await call('ServerLive', {})).value, { live: true });
    assert.deepEqual((await call('ServerReady', {})).value, { ready: true });
    const server = (await call('ServerMetadata', {})).value;
    assert.equal(server.name, 'edge-mesh-router');
    assert.deepEqual([...server.extensions].sort(), ['binary_tensor_data', 'model_configuration', 'statistics']);

    assert.deepEqual((await call('ModelReady', { name: 'kws' })).value, { ready: true });
    assert.deepEqual((await call('ModelReady', { name: 'kws', version })).value, { ready: true });
    const unknownReady = await call('ModelReady', { name: 'nope' });
    assert.equal(unknownReady.code, grpc.status.NOT_FOUND);
    assert.equal(unknownReady.meshCode, 'MESH_UNKNOWN_MODEL');

    const meta = await call('ModelMetadata', { name: 'vad', version });
    assert.ok(meta.ok, meta.details);
    const info = router.models().find((m) => m.name === 'vad')!;
    assert.equal(meta.value.name, 'vad');
    assert.deepEqual(meta.value.versions, [version]);
    assert.deepEqual(
      meta.value.inputs.map((i: Msg) => [i.name, i.datatype, i.shape.length]),
      info.inputs.map((i) => [i.name, i.dtype === 'int64' || i.dtype === 'tensor(int64)' ? 'INT64' : 'FP32', i.shape.length]),
    );
    assert.ok(meta.value.inputs.flatMap((i: Msg) => i.shape.map(Number)).every((d: number) => d >= -1));
    const wrongVersion = await call('ModelMetadata', { name: 'kws', version: `${version}-nope` });
    assert.equal(wrongVersion.code, grpc.status.NOT_FOUND);
    assert.equal(wrongVersion.meshCode, 'MESH_UNKNOWN_MODEL');
    assert.match(wrongVersion.details, /^MESH_UNKNOWN_MODEL: /);

    const config = await call('ModelConfig', { name: 'kws' });
    assert.ok(config.ok, config.details);
    assert.equal(config.value.config.name, 'kws');
    assert.equal(config.value.config.platform, 'onnxruntime_onnx');
    assert.equal(config.value.config.backend, 'onnxruntime');
    assert.equal(config.value.config.max_batch_size, 0);
    assert.equal(config.value.config.input[0].data_type, 'TYPE_FP32');
    assert.deepEqual(config.value.config.input[0].dims.map(Number), [1, 25, 96]);
    assert.equal(config.value.config.version_policy.latest.num_versions, 1);
    assert.equal((await call('ModelConfig', { name: 'nope' })).code, grpc.status.NOT_FOUND);

    // Statistics are shared with the HTTP API: one gRPC and one HTTP success, one failure at the agent.
    const kws = sampleInputs('kws');
    assert.ok((await call('ModelInfer', tritonRequest('kws', kws))).ok);
    const [name, tensor] = Object.entries(kws)[0]!;
    const viaHttp = await fetch(`${router.http!.url}/v2/models/kws/infer`, {
      method: 'POST',
      headers: { 'content-type': 'application/json' },
      body: JSON.stringify({ inputs: [{ name, shape: tensor.shape, datatype: 'FP32', data: Array.from(tensor.data as Float32Array) }] }),
    });
    assert.equal(viaHttp.status, 200);
    const failed = await call('ModelInfer', {
      model_name: 'kws',
      inputs: [{ name: 'not-an-input', datatype: 'FP32', shape: [1], contents: { fp32_contents: [1] } }],
    });
    assert.equal(failed.code, grpc.status.INVALID_ARGUMENT, failed.details);
    const stats = await call('ModelStatistics', { name: 'kws' });
    assert.ok(stats.ok, stats.details);
    const [s] = stats.value.model_stats;
    assert.equal(s.name, 'kws');
    assert.equal(s.version, version);
    assert.equal(Number(s.inference_count), 2);
    assert.equal(Number(s.inference_stats.success.count), 2);
    assert.equal(Number(s.inference_stats.fail.count), 1);
    assert.ok(Number(s.inference_stats.success.ns) > 0);
    assert.ok(Number(s.last_inference) > 0);
    const all = await call('ModelStatistics', {});
    assert.ok(all.value.model_stats.some((m: Msg) => m.name === 'kws' && Number(m.inference_count) === 2));

    const index = await call('RepositoryIndex', {});
    assert.ok(index.ok, index.details);
    assert.deepEqual(
      index.value.models.map((m: Msg) => `${m.name}:${m.version}:${m.state}`).sort(),
      router
        .models()
        .map((m) => `${m.name}:${m.version}:READY`)
        .sort(),
    );
    assert.deepEqual((await call('RepositoryIndex', { ready: true })).value, index.value);
  });

  test('malformed requests get the right status code and the router keeps serving', async (t) => {
    const { router, call, version } = await mesh(t);
    const address = router.grpc!.address;
    const kws = sampleInputs('kws');
    const [name, tensor] = Object.entries(kws)[0]!;
    const bytes = bytesOf(tensor);
    const input = { name, datatype: 'FP32', shape: tensor.shape };
    const req = (extra: Msg) => ({ model_name: 'kws', inputs: [input], raw_input_contents: [bytes], ...extra });
    const cases: [string, Msg, grpc.status, string][] = [
      ['two raw entries for one input', req({ raw_input_contents: [bytes, bytes] }), grpc.status.INVALID_ARGUMENT, 'MESH_BAD_REQUEST'],
      ['raw bytes short of the shape', req({ raw_input_contents: [bytes.subarray(4)] }), grpc.status.INVALID_ARGUMENT, 'MESH_BAD_TENSOR'],
      [
        'raw bytes past the shape',
        req({ raw_input_contents: [Buffer.concat([bytes, Buffer.alloc(4)])] }),
        grpc.status.INVALID_ARGUMENT,
        'MESH_BAD_TENSOR',
      ],
      [
        'raw and typed contents together',
        req({ inputs: [{ ...input, contents: { fp32_contents: [1] } }] }),
        grpc.status.INVALID_ARGUMENT,
        'MESH_BAD_REQUEST',
      ],
      ['no contents at all', req({ raw_input_contents: [] }), grpc.status.INVALID_ARGUMENT, 'MESH_BAD_REQUEST'],
      [
        'typed values in the wrong list',
        req({ raw_input_contents: [], inputs: [{ ...input, contents: { int_contents: Array(2400).fill(1) } }] }),
        grpc.status.INVALID_ARGUMENT,
        'MESH_BAD_TENSOR',
      ],
      [
        'typed values short of the shape',
        req({ raw_input_contents: [], inputs: [{ ...input, contents: { fp32_contents: [1, 2, 3] } }] }),
        grpc.status.INVALID_ARGUMENT,
        'MESH_BAD_TENSOR',
      ],
      [
        'BYTES tensors',
        req({ inputs: [{ name, datatype: 'BYTES', shape: [1] }], raw_input_contents: [Buffer.from([1, 0, 0, 0, 65])] }),
        grpc.status.INVALID_ARGUMENT,
        'MESH_BAD_REQUEST',
      ],
      ['a negative dimension', req({ inputs: [{ ...input, shape: [1, -25, 96] }] }), grpc.status.INVALID_ARGUMENT, 'MESH_BAD_TENSOR'],
      ['an unknown model', req({ model_name: 'nope' }), grpc.status.NOT_FOUND, 'MESH_UNKNOWN_MODEL'],
      ['a version no agent serves', req({ model_version: `${version}-nope` }), grpc.status.NOT_FOUND, 'MESH_UNKNOWN_MODEL'],
      ['no model name', req({ model_name: '' }), grpc.status.INVALID_ARGUMENT, 'MESH_BAD_REQUEST'],
      [
        'a sequence request',
        req({ parameters: { sequence_id: { int64_param: 7 }, sequence_start: { bool_param: true } } }),
        grpc.status.INVALID_ARGUMENT,
        'MESH_BAD_REQUEST',
      ],
      ['a bad timeout', req({ parameters: { timeout: { int64_param: -5 } } }), grpc.status.INVALID_ARGUMENT, 'MESH_BAD_REQUEST'],
      [
        'a bad deadline_ms',
        req({ parameters: { deadline_ms: { string_param: 'soon' } } }),
        grpc.status.INVALID_ARGUMENT,
        'MESH_BAD_REQUEST',
      ],
      ['an input the model lacks', req({ inputs: [{ ...input, name: 'not-an-input' }] }), grpc.status.INVALID_ARGUMENT, 'MESH_BAD_INPUT'],
      ['an output the model lacks', req({ outputs: [{ name: 'not-an-output' }] }), grpc.status.INVALID_ARGUMENT, 'MESH_BAD_INPUT'],
    ];
    for (const [what, request, code, meshCode] of cases) {
      const r = await call('ModelInfer', request);
      assert.equal(r.ok, false, `${what}: refused`);
      assert.equal(r.meshCode, meshCode, `${what}: ${r.details}`);
      assert.equal(r.code, code, `${what}: status ${r.code}`);
      assert.ok(r.details.startsWith(`${meshCode}: `), `${what}: the code leads the message`);
    }
    // Over the message cap: gRPC itself refuses it.
    const huge = await call('ModelInfer', req({ raw_input_contents: [Buffer.alloc(8 * 1024 * 1024)] }));
    assert.equal(huge.code, grpc.status.RESOURCE_EXHAUSTED, huge.details);
    // A method of Triton's service the router does not implement (repository load), sent as an empty message.
    const generic = new grpc.Client(address, grpc.credentials.createInsecure());
    t.after(() => generic.close());
    const unimplemented = await new Promise<grpc.ServiceError | null>((resolve) => {
      generic.makeUnaryRequest(
        '/inference.GRPCInferenceService/RepositoryModelLoad',
        (b: Buffer) => b,
        (b: Buffer) => b,
        Buffer.alloc(0),
        (err) => resolve(err),
      );
    });
    assert.equal(unimplemented?.code, grpc.status.UNIMPLEMENTED);
    // Still serving.
    const ok = await call('ModelInfer', req({}));
    assert.ok(ok.ok, ok.details);
  });

  test('the gRPC deadline bounds the mesh request; a mesh deadline that passes is DEADLINE_EXCEEDED', async (t) => {
    const { router, call } = await mesh(t);
    // A router handle that records what the gRPC front asks of the real router.
    const seen: (RouterInferOptions | undefined)[] = [];
    const spy: RouterHandle = Object.create(router, {
      infer: {
        value: (model: string, inputs: Record<string, Tensor>, options?: RouterInferOptions) => {
          seen.push(options);
          return router.infer(model, inputs, options);
        },
      },
    });
    const front = await startRouterGrpc(spy, { port: 0 });
    t.after(() => front.close());
    const spyCall = clientFor(t, front.address);
    const kws = sampleInputs('kws');

    assert.ok((await spyCall('ModelInfer', tritonRequest('kws', kws), 20_000)).ok);
    const fromGrpc = seen.at(-1)?.deadlineMs;
    // With no credentials, the caller for the concurrency limit's shares is the peer's address.
    assert.deepEqual([seen.at(-1)?.limited, seen.at(-1)?.caller], [true, 'address:127.0.0.1']);
    assert.ok(fromGrpc !== undefined && fromGrpc <= 20_000 && fromGrpc > 10_000, `gRPC deadline 20 s gave ${fromGrpc} ms`);

    // Triton's timeout (µs) below the gRPC deadline wins; so does deadline_ms.
    assert.ok((await spyCall('ModelInfer', tritonRequest('kws', kws, { parameters: { timeout: { int64_param: 3_000_000 } } }), 20_000)).ok);
    assert.equal(seen.at(-1)?.deadlineMs, 3_000);
    assert.ok((await spyCall('ModelInfer', tritonRequest('kws', kws, { parameters: { deadline_ms: { int64_param: 2_500 } } }), 20_000)).ok);
    assert.equal(seen.at(-1)?.deadlineMs, 2_500);
    // A gRPC deadline below the parameter's wins.
    assert.ok(
      (await spyCall('ModelInfer', tritonRequest('kws', kws, { parameters: { deadline_ms: { int64_param: 60_000 } } }), 20_000)).ok,
    );
    assert.ok(seen.at(-1)!.deadlineMs! <= 20_000);

    // The detection model cannot answer in 1 ms: the router itself answers DEADLINE_EXCEEDED (mesh-code set, so it
    // is the server's verdict, not the client's own timer), and then serves the next request.
    const late = await call(
      'ModelInfer',
      tritonRequest('ocr-det', sampleInputs('ocr-det'), { parameters: { timeout: { int64_param: 1_000 } } }),
    );
    assert.equal(late.code, grpc.status.DEADLINE_EXCEEDED, late.details);
    assert.match(late.meshCode ?? '', /^MESH_(DEADLINE_EXCEEDED|TIMEOUT)$/);
    assert.ok((await call('ModelInfer', tritonRequest('kws', kws))).ok);
  });

  test("the HTTP API's credentials guard the gRPC port: no credential, a wrong scope and a forged token are refused", async (t) => {
    const operator = generateIdentity('operator');
    const broker = await brokerFor(t);
    await agentFor(t, { brokerUrl: broker.url });
    const { key: readKey, entry: readEntry } = makeApiKey('reader', ['read']);
    const { key: inferKey, entry: inferEntry } = makeApiKey('app', ['infer']);
    const router = await startRouter({
      brokerUrl: broker.url,
      identity: generateIdentity('router'),
      logger: quiet,
      grpcPort: 0,
      http: {
        port: 0,
        processMetrics: false,
        auth: { trustedOperators: [{ id: operator.id, publicKey: operator.publicKey }], apiKeys: [readEntry, inferEntry] },
      },
    });
    t.after(() => router.close());
    await router.waitForModel('kws', 20_000);
    const address = router.grpc!.address;
    const anonymous = clientFor(t, address);
    const reader = clientFor(t, address, { authorization: `Bearer ${readKey}` });
    const app = clientFor(t, address, { authorization: `Bearer ${inferKey}` });
    const forged = clientFor(t, address, {
      authorization: `Bearer ${makeHttpToken(generateIdentity('app'), admit(generateIdentity('operator'), generateIdentity('app')), { audience: router.id, scopes: ['infer'] })}`,
    });
    const request = tritonRequest('kws', sampleInputs('kws'));

    assert.ok((await anonymous('ServerLive', {})).ok, 'liveness stays open');
    const none = await anonymous('ModelInfer', request);
    assert.equal(none.code, grpc.status.UNAUTHENTICATED);
    assert.equal(none.meshCode, 'MESH_UNAUTHORIZED');
    assert.equal((await anonymous('ModelMetadata', { name: 'kws', version: '' })).code, grpc.status.UNAUTHENTICATED);
    const wrongScope = await reader('ModelInfer', request);
    assert.equal(wrongScope.code, grpc.status.PERMISSION_DENIED);
    assert.equal(wrongScope.meshCode, 'MESH_FORBIDDEN');
    assert.ok((await reader('ModelStatistics', { name: '', version: '' })).ok, 'read opens statistics');
    assert.equal((await app('ModelStatistics', { name: '', version: '' })).code, grpc.status.PERMISSION_DENIED);
    assert.equal((await forged('ModelInfer', request)).code, grpc.status.UNAUTHENTICATED, 'a token whose key no trusted operator admitted');
    const served = await app('ModelInfer', request);
    assert.ok(served.ok, served.details);
    assert.equal(served.value.model_name, 'kws');

    // The caller the concurrency limit shares by is the credential, not the address.
    const callers: (string | undefined)[] = [];
    const spy: RouterHandle = Object.create(router, {
      infer: {
        value: (model: string, inputs: Record<string, Tensor>, options?: RouterInferOptions) => {
          callers.push(options?.caller);
          return router.infer(model, inputs, options);
        },
      },
    });
    const front = await startRouterGrpc(spy, {
      port: 0,
      auth: { trustedOperators: [{ id: operator.id, publicKey: operator.publicKey }], apiKeys: [inferEntry] },
    });
    t.after(() => front.close());
    assert.ok((await clientFor(t, front.address, { authorization: `Bearer ${inferKey}` })('ModelInfer', request)).ok);
    assert.deepEqual(callers, ['apikey:app']);
  });

  test('with the HTTP API on TLS the gRPC port is TLS too: a client trusting the certificate is served, a plaintext one is not', {
    skip: HAS_OPENSSL ? false : 'openssl is not installed: this test makes its certificate with it',
  }, async (t) => {
    const dir = mkdtempSync(path.join(os.tmpdir(), 'grpc-tls-'));
    t.after(() => rmSync(dir, { recursive: true, force: true }));
    execFileSync(
      'openssl',
      [
        'req',
        '-x509',
        '-newkey',
        'ec',
        '-pkeyopt',
        'ec_paramgen_curve:P-256',
        '-nodes',
        '-days',
        '1',
        '-subj',
        '/CN=127.0.0.1',
        '-addext',
        'subjectAltName=IP:127.0.0.1',
        '-keyout',
        'key.pem',
        '-out',
        'cert.pem',
      ],
      { cwd: dir, stdio: 'ignore' },
    );
    const cert = readFileSync(path.join(dir, 'cert.pem'));
    const key = readFileSync(path.join(dir, 'key.pem'));
    const broker = await brokerFor(t);
    await agentFor(t, { brokerUrl: broker.url });
    const router = await startRouter({
      brokerUrl: broker.url,
      identity: generateIdentity('router'),
      logger: quiet,
      grpcPort: 0,
      http: { port: 0, processMetrics: false, tls: { cert, key } },
    });
    t.after(() => router.close());
    await router.waitForModel('kws', 20_000);
    const secure = clientFor(t, router.grpc!.address, { credentials: grpc.credentials.createSsl(cert) });
    const served = await secure('ModelInfer', tritonRequest('kws', sampleInputs('kws')));
    assert.ok(served.ok, served.details);
    const plain = clientFor(t, router.grpc!.address);
    assert.equal((await plain('ServerLive', {}, 3_000)).code, grpc.status.UNAVAILABLE);
  });

  test('the gRPC service closes with the router', async (t) => {
    const { router, call } = await mesh(t);
    assert.ok((await call('ServerLive', {})).ok);
    await router.close();
    const after = await call('ServerLive', {}, 2_000);
    assert.equal(after.ok, false);
    assert.ok(after.code === grpc.status.UNAVAILABLE || after.code === grpc.status.DEADLINE_EXCEEDED, `code ${after.code}`);
  });

  test('edge-mesh router --grpc-port serves the gRPC service (with --no-http: gRPC only)', async (t) => {
    const broker = await brokerFor(t);
    await agentFor(t, { brokerUrl: broker.url });
    const child = spawn(process.execPath, [BIN, 'router', '--broker', broker.url, '--no-http', '--grpc-port', '0', '--log-level', 'warn'], {
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    t.after(async () => {
      if (child.exitCode === null) {
        child.kill('SIGTERM');
        await once(child, 'exit');
      }
    });
    let out = '';
    let err = '';
    child.stderr.on('data', (d: Buffer) => (err += d.toString()));
    const address = await new Promise<string>((resolve, reject) => {
      child.stdout.on('data', (d: Buffer) => {
        out += d.toString();
        const m = /gRPC (\S+)/.exec(out);
        if (m) resolve(m[1]!);
      });
      child.on('exit', (code) => reject(new Error(`exited ${code}: ${err}`)));
    });
    assert.doesNotMatch(out, /serving http/, '--no-http: no HTTP API');
    const call = clientFor(t, address);
    assert.deepEqual((await call('ServerLive', {})).value, { live: true });
    // The router finds the agent through the broker; then a Triton-shaped request is served.
    let ready = false;
    for (let i = 0; i < 100 && !ready; i++) {
      ready = (await call('ModelReady', { name: 'kws' })).value?.ready === true;
      if (!ready) await new Promise((r) => setTimeout(r, 100));
    }
    assert.ok(ready, 'kws becomes ready');
    const res = await call('ModelInfer', tritonRequest('kws', sampleInputs('kws')));
    assert.ok(res.ok, res.details);
    child.kill('SIGTERM');
    const [code] = await once(child, 'exit');
    assert.equal(code, 0, err);
  });
});
