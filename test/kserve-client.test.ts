/**
 * The sample app's KServe client (demo/src/kserve-client.ts) against routers that misbehave over HTTP: every failure
 * is a MeshError with a mesh code, never fetch's DOM code (a timeout is DOMException code 23, issue 13).
 */
import assert from 'node:assert/strict';
import http from 'node:http';
import type { AddressInfo } from 'node:net';
import { type TestContext, test } from 'node:test';
import { kserveInfer, sampleInputs } from '@edge-mesh/demo';
import { MeshError } from '@edge-mesh/protocol';

/** A real HTTP server on port 0 whose answer to every request is `answer`. */
async function serverFor(t: TestContext, answer: (res: http.ServerResponse) => void): Promise<string> {
  const server = http.createServer((req, res) => {
    req.resume();
    req.on('end', () => answer(res));
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
