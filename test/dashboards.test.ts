/**
 * The Grafana dashboard (packaging/grafana/edge-mesh.json) and the Prometheus alert rules
 * (packaging/prometheus/edge-mesh-rules.yml) cannot go stale: every metric their queries name is one a running
 * router, agent or broker exports (or, for the metrics a part registers only on some hosts or with payments, one its
 * metrics module registers); the rules pass `promtool check rules`, and `promtool test rules` shows the key alerts
 * fire on the series that should fire them and stay quiet otherwise. docs/operations.md, "Metrics".
 */
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { readFile, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { test } from 'node:test';
import { fileURLToPath } from 'node:url';
import { sampleInputs } from '@edge-mesh/demo';
import { encodeMessage, generateIdentity, type ModelInfo, topics } from '@edge-mesh/protocol';
import { StatusBoard } from '../edge-agent/src/status.ts';
import { agentFor, brokerFor, kwsOnlyDir, rawClient, routerFor, tempDir } from './helpers.ts';

const ROOT = path.join(path.dirname(fileURLToPath(import.meta.url)), '..');
const DASHBOARD = path.join(ROOT, 'packaging/grafana/edge-mesh.json');
const RULES = path.join(ROOT, 'packaging/prometheus/edge-mesh-rules.yml');
const METRICS_SOURCES = ['router/src/http.ts', 'edge-agent/src/metrics.ts', 'broker/src/metrics.ts'];

const NO_PROMTOOL = spawnSync('promtool', ['--version']).error
  ? 'promtool is not installed (Debian package `prometheus`; .ci/run installs it): cannot check the alert rules'
  : false;

const PROMQL_WORDS = new Set([
  'by',
  'without',
  'on',
  'ignoring',
  'group_left',
  'group_right',
  'and',
  'or',
  'unless',
  'bool',
  'offset',
  'inf',
  'nan',
  'le',
]);

/**
 * The metric names a PromQL expression reads. Strings, label matchers, ranges and grouping clauses are cut out
 * first; what is left are function names (followed by `(`), operators, numbers, keywords and metric names.
 */
function metricNames(expr: string): string[] {
  const bare = expr
    .replace(/"(?:[^"\\]|\\.)*"/g, '""')
    .replace(/\{[^}]*\}/g, ' ')
    .replace(/\[[^\]]*\]/g, ' ')
    .replace(/\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)/g, ' ');
  const names: string[] = [];
  for (const m of bare.matchAll(/(?<![\w$.])([a-zA-Z_:][a-zA-Z0-9_:]*)(\s*\()?/g)) {
    if (m[2] !== undefined || PROMQL_WORDS.has(m[1]!)) continue;
    names.push(m[1]!);
  }
  return names;
}

/** Every PromQL expression in the dashboard: panel targets and the template variables' label_values queries. */
async function dashboardExprs(): Promise<string[]> {
  const dash = JSON.parse(await readFile(DASHBOARD, 'utf8')) as {
    panels: { type: string; targets?: { expr: string }[] }[];
    templating: { list: { type: string; definition?: string }[] };
  };
  const exprs = dash.panels.flatMap((p) => (p.targets ?? []).map((t) => t.expr));
  for (const v of dash.templating.list) {
    if (v.type !== 'query') continue;
    const m = /^label_values\(([^,]+),\s*\w+\)$/.exec(v.definition ?? '');
    assert.ok(m, `template variable query not understood: ${v.definition}`);
    exprs.push(m[1]!);
  }
  return exprs;
}

/** The `expr:` of every rule, one line or a `|` block. */
async function ruleExprs(): Promise<string[]> {
  const lines = (await readFile(RULES, 'utf8')).split('\n');
  const out: string[] = [];
  for (let i = 0; i < lines.length; i++) {
    const m = /^(\s*)expr:\s*(.*)$/.exec(lines[i]!);
    if (!m) continue;
    if (m[2] !== '|') {
      out.push(m[2]!);
      continue;
    }
    const block: string[] = [];
    while (i + 1 < lines.length && (lines[i + 1]!.trim() === '' || lines[i + 1]!.search(/\S/) > m[1]!.length)) block.push(lines[++i]!);
    out.push(block.join('\n'));
  }
  return out;
}

/** The names each part's metrics module registers, from its source (including those registered only sometimes). */
async function registeredNames(): Promise<Set<string>> {
  const names = new Set<string>();
  for (const file of METRICS_SOURCES) {
    const text = await readFile(path.join(ROOT, file), 'utf8');
    for (const m of text.matchAll(/'(edge_mesh_[a-z0-9_]+)'/g)) names.add(m[1]!);
  }
  return names;
}

async function scrapeNames(url: string): Promise<Set<string>> {
  const res = await fetch(url);
  assert.equal(res.status, 200, url);
  const names = new Set<string>();
  for (const line of (await res.text()).split('\n')) {
    const m = /^([a-zA-Z_:][a-zA-Z0-9_:]*)[{ ]/.exec(line);
    if (m) names.add(m[1]!);
  }
  return names;
}

test('metricNames reads the metric names out of PromQL', () => {
  assert.deepEqual(
    metricNames(
      'sum by (model) (rate(a_total{via="forward", outcome!="ok"}[5m])) / on (instance) group_left histogram_quantile(0.99, b_bucket) > 0.5 and c',
    ),
    ['a_total', 'b_bucket', 'c'],
  );
  assert.deepEqual(metricNames('edge_mesh_agent_throttled_flags % 16 > 0'), ['edge_mesh_agent_throttled_flags']);
  assert.deepEqual(metricNames('rate(x[$__rate_interval]) / 1e6'), ['x']);
});

test('every metric the dashboard and the alert rules query is one the parts export', { timeout: 120_000 }, async (t) => {
  const broker = await brokerFor(t, { metricsPort: 0 });
  const agent = await agentFor(t, { brokerUrl: broker.url, modelsDir: await kwsOnlyDir(t), metricsPort: 0 });
  const router = await routerFor(t, broker.url, { http: { port: 0 } });
  await router.waitForModel('kws', 10_000);
  // One request so the histograms have series.
  await router.infer('kws', sampleInputs('kws', 0), { deadlineMs: 5_000 });
  const http = router.http!;

  const scraped = new Set<string>();
  for (const url of [`${http.url}/metrics`, agent.metricsUrl!, broker.metricsUrl!]) for (const n of await scrapeNames(url)) scraped.add(n);
  const registered = await registeredNames();
  // The source scan finds every mesh metric the running parts export, so it is a fair list of the ones they do not
  // export here (temperature, throttling, payments).
  for (const n of scraped) {
    if (!n.startsWith('edge_mesh_')) continue;
    const base = n.replace(/_(bucket|count|sum)$/, '');
    assert.ok(registered.has(n) || registered.has(base), `${n} is exported but the source scan missed it`);
  }
  const exported = (name: string) =>
    scraped.has(name) ||
    registered.has(name) ||
    (/_(bucket|count|sum)$/.test(name) && registered.has(name.replace(/_(bucket|count|sum)$/, '')));

  const dashboard = (await dashboardExprs()).flatMap(metricNames);
  const rules = (await ruleExprs()).flatMap(metricNames);
  assert.ok(new Set(dashboard).size >= 25, `the dashboard names only ${new Set(dashboard).size} metrics`);
  assert.ok(new Set(rules).size >= 10, `the rules name only ${new Set(rules).size} metrics`);
  const stale = [...new Set([...dashboard, ...rules])].filter((n) => !exported(n));
  assert.deepEqual(stale, [], 'queried but exported by no part');
  // Every mesh metric a part exports has a place on the dashboard.
  const unshown = [...registered].filter((n) => !dashboard.some((d) => d === n || d.replace(/_(bucket|count|sum)$/, '') === n));
  assert.deepEqual(unshown, [], 'exported but not on the dashboard');

  // The live-agents gauge the "no live agent" alert reads: 1 while the agent serves, 0 once it has gone.
  const liveAgents = async () => {
    const text = await (await fetch(`${http.url}/metrics`)).text();
    return /^edge_mesh_model_live_agents\{model="kws"\} (\d+)$/m.exec(text)?.[1];
  };
  assert.equal(await liveAgents(), '1');
  await agent.close();
  const until = Date.now() + 10_000;
  while ((await liveAgents()) !== '0') {
    assert.ok(Date.now() < until, 'the live-agents gauge did not drop to 0');
    await new Promise((r) => setTimeout(r, 100));
  }
});

test('agents announcing made-up model names cannot grow the live-agents series past 256', { timeout: 60_000 }, async (t) => {
  const broker = await brokerFor(t);
  const router = await routerFor(t, broker.url, { http: { port: 0 } });
  // Two lying agents, 200 names each (a status holds at most 256).
  for (const who of ['a', 'b']) {
    const identity = generateIdentity('agent');
    const models: ModelInfo[] = Array.from({ length: 200 }, (_, i) => ({
      name: `junk-${who}-${i}`,
      version: '1',
      sha256: '0'.repeat(64),
      priceMicros: 0,
      latencyMs: 1,
      inputs: [],
      outputs: [],
    }));
    const board = new StatusBoard({
      identity,
      models,
      hardware: { platform: 'linux', arch: 'arm64', cpus: 4, cpuModel: 'x', memoryMb: 512 },
      providers: ['cpu'],
      workers: 1,
      queueLimit: 8,
    });
    const raw = await rawClient(t, broker.url, identity);
    raw.client.publish(topics.agentStatus(identity.id), encodeMessage(board.status()), { qos: 1, retain: true });
  }
  const until = Date.now() + 10_000;
  while (router.agents().length < 2) {
    assert.ok(Date.now() < until, 'the router did not see both agents');
    await new Promise((r) => setTimeout(r, 50));
  }
  const text = await (await fetch(`${router.http!.url}/metrics`)).text();
  const series = text.split('\n').filter((l) => l.startsWith('edge_mesh_model_live_agents{'));
  assert.equal(series.length, 256);
  // The router still answers.
  assert.equal((await fetch(`${router.http!.url}/v2/health/live`)).status, 200);
});

test('the alert rules pass promtool and fire on the series they are for', { skip: NO_PROMTOOL, timeout: 60_000 }, async (t) => {
  const check = spawnSync('promtool', ['check', 'rules', RULES], { encoding: 'utf8' });
  assert.equal(check.status, 0, `${check.stdout}${check.stderr}`);
  assert.match(check.stdout, /SUCCESS: \d+ rules found/);

  const dir = await tempDir(t, 'edge-mesh-rules-');
  const spec = path.join(dir, 'rules.test.yml');
  // promtool's rule unit tests (https://prometheus.io/docs/prometheus/latest/configuration/unit_testing_rules/).
  await writeFile(
    spec,
    `rule_files:
  - ${JSON.stringify(RULES)}
evaluation_interval: 1m
tests:
  - interval: 1m
    input_series:
      - series: 'edge_mesh_model_live_agents{model="kws",instance="router:8080",job="router"}'
        values: '1 1 0 0 0 0 0'
      - series: 'edge_mesh_model_live_agents{model="yolo",instance="router:8080",job="router"}'
        values: '2 2 2 2 2 2 2'
      - series: 'edge_mesh_agent_throttled_flags{instance="pi1:9101",job="agent"}'
        values: '327685x10'
      - series: 'edge_mesh_agent_throttled_flags{instance="pi2:9101",job="agent"}'
        values: '327680x10'
      - series: 'edge_mesh_routed_requests_total{model="kws",hardware_class="cpu-arm64",via="forward",outcome="ok",instance="router:8080",job="router"}'
        values: '0+90x20'
      - series: 'edge_mesh_routed_requests_total{model="kws",hardware_class="none",via="forward",outcome="MESH_NO_AGENT",instance="router:8080",job="router"}'
        values: '0+10x20'
      - series: 'edge_mesh_broker_connect_refusals_total{reason="bad-token",code="MESH_UNAUTHORIZED",instance="broker:9100",job="broker"}'
        values: '0+600x20'
    alert_rule_test:
      - eval_time: 5m
        alertname: EdgeMeshNoLiveAgent
        exp_alerts:
          - exp_labels: { severity: critical, model: kws }
            exp_annotations:
              summary: "No live agent serves model kws"
              description: "Every agent that announced kws is offline or silent; requests for it fail with MESH_NO_AGENT or MESH_UNKNOWN_MODEL."
      - eval_time: 1m
        alertname: EdgeMeshNoLiveAgent
        exp_alerts: []
      - eval_time: 6m
        alertname: EdgeMeshAgentThrottled
        exp_alerts:
          - exp_labels: { severity: warning, instance: "pi1:9101", job: agent }
            exp_annotations:
              summary: "Agent pi1:9101 is throttled now (vcgencmd flags 5)"
              description: "Bit 1 under-voltage (check the power supply), 2 frequency capped, 4 throttled, 8 soft temperature limit."
      - eval_time: 15m
        alertname: EdgeMeshErrorRatioHigh
        exp_alerts:
          - exp_labels: { severity: warning, model: kws }
            exp_annotations:
              summary: "10% of requests for kws fail"
              description: "More than 5% of forwarded requests ended with a MESH_* code over 10 minutes; the dashboard's 'Routed errors by code' panel names the codes (docs/errors.md)."
      - eval_time: 10m
        alertname: EdgeMeshBrokerAuthFailureStorm
        exp_alerts:
          - exp_labels: { severity: warning, instance: "broker:9100" }
            exp_annotations:
              summary: "Broker broker:9100 refuses 10 CONNECTs a second for bad credentials"
              description: "A device with a stale key, or someone guessing. The broker bans and limits the senders; see 'Refused CONNECTs by reason and code'."
`,
  );
  const run = spawnSync('promtool', ['test', 'rules', spec], { encoding: 'utf8' });
  assert.equal(run.status, 0, `${run.stdout}${run.stderr}`);
  assert.match(run.stdout, /SUCCESS/);
});
