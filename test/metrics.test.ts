/**
 * Metrics on every part (issue 15, docs/operations.md "Metrics"): a real broker, two agents and a router serving
 * leased (SDK direct mode) and HTTP traffic; each /metrics passes `promtool check metrics` with no finding, the
 * leased and the HTTP requests are counted by the router and by the agents, and the router labels nothing by agent.
 */
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { readFile, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { test } from 'node:test';
import { pathToFileURL } from 'node:url';
import { deployMesh, startLocalChain } from '@edge-mesh/contracts/dev';
import { sampleInputs } from '@edge-mesh/demo';
import { generateIdentity, tensorToJson } from '@edge-mesh/protocol';
import { hardwareClassOf } from '@edge-mesh/router';
import { ethers } from 'ethers';
import mqtt from 'mqtt';
import { agentFor, brokerFor, kwsOnlyDir, meshFor, routerFor, spawnAgent, tempDir, waitFor } from './helpers.ts';
import { fundOwnLane, TestPayer } from './payer.ts';

const PROMTOOL = spawnSync('promtool', ['--version'], { encoding: 'utf8' });
const NO_PROMTOOL = PROMTOOL.error
  ? 'promtool is not installed (Debian package `prometheus`; .ci/run installs it): cannot check the metrics text'
  : false;

interface Sample {
  name: string;
  labels: Record<string, string>;
  value: number;
}

/** The samples of a Prometheus text (the label values here carry no escaped quotes). */
function samples(text: string): Sample[] {
  const out: Sample[] = [];
  for (const line of text.split('\n')) {
    if (line === '' || line.startsWith('#')) continue;
    const m = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$/.exec(line);
    assert.ok(m, `not a sample line: ${line}`);
    const labels: Record<string, string> = {};
    for (const l of (m[2] ?? '').matchAll(/([a-zA-Z_][a-zA-Z0-9_]*)="([^"]*)"/g)) labels[l[1]!] = l[2]!;
    out.push({ name: m[1]!, labels, value: Number(m[3]) });
  }
  return out;
}

const sum = (all: Sample[], name: string, where: Record<string, string> = {}) =>
  all.filter((s) => s.name === name && Object.entries(where).every(([k, v]) => s.labels[k] === v)).reduce((a, s) => a + s.value, 0);

async function scrape(url: string): Promise<string> {
  const res = await fetch(url);
  assert.equal(res.status, 200, url);
  assert.match(res.headers.get('content-type') ?? '', /^text\/plain/);
  return res.text();
}

/** `promtool check metrics` on stdin: exit 0 and nothing reported. */
function assertPromtoolClean(text: string, part: string): void {
  const run = spawnSync('promtool', ['check', 'metrics'], { input: text, encoding: 'utf8' });
  assert.equal(run.status, 0, `${part}: promtool exited ${run.status}: ${run.stdout}${run.stderr}`);
  assert.equal(`${run.stdout}${run.stderr}`.trim(), '', `${part}: promtool findings`);
}

test('router, agents and broker /metrics pass promtool while serving leased and HTTP traffic; leased requests are counted', {
  timeout: 120_000,
  skip: NO_PROMTOOL,
}, async (t) => {
  const broker = await brokerFor(t, { metricsPort: 0 });
  assert.ok(broker.metricsUrl);
  const dir = await kwsOnlyDir(t);
  const agents = [
    await agentFor(t, { brokerUrl: broker.url, modelsDir: dir, metricsPort: 0 }),
    await agentFor(t, { brokerUrl: broker.url, modelsDir: dir, metricsPort: 0 }),
  ];
  for (const a of agents) assert.match(a.metricsUrl ?? '', /^http:\/\/127\.0\.0\.1:\d+\/metrics$/);
  const router = await routerFor(t, broker.url, { leaseTtlMs: 200, http: { port: 0 } });
  await router.waitForModel('kws', 10_000, 2);
  const http = router.http!;

  // Leased traffic: the SDK asks the router for route leases and sends straight to the agents.
  const mesh = await meshFor(t, { brokerUrl: broker.url, router: router.id });
  await mesh.waitForModel('kws', 10_000, 2);
  let leased = 0;
  for (let i = 0; i < 30; i++) {
    const r = await mesh.infer('kws', sampleInputs('kws', i), { deadlineMs: 5_000 });
    if (r.routedBy === router.id) leased++;
  }
  assert.ok(leased >= 1, 'no request followed a lease');
  assert.ok(router.counters.leases >= 1);
  assert.equal(router.counters.requests, 0, 'leased requests never go through the router');

  // HTTP traffic through the router.
  const data = tensorToJson(sampleInputs('kws', 1)['onnx::Flatten_0']!).data;
  const HTTP_REQUESTS = 5;
  for (let i = 0; i < HTTP_REQUESTS; i++) {
    const res = await fetch(`${http.url}/v2/models/kws/infer`, {
      method: 'POST',
      headers: { 'content-type': 'application/json' },
      body: JSON.stringify({ inputs: [{ name: 'onnx::Flatten_0', shape: [1, 25, 96], datatype: 'FP32', data }] }),
    });
    assert.equal(res.status, 200, await res.text());
  }
  // A refused CONNECT (MQTT 3.1, level 3) for the broker's refusal counter.
  const old = mqtt.connect(broker.url, { protocolVersion: 3, reconnectPeriod: 0, connectTimeout: 5_000 });
  await new Promise<void>((resolve) => {
    old.once('error', () => resolve());
    old.once('close', () => resolve());
  });
  old.end(true);

  // Router: promtool clean, all routed traffic by model and hardware class, nothing by agent.
  const routerText = await scrape(`${http.url}/metrics`);
  assertPromtoolClean(routerText, 'router');
  const rs = samples(routerText);
  const hw = hardwareClassOf(router.agents()[0]!.status);
  assert.equal(
    sum(rs, 'edge_mesh_routed_requests_total', { via: 'lease', outcome: 'ok', model: 'kws', hardware_class: hw }),
    router.counters.leases,
  );
  assert.equal(
    sum(rs, 'edge_mesh_routed_requests_total', { via: 'forward', outcome: 'ok', model: 'kws', hardware_class: hw }),
    HTTP_REQUESTS,
  );
  assert.equal(sum(rs, 'edge_mesh_request_duration_seconds_count', { model: 'kws', hardware_class: hw }), HTTP_REQUESTS);
  assert.ok(sum(rs, 'edge_mesh_attempt_duration_seconds_count', { model: 'kws', hardware_class: hw, outcome: 'ok' }) >= HTTP_REQUESTS);
  for (const s of rs) {
    for (const [k, v] of Object.entries(s.labels)) {
      assert.notEqual(k, 'agent', `${s.name} has an agent label`);
      assert.ok(!agents.some((a) => a.id === v), `${s.name} carries agent id ${v} in label ${k}`);
    }
  }

  // Agents: promtool clean; their request counts hold the leased and the HTTP requests.
  let servedOk = 0;
  for (const a of agents) {
    const text = await scrape(a.metricsUrl!);
    assertPromtoolClean(text, `agent ${a.id.slice(0, 12)}`);
    const as = samples(text);
    const ok = sum(as, 'edge_mesh_agent_requests_total', { outcome: 'ok' });
    assert.equal(ok, a.counters.served);
    assert.equal(sum(as, 'edge_mesh_agent_queue_duration_seconds_count', { model: 'kws' }), ok);
    assert.equal(sum(as, 'edge_mesh_agent_compute_duration_seconds_count', { model: 'kws' }), ok);
    assert.equal(sum(as, 'edge_mesh_agent_ready_models'), 1);
    assert.equal(as.filter((s) => s.name === 'edge_mesh_agent_pending_requests').length, 1);
    assert.ok(sum(as, 'process_cpu_seconds_total') > 0);
    assert.ok(sum(as, 'process_resident_memory_bytes') > 0);
    servedOk += ok;
  }
  // Hedges and retries may run a request twice: at least every request the clients got an answer for.
  assert.ok(servedOk >= 30 + HTTP_REQUESTS, `agents served ${servedOk} of ${30 + HTTP_REQUESTS}`);

  // Broker: promtool clean; connections, traffic and the refused CONNECT.
  const brokerText = await scrape(broker.metricsUrl!);
  assertPromtoolClean(brokerText, 'broker');
  const bs = samples(brokerText);
  assert.equal(sum(bs, 'edge_mesh_broker_connections'), broker.clientCount());
  assert.ok(broker.clientCount() >= 4);
  assert.ok(sum(bs, 'edge_mesh_broker_messages_received_total') >= 30 + HTTP_REQUESTS);
  assert.ok(sum(bs, 'edge_mesh_broker_messages_sent_total') >= 30 + HTTP_REQUESTS);
  assert.ok(sum(bs, 'edge_mesh_broker_received_bytes_total') > 0 && sum(bs, 'edge_mesh_broker_sent_bytes_total') > 0);
  assert.equal(sum(bs, 'edge_mesh_broker_connect_refusals_total', { reason: 'protocol-version', code: 'MESH_BAD_REQUEST' }), 1, brokerText);

  // Only GET /metrics is served on the metrics ports.
  const other = await fetch(new URL('/other', agents[0]!.metricsUrl!));
  assert.equal(other.status, 404);
  await other.text();
});

test('a bad or busy metrics port is a coded MESH_CONFIG, and what keeps running keeps serving', async (t) => {
  const broker = await brokerFor(t, { metricsPort: 0 });
  const taken = Number(new URL(broker.metricsUrl!).port);
  const dir = await kwsOnlyDir(t);
  await assert.rejects(
    agentFor(t, { brokerUrl: broker.url, modelsDir: dir, metricsPort: taken }),
    (err: { code?: string }) => err.code === 'MESH_CONFIG',
  );
  const isConfig = (err: { code?: string }) => err.code === 'MESH_CONFIG';
  await assert.rejects(agentFor(t, { brokerUrl: broker.url, modelsDir: dir, metricsPort: 70_000 }), isConfig);
  await assert.rejects(brokerFor(t, { metricsPort: -1 }), isConfig);
  await assert.rejects(brokerFor(t, { metricsPort: taken }), isConfig);
  // The broker keeps serving.
  const res = await fetch(broker.metricsUrl!);
  assert.equal(res.status, 200);
  assert.match(await res.text(), /^edge_mesh_broker_connections 0$/m);
});

test('`edge-mesh agent` loads prom-client only with --metrics-port, and then serves a clean /metrics', { timeout: 120_000 }, async (t) => {
  const broker = await brokerFor(t);
  const dir = await tempDir(t, 'edge-mesh-metrics-');
  // A module resolve hook (node:module register) in the agent process writes down every prom-client file it loads.
  const log = path.join(dir, 'loaded.txt');
  await writeFile(log, '');
  const hook = path.join(dir, 'hook.mjs');
  await writeFile(
    hook,
    `import { appendFileSync } from 'node:fs';
export async function resolve(specifier, context, next) {
  const r = await next(specifier, context);
  if (r.url.includes('/prom-client/')) appendFileSync(${JSON.stringify(log)}, r.url + '\\n');
  return r;
}
`,
  );
  const register = path.join(dir, 'register.mjs');
  await writeFile(register, `import { register } from 'node:module';\nregister(${JSON.stringify(pathToFileURL(hook).href)});\n`);
  const models = await kwsOnlyDir(t);
  const before = process.env.NODE_OPTIONS;
  process.env.NODE_OPTIONS = `${before ?? ''} --import ${pathToFileURL(register).href}`.trim();
  let plain: Awaited<ReturnType<typeof spawnAgent>>;
  let metered: Awaited<ReturnType<typeof spawnAgent>>;
  try {
    plain = await spawnAgent(t, broker.url, generateIdentity('agent'), ['--models', models]);
    assert.equal(await readFile(log, 'utf8'), '', 'an agent without --metrics-port loaded prom-client');
    metered = await spawnAgent(t, broker.url, generateIdentity('agent'), ['--models', models, '--metrics-port', '0']);
  } finally {
    if (before === undefined) delete process.env.NODE_OPTIONS;
    else process.env.NODE_OPTIONS = before;
  }
  assert.match(await readFile(log, 'utf8'), /prom-client/, 'the hook saw the metered agent load prom-client');
  const url = /"url":"(http:[^"]+\/metrics)","msg":"metrics listening"/.exec(metered.stderrText())?.[1];
  assert.ok(url, metered.stderrText());
  const text = await scrape(url);
  assert.match(text, /^edge_mesh_agent_ready_models 1$/m);
  if (!NO_PROMTOOL) assertPromtoolClean(text, 'CLI agent');
  assert.ok(!plain.stderrText().includes('metrics listening'));
});

test('with payments on, the agent exports its receipts, what lanes owe and what vouchers pay', { timeout: 120_000 }, async (t) => {
  const chain = await startLocalChain({ accounts: 3 });
  t.after(() => chain.close());
  const deployment = await deployMesh(chain.wallet(0), { thawSeconds: 3_600 });
  const domain = { chainId: deployment.chainId, escrow: deployment.escrow };
  const broker = await brokerFor(t);
  const payout = ethers.Wallet.createRandom().address.toLowerCase();
  const agent = await agentFor(t, {
    brokerUrl: broker.url,
    modelsDir: await kwsOnlyDir(t),
    metricsPort: 0,
    payment: { payout, domain, dataDir: await tempDir(t), provider: chain.provider, fundsPollMs: 100 },
  });
  const KWS = 2; // micro-dollars per kws inference (its manifest price)
  const n = 3;
  const wallet = chain.wallet(1);
  await fundOwnLane(wallet, deployment.escrow, payout, BigInt(10 * n * KWS));
  const payer = await TestPayer.open(t, broker.url, { wallet, domain, clientId: 'app-metrics' });
  await payer.waitForModel('kws');
  for (let i = 0; i < n; i++) {
    const reply = await payer.request('kws', sampleInputs('kws', i));
    assert.equal(reply.kind, 'res');
    await waitFor(() => agent.payments!.lanes()[0]?.paidMicros === payer.lanesView()[0]!.owedMicros, 3_000, 'the voucher');
  }
  const text = await scrape(agent.metricsUrl!);
  if (!NO_PROMTOOL) assertPromtoolClean(text, 'paid agent');
  const as = samples(text);
  assert.equal(sum(as, 'edge_mesh_agent_receipts_total'), agent.payments!.counters.receipts);
  assert.ok(agent.payments!.counters.receipts >= n);
  assert.equal(sum(as, 'edge_mesh_agent_owed_micro_dollars'), n * KWS);
  assert.equal(sum(as, 'edge_mesh_agent_vouched_micro_dollars'), n * KWS);
  // No settler configured: no settled gauge.
  assert.ok(!as.some((s) => s.name === 'edge_mesh_agent_settled_micro_dollars'));
});
