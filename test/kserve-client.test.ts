/**
 * The sample app's KServe client (demo/src/kserve-client.ts) against routers that misbehave over HTTP: every failure
 * is a MeshError with a mesh code, never fetch's DOM code (a timeout is DOMException code 23, issue 13); and what it
 * sends and reads in the binary tensor extension, including answers whose lengths lie.
 */
import assert from 'node:assert/strict';
import http from 'node:http';
import type { AddressInfo } from 'node:net';
import { type TestContext, test } from 'node:test';
import { kserveInfer, sampleInputs } from '@edge-mesh/demo';
import { MeshError } from '@edge-mesh/protocol';

/** A real HTTP server on port 0 whose answer to every request is `answer` (given the request and its body). */
async function serverFor(
  t: TestContext,
  answer: (res: http.ServerResponse, req: http.IncomingMessage, body: Buffer) => void,
): Promise<string> {
  const server = http.createServer((req, res) => {
    const chunks: Buffer[] = [];
    req.on('data', (c: Buffer) => chunks.push(c));
    req.on('end', () => answer(res, req, Buffer.concat(chunks)));
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  t.after(() => {
    server.closeAllConnections();
    return new Promise<void>((resolve) => server.close(() => resolve()));
  });
  return `http://127.0.0.1:${(server.address() as AddressInfo).port}`;
}

const inputs = sampleInputs('kws', 1);

async function failure(url: string, deadlineMs = 50): Promise<MeshError> {
  try {
    await kserveInfer(url, 'kws', inputs, deadlineMs);
  } catch (err) {
    assert.ok(err instanceof MeshError, `not a MeshError: ${String(err)} (code ${(err as { code?: unknown }).code})`);
    return err;
  }
  assert.fail('the request succeeded');
}

test('a router that sends headers and then stalls the body: MESH_DEADLINE_EXCEEDED, not code 23', async (t) => {
  const url = await serverFor(t, (res) => {
    res.writeHead(200, { 'content-type': 'application/json' });
    res.write('{"outputs": [');
  });
  const err = await failure(url);
  assert.equal(err.code, 'MESH_DEADLINE_EXCEEDED');
});

test('a router that never answers: MESH_DEADLINE_EXCEEDED', async (t) => {
  const url = await serverFor(t, () => {});
  assert.equal((await failure(url)).code, 'MESH_DEADLINE_EXCEEDED');
});

test('a router that cuts the body off: MESH_NOT_CONNECTED', async (t) => {
  const url = await serverFor(t, (res) => {
    res.writeHead(200, { 'content-type': 'application/json', 'content-length': '1000' });
    res.write('{"outputs": [');
    setTimeout(() => res.destroy(), 20);
  });
  assert.equal((await failure(url)).code, 'MESH_NOT_CONNECTED');
});

test('a body that is not JSON (a proxy page) or not an object: MESH_BAD_REQUEST with the status', async (t) => {
  for (const [status, body] of [
    [502, '<html>bad gateway</html>'],
    [200, 'null'],
    [200, ''],
  ] as const) {
    const url = await serverFor(t, (res) => {
      res.writeHead(status, { 'content-type': 'text/html' });
      res.end(body);
    });
    const err = await failure(url);
    assert.equal(err.code, 'MESH_BAD_REQUEST', body);
    assert.deepEqual(err.details, { status });
  }
});

test('an error body whose code is not a mesh code: MESH_INTERNAL', async (t) => {
  const url = await serverFor(t, (res) => {
    res.writeHead(504, { 'content-type': 'application/json' });
    res.end(JSON.stringify({ error: 'x', code: 23 }));
  });
  assert.equal((await failure(url)).code, 'MESH_INTERNAL');
});

/** A binary-extension answer: the JSON header, then `rest`, with the header length the server claims. */
function binaryAnswer(res: http.ServerResponse, header: object, rest: Buffer, claimed?: number): void {
  const json = Buffer.from(JSON.stringify(header));
  res.writeHead(200, { 'content-type': 'application/octet-stream', 'inference-header-content-length': String(claimed ?? json.length) });
  res.end(Buffer.concat([json, rest]));
}

test('binary by default, as tritonclient.http sends: a JSON header, the bytes after it, and binary outputs read back', async (t) => {
  const values = new Float32Array([0.25, -1.5, 3]);
  let seen: {
    headerLength?: string;
    header?: { inputs: { name: string; parameters: { binary_data_size: number } }[]; parameters: object };
    bytes?: Buffer;
  } = {};
  const url = await serverFor(t, (res, req, body) => {
    const headerLength = req.headers['inference-header-content-length'] as string;
    seen = {
      headerLength,
      header: JSON.parse(body.subarray(0, Number(headerLength)).toString()),
      bytes: body.subarray(Number(headerLength)),
    };
    binaryAnswer(
      res,
      { parameters: { agent: 'agent-x' }, outputs: [{ name: 'y', shape: [3], datatype: 'FP32', parameters: { binary_data_size: 12 } }] },
      Buffer.from(values.buffer),
    );
  });
  const result = await kserveInfer(url, 'kws', inputs, 1_000);
  const input = inputs['onnx::Flatten_0']!;
  assert.deepEqual(seen.header?.parameters, { deadline_ms: 1_000, binary_data_output: true });
  assert.deepEqual(
    seen.header?.inputs.map((i) => [i.name, i.parameters.binary_data_size]),
    [['onnx::Flatten_0', input.data.byteLength]],
  );
  assert.ok(
    seen.bytes?.equals(Buffer.from(input.data.buffer, input.data.byteOffset, input.data.byteLength)),
    'the tensor bytes follow the header',
  );
  assert.equal(result.agentId, 'agent-x');
  assert.deepEqual(Array.from(result.outputs.y!.data as Float32Array), [0.25, -1.5, 3]);

  // json: true sends JSON tensors and asks for none in binary.
  const jsonUrl = await serverFor(t, (res, req, body) => {
    assert.equal(req.headers['inference-header-content-length'], undefined);
    const parsed = JSON.parse(body.toString()) as { inputs: { data: number[] }[]; parameters: object };
    assert.equal(parsed.inputs[0]!.data.length, input.data.length);
    assert.deepEqual(parsed.parameters, { deadline_ms: 1_000 });
    res.writeHead(200, { 'content-type': 'application/json' });
    res.end(JSON.stringify({ outputs: [{ name: 'y', shape: [2], datatype: 'FP32', data: [1, 2] }] }));
  });
  const viaJson = await kserveInfer(jsonUrl, 'kws', inputs, 1_000, undefined, { json: true });
  assert.deepEqual(Array.from(viaJson.outputs.y!.data as Float32Array), [1, 2]);
});

test('a binary answer whose lengths lie is MESH_BAD_REQUEST, never a tensor read from the wrong bytes', async (t) => {
  const out = (size: unknown) => ({ outputs: [{ name: 'y', shape: [2], datatype: 'FP32', parameters: { binary_data_size: size } }] });
  const cases: [string, (res: http.ServerResponse) => void][] = [
    ['header length past the body', (res) => binaryAnswer(res, out(8), Buffer.alloc(8), 10_000)],
    ['header length not a number', (res) => binaryAnswer(res, out(8), Buffer.alloc(8), Number.NaN)],
    ['an output larger than the bytes left', (res) => binaryAnswer(res, out(8), Buffer.alloc(4))],
    ['a negative size', (res) => binaryAnswer(res, out(-8), Buffer.alloc(8))],
    ['bytes left over after the outputs', (res) => binaryAnswer(res, out(8), Buffer.alloc(12))],
  ];
  for (const [what, answer] of cases) {
    const url = await serverFor(t, answer);
    const err = await failure(url, 1_000);
    assert.equal(err.code, 'MESH_BAD_REQUEST', `${what}: ${err.message}`);
  }
  // Outputs that are not objects with names.
  for (const body of ['{"outputs":[null]}', '{"outputs":{"y":1}}', '{"outputs":[{"shape":[1]}]}']) {
    const url = await serverFor(t, (res) => {
      res.writeHead(200, { 'content-type': 'application/json' });
      res.end(body);
    });
    assert.equal((await failure(url, 1_000)).code, 'MESH_BAD_REQUEST', body);
  }
  // A size that matches but a shape that does not: the tensor check refuses it.
  const url = await serverFor(t, (res) => binaryAnswer(res, out(4), Buffer.alloc(4)));
  assert.equal((await failure(url, 1_000)).code, 'MESH_BAD_TENSOR');
});
