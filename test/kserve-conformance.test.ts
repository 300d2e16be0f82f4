/**
 * The router's KServe v2 / Triton HTTP API driven with requests shaped as Triton's clients send them: the binary
 * tensor data extension (a JSON header of Inference-Header-Content-Length bytes, then raw tensors; no Content-Type,
 * as tritonclient.http sends it; `binary_data_output` when no outputs are named), versioned paths, model
 * configuration, statistics and the repository index. Real broker, agent and router.
 */
import assert from 'node:assert/strict';
import { describe, type TestContext, test } from 'node:test';
import { sampleInputs } from '@edge-mesh/demo';
import { generateIdentity, type Tensor } from '@edge-mesh/protocol';
import { type RouterHandle, type RouterHttpHandle, startRouter, startRouterHttp } from '@edge-mesh/router';
import { agentFor, brokerFor, quiet } from './helpers.ts';

async function mesh(t: TestContext): Promise<{ router: RouterHandle; http: RouterHttpHandle; version: string }> {
  const broker = await brokerFor(t);
  await agentFor(t, { brokerUrl: broker.url });
  const router = await startRouter({ brokerUrl: broker.url, identity: generateIdentity('router'), logger: quiet });
  t.after(() => router.close());
  const http = await startRouterHttp(router, { port: 0 });
  t.after(() => http.close());
  await router.waitForModel('kws', 10_000);
  const version = router.models().find((m) => m.name === 'kws')!.version;
  return { router, http, version };
}

const bytesOf = (t: Tensor): Buffer => Buffer.from(t.data.buffer, t.data.byteOffset, t.data.byteLength);

/** A binary-extension request body as tritonclient.http builds it: the JSON header, then each binary input's bytes. */
function binaryBody(header: object, tensors: Buffer[]): { body: Buffer; headerLength: number } {
  const json = Buffer.from(JSON.stringify(header));
  return { body: Buffer.concat([json, ...tensors]), headerLength: json.length };
}

// biome-ignore lint/suspicious/noExplicitAny: HTTP bodies, read field by field in the assertions
type Json = any;

/** Sends a binary request (no Content-Type, as tritonclient.http does) and splits a binary answer. */
async function postBinary(
  url: string,
  header: object,
  tensors: Buffer[],
  headerLengthOverride?: string,
): Promise<{ status: number; json: Json; binary: Buffer; contentType: string | null }> {
  const { body, headerLength } = binaryBody(header, tensors);
  const res = await fetch(url, {
    method: 'POST',
    headers: { 'inference-header-content-length': headerLengthOverride ?? String(headerLength) },
    body,
  });
  const all = Buffer.from(await res.arrayBuffer());
  const hl = res.headers.get('inference-header-content-length');
  const split = hl === null ? all.length : Number(hl);
  return {
    status: res.status,
    json: JSON.parse(all.subarray(0, split).toString()),
    binary: all.subarray(split),
    contentType: res.headers.get('content-type'),
  };
}

async function getJson(url: string, init?: RequestInit): Promise<{ status: number; body: Json }> {
  const res = await fetch(url, init);
  return { status: res.status, body: await res.json() };
}

describe('KServe v2 / Triton HTTP conformance', { timeout: 180_000 }, () => {
  test('binary tensors in and out, as Triton clients send them, give the bits a direct infer gives', async (t) => {
    const { router, http, version } = await mesh(t);
    const inputs = sampleInputs('kws');
    const [name, tensor] = Object.entries(inputs)[0]!;
    const direct = await router.infer('kws', inputs);
    const [outName, outTensor] = Object.entries(direct.outputs)[0]!;

    // Triton's default request: binary input, no outputs named, so every output comes back binary.
    const triton = await postBinary(
      `${http.url}/v2/models/kws/infer`,
      {
        inputs: [{ name, shape: tensor.shape, datatype: 'FP32', parameters: { binary_data_size: bytesOf(tensor).length } }],
        parameters: { binary_data_output: true, timeout: 5_000_000 },
      },
      [bytesOf(tensor)],
    );
    assert.equal(triton.status, 200, JSON.stringify(triton.json));
    assert.equal(triton.contentType, 'application/octet-stream');
    assert.equal(triton.json.model_name, 'kws');
    assert.equal(triton.json.model_version, version);
    const out = triton.json.outputs.find((o: { name: string }) => o.name === outName);
    assert.deepEqual(out.shape, outTensor.shape);
    assert.equal(out.datatype, 'FP32');
    assert.equal(out.data, undefined, 'a binary output carries no JSON data');
    const size = out.parameters.binary_data_size;
    assert.equal(size, bytesOf(outTensor).length);
    // Outputs' bytes follow the header in output order.
    let offset = 0;
    for (const o of triton.json.outputs as { name: string; parameters: { binary_data_size: number } }[]) {
      const bits = triton.binary.subarray(offset, offset + o.parameters.binary_data_size);
      assert.ok(bits.equals(bytesOf(direct.outputs[o.name]!)), `${o.name}: same bits as a direct infer`);
      offset += o.parameters.binary_data_size;
    }
    assert.equal(offset, triton.binary.length, 'no bytes left over');

    // Binary input, the output asked for as JSON: a plain JSON answer.
    const mixed = await postBinary(
      `${http.url}/v2/models/kws/versions/${version}/infer`,
      {
        inputs: [{ name, shape: tensor.shape, datatype: 'FP32', parameters: { binary_data_size: bytesOf(tensor).length } }],
        outputs: [{ name: outName, parameters: { binary_data: false } }],
      },
      [bytesOf(tensor)],
    );
    assert.equal(mixed.status, 200, JSON.stringify(mixed.json));
    assert.match(mixed.contentType ?? '', /application\/json/);
    const jsonOut = mixed.json.outputs[0];
    assert.deepEqual(jsonOut.data, Array.from(outTensor.data as Float32Array));

    // JSON input, the output asked for as binary.
    const jsonIn = await fetch(`${http.url}/v2/models/kws/infer`, {
      method: 'POST',
      headers: { 'content-type': 'application/json' },
      body: JSON.stringify({
        inputs: [{ name, shape: tensor.shape, datatype: 'FP32', data: Array.from(tensor.data as Float32Array) }],
        outputs: [{ name: outName, parameters: { binary_data: true } }],
      }),
    });
    assert.equal(jsonIn.status, 200);
    const all = Buffer.from(await jsonIn.arrayBuffer());
    const hl = Number(jsonIn.headers.get('inference-header-content-length'));
    assert.ok(hl > 0 && hl < all.length);
    assert.ok(all.subarray(hl).equals(bytesOf(outTensor)));
  });

  test('a malformed binary body gets a coded 400 and the router keeps serving', async (t) => {
    const { http } = await mesh(t);
    const inputs = sampleInputs('kws');
    const [name, tensor] = Object.entries(inputs)[0]!;
    const bytes = bytesOf(tensor);
    const url = `${http.url}/v2/models/kws/infer`;
    const header = (size: number) => ({
      inputs: [{ name, shape: tensor.shape, datatype: 'FP32', parameters: { binary_data_size: size } }],
    });
    const cases: [string, Promise<{ status: number; json: Json }>, string][] = [
      ['header length past the body', postBinary(url, header(bytes.length), [bytes], String(10_000_000)), 'MESH_BAD_REQUEST'],
      ['header length not a number', postBinary(url, header(bytes.length), [bytes], 'twelve'), 'MESH_BAD_REQUEST'],
      ['bytes left over', postBinary(url, header(bytes.length), [bytes, Buffer.alloc(4)]), 'MESH_BAD_REQUEST'],
      ['binary_data_size past the body', postBinary(url, header(bytes.length + 4), [bytes]), 'MESH_BAD_TENSOR'],
      ['size disagrees with the shape', postBinary(url, header(bytes.length - 4), [bytes.subarray(4)]), 'MESH_BAD_TENSOR'],
      ['negative binary_data_size', postBinary(url, header(-1), [bytes]), 'MESH_BAD_TENSOR'],
      [
        'sequence requests',
        postBinary(url, { ...header(bytes.length), parameters: { sequence_id: 7, sequence_start: true } }, [bytes]),
        'MESH_BAD_REQUEST',
      ],
      ['a bad timeout', postBinary(url, { ...header(bytes.length), parameters: { timeout: -5 } }, [bytes]), 'MESH_BAD_REQUEST'],
      [
        'BYTES tensors',
        postBinary(url, { inputs: [{ name, shape: [1], datatype: 'BYTES', parameters: { binary_data_size: 5 } }] }, [
          Buffer.from([1, 0, 0, 0, 65]),
        ]),
        'MESH_BAD_REQUEST',
      ],
    ];
    for (const [what, res, code] of cases) {
      const r = await res;
      assert.equal(r.json.code, code, `${what}: ${JSON.stringify(r.json)}`);
      assert.equal(r.status, 400, what);
      assert.equal(typeof r.json.error, 'string', what);
    }
    // binary_data_size in a JSON request with no binary section.
    const noSection = await getJson(url, {
      method: 'POST',
      headers: { 'content-type': 'application/json' },
      body: JSON.stringify(header(bytes.length)),
    });
    assert.equal(noSection.body.code, 'MESH_BAD_REQUEST', JSON.stringify(noSection.body));
    // Still serving.
    const ok = await postBinary(url, header(bytes.length), [bytes]);
    assert.equal(ok.status, 200, JSON.stringify(ok.json));
  });

  test('server metadata, versioned paths, model config, statistics and the repository index', async (t) => {
    const { router, http, version } = await mesh(t);
    const base = http.url;
    const server = await getJson(`${base}/v2`);
    assert.deepEqual(server.body.extensions.sort(), ['binary_tensor_data', 'model_configuration', 'statistics']);

    const meta = await getJson(`${base}/v2/models/kws/versions/${version}`);
    assert.equal(meta.status, 200);
    assert.deepEqual(meta.body, (await getJson(`${base}/v2/models/kws`)).body);
    const wrong = await getJson(`${base}/v2/models/kws/versions/${version}-nope`);
    assert.equal(wrong.status, 404);
    assert.equal(wrong.body.code, 'MESH_UNKNOWN_MODEL');
    assert.deepEqual(wrong.body.details.versions, [version]);
    assert.deepEqual(await getJson(`${base}/v2/models/kws/versions/${version}/ready`), { status: 200, body: { name: 'kws', ready: true } });

    const config = await getJson(`${base}/v2/models/kws/config`);
    assert.equal(config.status, 200);
    assert.equal(config.body.name, 'kws');
    assert.equal(config.body.platform, 'onnxruntime_onnx');
    assert.equal(config.body.max_batch_size, 0);
    const info = router.models().find((m) => m.name === 'kws')!;
    assert.deepEqual(
      config.body.input.map((i: { name: string; data_type: string; dims: number[] }) => [i.name, i.data_type, i.dims.length]),
      info.inputs.map((i) => [i.name, 'TYPE_FP32', i.shape.length]),
    );
    assert.equal((await getJson(`${base}/v2/models/nope/config`)).status, 404);

    // Statistics count what this router answered over HTTP: two successes, one failure.
    const inputs = sampleInputs('kws');
    const [name, tensor] = Object.entries(inputs)[0]!;
    const good = { inputs: [{ name, shape: tensor.shape, datatype: 'FP32', parameters: { binary_data_size: bytesOf(tensor).length } }] };
    for (let i = 0; i < 2; i++) assert.equal((await postBinary(`${base}/v2/models/kws/infer`, good, [bytesOf(tensor)])).status, 200);
    const wrongInfer = await postBinary(`${base}/v2/models/kws/versions/${version}-nope/infer`, good, [bytesOf(tensor)]);
    assert.equal(wrongInfer.status, 404, JSON.stringify(wrongInfer.json));
    assert.equal(wrongInfer.json.code, 'MESH_UNKNOWN_MODEL');
    const bad = { inputs: [{ name: 'not-an-input', shape: [1], datatype: 'FP32', data: [1] }] };
    const failed = await getJson(`${base}/v2/models/kws/infer`, {
      method: 'POST',
      headers: { 'content-type': 'application/json' },
      body: JSON.stringify(bad),
    });
    assert.equal(failed.status, 400);
    const all = await getJson(`${base}/v2/models/stats`);
    assert.equal(all.status, 200, 'stats is not taken for a model name');
    const kws = all.body.model_stats.find((m: { name: string }) => m.name === 'kws');
    assert.ok(kws, JSON.stringify(all.body));
    assert.equal(kws.version, version);
    assert.equal(kws.inference_count, 2);
    assert.equal(kws.inference_stats.success.count, 2);
    assert.equal(kws.inference_stats.fail.count, 1);
    assert.ok(kws.inference_stats.success.ns > 0);
    assert.ok(kws.inference_stats.compute_infer.count === 2 && kws.inference_stats.compute_infer.ns > 0);
    assert.ok(kws.last_inference > 0);
    const one = await getJson(`${base}/v2/models/kws/versions/${version}/stats`);
    assert.deepEqual(one.body.model_stats, [kws]);

    const index = await getJson(`${base}/v2/repository/index`, { method: 'POST' });
    assert.equal(index.status, 200);
    assert.deepEqual(
      index.body.map((e: { name: string; state: string }) => `${e.name}:${e.state}`).sort(),
      info
        ? router
            .models()
            .map((m) => `${m.name}:READY`)
            .sort()
        : [],
    );
    const ready = await getJson(`${base}/v2/repository/index`, {
      method: 'POST',
      headers: { 'content-type': 'application/json' },
      body: JSON.stringify({ ready: true }),
    });
    assert.deepEqual(ready.body, index.body);
    // Loading and unloading through the API are not implemented: no such route.
    const load = await getJson(`${base}/v2/repository/models/kws/load`, { method: 'POST' });
    assert.equal(load.status, 404);
    assert.equal(load.body.code, 'MESH_NOT_FOUND');
  });
});
