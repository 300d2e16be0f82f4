/** The router's HTTP API (KServe v2 JSON, operator endpoints, Prometheus metrics) on a real broker, agent and router. */
import assert from 'node:assert/strict';
import { after, before, describe, type TestContext, test } from 'node:test';
import { connectRpc, deployMesh, type LocalChain, type MeshDeployment, startLocalChain } from '@edge-mesh/contracts/dev';
import { sampleInputs } from '@edge-mesh/demo';
import { ERROR_CODES, generateIdentity, isMeshErrorCode, tensorToJson } from '@edge-mesh/protocol';
import {
  hardwareClassOf,
  KSERVE_TO_DTYPE,
  kserveDatatypeOf,
  type RouterHandle,
  type RouterHttpHandle,
  startRouter,
  startRouterHttp,
} from '@edge-mesh/router';
import { agentFor, brokerFor, meshFor, quiet } from './helpers.ts';

const PROM_LINE = /^[a-zA-Z_:][a-zA-Z0-9_:]*(\{.*\})? ([-+0-9.eE]+|NaN|[+-]Inf)$/;

async function meshWithHttp(t: TestContext): Promise<{ brokerUrl: string; agentId: string; router: RouterHandle; http: RouterHttpHandle }> {
  const broker = await brokerFor(t);
  const agent = await agentFor(t, { brokerUrl: broker.url });
  const router = await startRouter({ brokerUrl: broker.url, identity: generateIdentity('router'), logger: quiet });
  t.after(() => router.close());
  const http = await startRouterHttp(router, { port: 0 });
  t.after(() => http.close());
  await router.waitForModel('kws', 10_000);
  return { brokerUrl: broker.url, agentId: agent.id, router, http };
}

// biome-ignore lint/suspicious/noExplicitAny: HTTP bodies, read field by field in the assertions
async function getJson(url: string, init?: RequestInit): Promise<{ status: number; body: any }> {
  const res = await fetch(url, init);
  return { status: res.status, body: await res.json() };
}

/**
 * The one error body shape (docs/errors.md): `error` (the KServe v2 field) and `code` always, `details` an object
 * when present, nothing else; the status is the code's.
 */
// biome-ignore lint/suspicious/noExplicitAny: an HTTP body, read field by field
function assertErrorBody(res: { status: number; body: any }, code: string, what: string): Record<string, unknown> | undefined {
  assert.equal(res.body?.code, code, `${what}: ${JSON.stringify(res.body)}`);
  assert.ok(isMeshErrorCode(code));
  assert.equal(res.status, ERROR_CODES[code].httpStatus, `${what}: the status is the code's`);
  assert.equal(typeof res.body.error, 'string', what);
  assert.ok(res.body.error.length > 0, what);
  assert.deepEqual(
    Object.keys(res.body).filter((k) => k !== 'error' && k !== 'code' && k !== 'details'),
    [],
    `${what}: no other fields`,
  );
  if ('details' in res.body) assert.ok(res.body.details !== null && typeof res.body.details === 'object', what);
  return res.body.details;
}

const post = (body: unknown): RequestInit => ({
  method: 'POST',
  headers: { 'content-type': 'application/json' },
  body: typeof body === 'string' ? body : JSON.stringify(body),
});

describe('router HTTP API', { timeout: 120_000 }, () => {
  test('health, model metadata, a KServe infer equal to a direct infer, errors, operator endpoints and /metrics', async (t) => {
    const { brokerUrl, agentId, router, http } = await meshWithHttp(t);
    const base = http.url;

    assert.deepEqual(await getJson(`${base}/v2/health/live`), { status: 200, body: { live: true } });
    assert.deepEqual(await getJson(`${base}/v2/health/ready`), { status: 200, body: { ready: true } });

    const meta = await getJson(`${base}/v2/models/kws`);
    assert.equal(meta.status, 200);
    assert.equal(meta.body.name, 'kws');
    assert.equal(meta.body.platform, 'onnx');
    assert.ok(Array.isArray(meta.body.versions) && meta.body.versions.length === 1);
    const input = meta.body.inputs.find((i: { name: string }) => i.name === 'onnx::Flatten_0');
    assert.ok(input, JSON.stringify(meta.body.inputs));
    assert.equal(input.datatype, 'FP32');
    assert.deepEqual(input.shape.slice(1), [25, 96]);
    assert.ok(meta.body.outputs.length >= 1);
    for (const o of meta.body.outputs) assert.equal(typeof o.datatype, 'string');
    assert.deepEqual(await getJson(`${base}/v2/models/kws/ready`), { status: 200, body: { name: 'kws', ready: true } });

    // The KServe request and a direct call with the very same numbers.
    const inputs = sampleInputs('kws', 7);
    assert.deepEqual(Object.keys(inputs), ['onnx::Flatten_0']);
    const tensor = inputs['onnx::Flatten_0']!;
    assert.deepEqual(tensor.shape, [1, 25, 96]);
    const data = tensorToJson(tensor).data;
    assert.equal(data.length, 2400);
    const res = await getJson(
      `${base}/v2/models/kws/infer`,
      post({ id: 'req-1', inputs: [{ name: 'onnx::Flatten_0', shape: [1, 25, 96], datatype: 'FP32', data }] }),
    );
    assert.equal(res.status, 200, JSON.stringify(res.body));
    assert.equal(res.body.model_name, 'kws');
    assert.equal(res.body.id, 'req-1');

    const viaRouter = await router.infer('kws', sampleInputs('kws', 7), { deadlineMs: 10_000 });
    const mesh = await meshFor(t, { brokerUrl });
    await mesh.waitForModel('kws', 10_000);
    const direct = await mesh.infer('kws', sampleInputs('kws', 7), { deadlineMs: 10_000 });
    for (const expected of [viaRouter.outputs, direct.outputs]) {
      assert.deepEqual(res.body.outputs.map((o: { name: string }) => o.name).sort(), Object.keys(expected).sort());
      for (const out of res.body.outputs) {
        const want = expected[out.name]!;
        assert.equal(out.datatype, 'FP32');
        assert.deepEqual(out.shape, want.shape);
        assert.deepEqual(out.data, Array.from(want.data as Float32Array));
      }
    }

    // Errors carry a MESH_* code and its status.
    const unknown = await getJson(
      `${base}/v2/models/no-such-model/infer`,
      post({ inputs: [{ name: 'x', shape: [1], datatype: 'FP32', data: [1] }] }),
    );
    assert.ok(
      (unknown.status === 404 && unknown.body.code === 'MESH_UNKNOWN_MODEL') ||
        (unknown.status === 503 && unknown.body.code === 'MESH_NO_AGENT'),
      JSON.stringify(unknown),
    );
    assert.equal(typeof unknown.body.error, 'string');
    assert.equal(assertErrorBody(unknown, unknown.body.code, 'infer, unknown model')?.model, 'no-such-model');
    const unknownMeta = await getJson(`${base}/v2/models/no-such-model`);
    assert.equal(unknownMeta.status, 404);
    assert.equal(unknownMeta.body.code, 'MESH_UNKNOWN_MODEL');
    assert.deepEqual(assertErrorBody(unknownMeta, 'MESH_UNKNOWN_MODEL', 'metadata, unknown model'), { model: 'no-such-model' });

    const malformed = [
      '{"inputs": [',
      { inputs: 'nope' },
      { inputs: [] },
      { inputs: [{ name: 'onnx::Flatten_0', shape: [1, 25, 96], datatype: 'FP99', data: [] }] },
      { inputs: [{ name: 'onnx::Flatten_0', shape: [1, 25, -96], datatype: 'FP32', data: [] }] },
    ];
    for (const body of malformed) {
      const bad = await getJson(`${base}/v2/models/kws/infer`, post(body));
      assert.equal(bad.status, 400, JSON.stringify(body));
      assert.equal(bad.body.code, 'MESH_BAD_REQUEST', JSON.stringify(bad.body));
      assertErrorBody(bad, 'MESH_BAD_REQUEST', JSON.stringify(body));
    }
    // Well-formed JSON, but the data do not fill the shape: a bad tensor.
    const short = await getJson(
      `${base}/v2/models/kws/infer`,
      post({ inputs: [{ name: 'onnx::Flatten_0', shape: [1, 25, 96], datatype: 'FP32', data: [1, 2, 3] }] }),
    );
    assert.equal(short.status, 400);
    assert.equal(short.body.code, 'MESH_BAD_TENSOR');
    assertErrorBody(short, 'MESH_BAD_TENSOR', 'short data');
    // Operator endpoints.
    const agents = await getJson(`${base}/v1/agents`);
    assert.equal(agents.status, 200);
    assert.equal(agents.body.agents.length, 1);
    assert.equal(agents.body.agents[0].id, agentId);
    assert.equal(agents.body.agents[0].up, true);
    assert.ok(agents.body.agents[0].models.some((m: { name: string }) => m.name === 'kws'));
    assert.equal(typeof agents.body.agents[0].load.outstanding, 'number');
    const routing = await getJson(`${base}/v1/routing`);
    assert.equal(routing.status, 200);
    assert.equal(routing.body.counters.ok, 2);
    assert.equal(routing.body.policy, 'ours');
    assert.equal(routing.body.counters.silenced, 0);

    // Prometheus text.
    const metricsRes = await fetch(`${base}/metrics`);
    assert.equal(metricsRes.status, 200);
    assert.match(metricsRes.headers.get('content-type') ?? '', /^text\/plain/);
    const text = await metricsRes.text();
    for (const line of text.split('\n')) {
      if (line === '' || line.startsWith('#')) continue;
      assert.match(line, PROM_LINE);
    }
    assert.match(text, /^# TYPE edge_mesh_request_duration_seconds histogram$/m);
    // Labelled by hardware class, never by agent id; the direct infer above counts as forwarded too.
    const hw = hardwareClassOf(router.agents()[0]!.status);
    assert.ok(text.includes(`edge_mesh_request_duration_seconds_count{model="kws",hardware_class="${hw}"} 2`), text);
    assert.ok(text.includes(`edge_mesh_attempt_duration_seconds_count{model="kws",hardware_class="${hw}",outcome="ok"} 2`), text);
    assert.ok(text.includes(`edge_mesh_routed_requests_total{model="kws",hardware_class="${hw}",via="forward",outcome="ok"} 2`), text);
    assert.ok(!text.includes(agentId), 'no agent id in the metrics');
    assert.match(text, /^edge_mesh_http_infer_requests_total\{model="kws"\} \d+$/m);
    assert.match(text, /^edge_mesh_request_errors_total\{model="kws",code="MESH_BAD_REQUEST"\} 5$/m);
    assert.match(text, /^edge_mesh_request_errors_total\{model="kws",code="MESH_BAD_TENSOR"\} 1$/m);
    assert.match(text, /^edge_mesh_request_errors_total\{model="_unknown",code="MESH_(UNKNOWN_MODEL|NO_AGENT)"\} 2$/m);

    // (After the counters above were read: this one counts as an error too.)
    assertErrorBody(await getJson(`${base}/v2/models/no-such-model/ready`), 'MESH_UNKNOWN_MODEL', 'ready, unknown model');

    // (After the counters too.) 1e400 is valid JSON that parses as Infinity, and 1e39 overflows a float32: a coded 400, never null with 200.
    for (const huge of ['1e400', '-1e400', '1e39']) {
      const data = `[${huge}${',0'.repeat(25 * 96 - 1)}]`;
      const res = await getJson(
        `${base}/v2/models/kws/infer`,
        post(`{"inputs":[{"name":"onnx::Flatten_0","shape":[1,25,96],"datatype":"FP32","data":${data}}]}`),
      );
      assertErrorBody(res, 'MESH_BAD_TENSOR', `an input of ${huge}`);
    }
    const stillServing = await getJson(
      `${base}/v2/models/kws/infer`,
      post({ inputs: [{ name: 'onnx::Flatten_0', shape: [1, 25, 96], datatype: 'FP32', data: new Array(25 * 96).fill(0) }] }),
    );
    assert.equal(stillServing.status, 200, JSON.stringify(stillServing.body));

    await http.close();
    await assert.rejects(fetch(`${base}/v2/health/live`));
  });

  test('startRouter({ http }) serves the API and close() closes it with the router', async (t) => {
    const broker = await brokerFor(t);
    const router = await startRouter({
      brokerUrl: broker.url,
      identity: generateIdentity('router'),
      logger: quiet,
      http: { port: 0, processMetrics: false },
    });
    t.after(() => router.close());
    assert.ok(router.http);
    const url = router.http.url;
    assert.deepEqual(await getJson(`${url}/v2/health/live`), { status: 200, body: { live: true } });
    const routing = await getJson(`${url}/v1/routing`);
    assert.equal(routing.body.router, router.id);
    // The OpenAPI description lists every route with its methods, the infer body schema and error bodies.
    const api = await getJson(`${url}/openapi.json`);
    assert.equal(api.status, 200);
    assert.match(api.body.openapi, /^3\./);
    const paths = api.body.paths as Record<
      string,
      Record<string, { tags?: string[]; requestBody?: unknown; responses?: Record<string, unknown> }>
    >;
    for (const p of [
      '/v2/health/live',
      '/v2/health/ready',
      '/v2/models/{name}',
      '/v2/models/{name}/ready',
      '/v1/agents',
      '/v1/routing',
      '/metrics',
    ])
      assert.ok(paths[p]?.get, `GET ${p} documented`);
    const infer = paths['/v2/models/{name}/infer']?.post;
    assert.ok(infer?.requestBody, 'infer body documented');
    assert.ok(infer?.responses?.['400'] && infer.responses['503'], 'infer errors documented');
    await router.close();
    await assert.rejects(fetch(`${url}/v2/health/live`));
  });

  test('without agents: not ready, infer answers MESH_NO_AGENT; unknown routes 404; datatype mapping', async (t) => {
    const broker = await brokerFor(t);
    const router = await startRouter({ brokerUrl: broker.url, identity: generateIdentity('router'), logger: quiet });
    t.after(() => router.close());
    const http = await startRouterHttp(router, { processMetrics: false });
    t.after(() => http.close());
    const ready = await http.app.inject({ method: 'GET', url: '/v2/health/ready' });
    assert.equal(ready.statusCode, 503);
    assert.equal(ready.json().code, 'MESH_NO_AGENT');
    const noAgent = await http.app.inject({
      method: 'POST',
      url: '/v2/models/kws/infer',
      payload: { inputs: [{ name: 'x', shape: [2], datatype: 'INT64', data: [1, 2] }] },
    });
    assert.equal(noAgent.statusCode, 503);
    assert.equal(noAgent.json().code, 'MESH_NO_AGENT');
    const notFound = await http.app.inject({ method: 'GET', url: '/nope' });
    assert.equal(notFound.statusCode, 404);
    assert.equal(typeof notFound.json().code, 'string');
    assert.equal(notFound.json().code, 'MESH_NOT_FOUND');
    assert.equal(kserveDatatypeOf('float32'), 'FP32');
    assert.equal(kserveDatatypeOf('tensor(int64)'), 'INT64');
    assert.equal(kserveDatatypeOf('bool'), 'BOOL');
    assert.equal(KSERVE_TO_DTYPE.FP16, 'float16');
    const t0 = Date.now();
    await http.close();
    await router.close();
    assert.ok(Date.now() - t0 < 5_000, `closed in ${Date.now() - t0} ms`);
  });
  test('every error has one body shape: bad JSON, schema violation, body too large, unknown route, not ready; documented', async (t) => {
    const broker = await brokerFor(t);
    const router = await startRouter({ brokerUrl: broker.url, identity: generateIdentity('router'), logger: quiet });
    t.after(() => router.close());
    const http = await startRouterHttp(router, { processMetrics: false, bodyLimit: 2048 });
    t.after(() => http.close());
    const base = http.url;
    const infer = `${base}/v2/models/kws/infer`;

    const badJson = assertErrorBody(await getJson(infer, post('{"inputs": [')), 'MESH_BAD_REQUEST', 'bad JSON');
    assert.equal(badJson?.reason, 'FST_ERR_CTP_INVALID_JSON_BODY');
    assertErrorBody(await getJson(infer, post('')), 'MESH_BAD_REQUEST', 'empty JSON body');
    const schema = assertErrorBody(
      await getJson(infer, post({ inputs: [{ name: 'x', shape: [1], datatype: 'FP99', data: [] }] })),
      'MESH_BAD_REQUEST',
      'schema violation',
    );
    assert.equal(schema?.in, 'body');
    assert.deepEqual(
      ((schema?.violations ?? []) as { path: string; keyword: string }[]).map((v) => [v.path, v.keyword]),
      [['/inputs/0/datatype', 'enum']],
    );
    const tooLarge = assertErrorBody(
      await getJson(infer, post({ inputs: [{ name: 'x', shape: [1024], datatype: 'FP32', data: new Array(1024).fill(0.5) }] })),
      'MESH_TOO_LARGE',
      'body over the limit',
    );
    assert.equal(tooLarge?.limitBytes, 2048);
    const route = assertErrorBody(await getJson(`${base}/v2/nope?x=1`, { method: 'DELETE' }), 'MESH_NOT_FOUND', 'unknown route');
    assert.deepEqual(route, { method: 'DELETE', url: '/v2/nope?x=1' });
    assert.deepEqual(assertErrorBody(await getJson(`${base}/v2/health/ready`), 'MESH_NO_AGENT', 'not ready'), {
      ready: false,
      connected: true,
    });
    const noAgent = assertErrorBody(
      await getJson(infer, post({ inputs: [{ name: 'x', shape: [1], datatype: 'FP32', data: [1] }] })),
      'MESH_NO_AGENT',
      'no agent',
    );
    assert.equal(noAgent?.model, 'kws');
    // Bad input changed nothing: the API still serves.
    assert.deepEqual(await getJson(`${base}/v2/health/live`), { status: 200, body: { live: true } });

    // The shape is documented in the OpenAPI description: a component schema, every route's error responses.
    const api = (await getJson(`${base}/openapi.json`)).body;
    const shape = api.components.schemas.HttpError;
    assert.deepEqual(shape.required, ['error', 'code']);
    assert.deepEqual(Object.keys(shape.properties).sort(), ['code', 'details', 'error']);
    assert.match(api.info.description, /"error": "<message>", "code": "MESH_…"/);
    let documented = 0;
    for (const [path, methods] of Object.entries(api.paths as Record<string, Record<string, { responses: Record<string, unknown> }>>)) {
      for (const [method, op] of Object.entries(methods)) {
        for (const status of ['4XX', '5XX']) {
          // biome-ignore lint/suspicious/noExplicitAny: OpenAPI JSON
          const body = (op.responses[status] as any)?.content?.['application/json']?.schema;
          assert.deepEqual(Object.keys(body?.properties ?? {}).sort(), ['code', 'details', 'error'], `${method} ${path} ${status}`);
          documented++;
        }
      }
    }
    assert.ok(documented >= 20, `${documented} error responses documented`);
    // biome-ignore lint/suspicious/noExplicitAny: OpenAPI JSON
    const inferDoc = (api.paths as any)['/v2/models/{name}/infer'].post.responses;
    for (const status of ['400', '404', '413', '429', '500', '502', '503', '504']) assert.ok(inferDoc[status]?.description, status);
  });
});

describe('router HTTP API on a chain', { timeout: 120_000 }, () => {
  let chain: LocalChain;
  let deployment: MeshDeployment;
  before(async () => {
    chain = await startLocalChain({ accounts: 2 });
    deployment = await deployMesh(chain.wallet(0), { thawSeconds: 60 });
  });
  after(() => chain?.close());

  test('a chain that cannot be read answers 503 MESH_CHAIN_UNREACHABLE in the same body shape, and the API keeps serving', async (t) => {
    const broker = await brokerFor(t);
    const router = await startRouter({ brokerUrl: broker.url, identity: generateIdentity('router'), logger: quiet });
    t.after(() => router.close());
    // The router's own provider, so that stopping the node leaves it asking a dead endpoint.
    const provider = connectRpc(chain.rpcUrl, chain.chainId);
    t.after(() => provider.destroy());
    const http = await startRouterHttp(router, {
      processMetrics: false,
      chain: { provider, escrow: deployment.escrow, fromBlock: deployment.deployBlock },
    });
    t.after(() => http.close());
    const base = http.url;
    const lanes = await getJson(`${base}/v1/lanes`);
    assert.equal(lanes.status, 200, JSON.stringify(lanes.body));
    assert.deepEqual(lanes.body.lanes, []);
    const badPayer = assertErrorBody(await getJson(`${base}/v1/settlements?payer=nope`), 'MESH_BAD_REQUEST', 'not an address');
    assert.deepEqual(badPayer, { field: 'payer' });

    await chain.close();
    for (const path of ['/v1/lanes', '/v1/settlements']) {
      const details = assertErrorBody(await getJson(`${base}${path}`), 'MESH_CHAIN_UNREACHABLE', `${path} with the chain gone`);
      assert.match(String(details?.action), /logs$/);
    }
    assert.deepEqual(await getJson(`${base}/v2/health/live`), { status: 200, body: { live: true } });
  });
});
