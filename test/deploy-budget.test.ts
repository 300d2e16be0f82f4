/**
 * The agent's memory budget (docs/deployment.md, "Memory budget"): a deployment that would pass it first evicts the
 * least recently used idle model, which leaves the agent's status; a model with requests queued or running, a running
 * canary and the deployed model's own default version are never evicted; when nothing can make room the step is
 * refused with MESH_TOO_LARGE and the agent serves on as before. Real broker on port 0, router, generated models.
 */
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { writeFile } from 'node:fs/promises';
import { createServer } from 'node:http';
import path from 'node:path';
import { type TestContext, test } from 'node:test';
import type { AgentHandle } from '@edge-mesh/agent';
import { type Deployment, deploymentTopics, encodeMessage, generateIdentity, type Identity, signDeployment } from '@edge-mesh/protocol';
import type { RouterHandle } from '@edge-mesh/router';
import { agentFor, brokerFor, rawClient, routerFor, tempDir, waitFor } from './helpers.ts';
import { SCALE_WIDTH, scaleModel } from './scale-model.ts';

const GROUP = 'edge-pis';
const sha = (b: Buffer) => createHash('sha256').update(b).digest('hex');
const MIB = 2 ** 20;

async function modelsFolder(t: TestContext, models: Record<string, Buffer>): Promise<string> {
  const dir = await tempDir(t);
  const entries = [];
  for (const [name, bytes] of Object.entries(models)) {
    await writeFile(path.join(dir, `${name}.onnx`), bytes);
    entries.push({ name, version: '1', file: `${name}.onnx`, sha256: sha(bytes), priceMicros: 0 });
  }
  await writeFile(path.join(dir, 'manifest.json'), JSON.stringify({ models: entries }));
  return dir;
}

/** Serves bundles by their sha256, as a router's GET /bundles/{sha256} does. */
async function bundleServer(t: TestContext, bundles: Buffer[]): Promise<string> {
  const byHash = new Map(bundles.map((b) => [sha(b), b]));
  const server = createServer((req, res) => {
    const bytes = byHash.get(req.url?.split('/').at(-1) ?? '');
    if (!bytes) res.statusCode = 404;
    res.end(bytes);
  });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  t.after(() => server.close());
  return `http://127.0.0.1:${(server.address() as { port: number }).port}`;
}

function canary(operator: Identity, model: string, seq: number, bytes: Buffer, previous: Buffer): Deployment {
  return {
    v: 1,
    kind: 'deployment',
    operator: operator.id,
    seq,
    issuedAt: Date.now(),
    group: GROUP,
    model,
    version: '2',
    sha256: sha(bytes),
    size: bytes.byteLength,
    priceMicros: 0,
    phase: 'canary',
    previous: { version: '1', sha256: sha(previous) },
    plan: { canaryShare: 0.5, minRequests: 1000, maxErrorRateDelta: 0.01, maxP95LatencyRatio: 2 },
  };
}

async function infer(router: RouterHandle, model: string): Promise<number> {
  const x = new Float32Array(SCALE_WIDTH).fill(1);
  const r = await router.infer(model, { x: { dtype: 'float32', shape: [1, SCALE_WIDTH], data: x } }, { deadlineMs: 10_000 });
  return (r.outputs.y!.data as Float32Array)[0]!;
}

async function setup(t: TestContext, models: Record<string, Buffer>, bundles: Buffer[], memoryBudgetMb: number) {
  const broker = await brokerFor(t);
  const operator = generateIdentity('operator');
  const operators = new Map([[operator.id, operator.publicKey]]);
  const agent = await agentFor(t, {
    brokerUrl: broker.url,
    modelsDir: await modelsFolder(t, models),
    deploy: { operators, groups: [GROUP], stateDir: await tempDir(t), bundleBaseUrls: [await bundleServer(t, bundles)], memoryBudgetMb },
  });
  const router = await routerFor(t, broker.url);
  for (const name of Object.keys(models)) await router.waitForModel(name, 10_000);
  const raw = await rawClient(t, broker.url, 'operator-test');
  let seen = 0;
  /** Publishes a signed step and returns the agent's event for it. */
  const send = async (step: Deployment) => {
    const before = agent.deployments!.events.length;
    raw.client.publish(deploymentTopics.step(GROUP, step.model), encodeMessage(signDeployment(operator, step) as never), {
      qos: 1,
      retain: true,
    });
    await waitFor(() => agent.deployments!.events.length > before, 20_000, `the agent's answer to ${step.model} seq ${step.seq}`);
    await agent.deployments!.settled();
    const events = agent.deployments!.events.slice(seen);
    seen = agent.deployments!.events.length;
    return events;
  };
  return { agent, router, operator, send };
}

const names = (agent: AgentHandle) => (agent.status().models ?? []).map((m) => m.name).sort();

test('a canary over the budget evicts the least recently used idle model; a canary and the own default are never evicted', async (t) => {
  // Each model file is ~0.25 MiB: an estimate of ~0.5 MiB at the default factor 2 and one session copy.
  const a1 = scaleModel(1);
  const a2 = scaleModel(2);
  const c2 = scaleModel(6);
  const { agent, router, operator, send } = await setup(t, { a: a1, b: scaleModel(4), c: scaleModel(5) }, [a2, c2], 1.8);
  const memory = agent.deployments!.memory();
  assert.equal(memory.budgetBytes, Math.floor(1.8 * MIB));
  assert.equal(memory.models.length, 3);
  for (const m of memory.models) assert.ok(m.estimateBytes > 0.5 * MIB && m.estimateBytes < 0.6 * MIB, `${m.key}: ${m.estimateBytes}`);

  // c is used, b is not: b is the least recently used.
  assert.equal(await infer(router, 'c'), 5);
  const events = await send(canary(operator, 'a', 1, a2, a1));
  assert.deepEqual(
    events.map((e) => [e.model, e.ok, e.message.replace(/ \(.*/, '')]),
    [
      ['b', true, 'model evicted for the memory budget'],
      ['a', true, 'deployment step applied: canary'],
    ],
  );
  assert.deepEqual(names(agent), ['a', 'c'], 'b left the status');
  assert.equal(agent.status().canaries?.[0]?.version, '2');
  const after = agent.deployments!.memory();
  assert.ok(after.usedBytes <= after.budgetBytes!, `${after.usedBytes} within ${after.budgetBytes}`);
  assert.deepEqual(after.models.map((m) => m.key).sort(), ['a', 'a@2', 'c']);
  // The evicted model is gone from the router too; the others answer.
  await waitFor(() => !router.models().some((m) => m.name === 'b'), 10_000, 'the router to drop b');
  await assert.rejects(infer(router, 'b'));
  assert.equal(await infer(router, 'c'), 5);
  assert.equal(await infer(router, 'a'), 1);

  // A canary of c now: a runs a canary and c is the model itself, so nothing may leave: refused, nothing changes.
  const refused = await send(canary(operator, 'c', 1, c2, scaleModel(5)));
  assert.equal(refused.length, 1);
  assert.equal(refused[0]!.ok, false);
  assert.equal(refused[0]!.code, 'MESH_TOO_LARGE');
  assert.match(refused[0]!.message, /memory budget/);
  assert.deepEqual(names(agent), ['a', 'c']);
  assert.equal(agent.status().canaries?.length, 1);
  assert.equal(await infer(router, 'c'), 5, 'the agent serves on');
});

test('a model with requests queued or running is not evicted: the step is refused until it is idle', async (t) => {
  const a1 = scaleModel(1);
  const a2 = scaleModel(2);
  // b: two weight matrices (~0.5 MiB file, ~1 MiB estimate) and 3000 MatMuls, slow enough to keep busy.
  const b = scaleModel(4, 3000);
  const { agent, router, operator, send } = await setup(t, { a: a1, b }, [a2], 1.8);
  assert.ok(agent.deployments!.memory().usedBytes <= 1.8 * MIB);

  let running = true;
  const loops = Array.from({ length: 3 }, async () => {
    while (running) await infer(router, 'b');
  });
  await waitFor(() => (agent.loadReport().models?.b?.inFlight ?? 0) > 0, 10_000, 'b to be busy');
  const busy = await send(canary(operator, 'a', 1, a2, a1));
  running = false;
  await Promise.all(loops);
  assert.equal(busy.length, 1);
  assert.equal(busy[0]!.code, 'MESH_TOO_LARGE', busy[0]!.message);
  assert.deepEqual(names(agent), ['a', 'b']);
  assert.equal(agent.status().canaries, undefined);

  // Idle now: the same rollout, as a new step, evicts b.
  const idle = await send(canary(operator, 'a', 2, a2, a1));
  assert.deepEqual(
    idle.map((e) => [e.model, e.ok]),
    [
      ['b', true],
      ['a', true],
    ],
  );
  assert.deepEqual(names(agent), ['a']);
  assert.equal(agent.status().canaries?.[0]?.version, '2');
});
