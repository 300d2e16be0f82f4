/**
 * Model deployment (docs/deployment.md) against the real thing: an embedded broker on port 0, a router with its
 * HTTP API and rollouts, two agents on generated ONNX models, steady load through the router the whole time.
 * Run 1: a canary of version 2 takes its share and is promoted by the router's analysis. Run 2: a slow version 3
 * regresses p95 latency and is rolled back by itself. No request fails in either. Then what a liar could send.
 */
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { writeFile } from 'node:fs/promises';
import { createServer } from 'node:http';
import path from 'node:path';
import { test } from 'node:test';
import type { AgentHandle } from '@edge-mesh/agent';
import {
  type Deployment,
  deploymentTopics,
  encodeMessage,
  generateIdentity,
  type Identity,
  signDeployment,
  signedDeploymentToJson,
} from '@edge-mesh/protocol';
import { DEPLOYMENT_BODY_LIMIT, judgeCanary, type RouterHandle, type VersionWindow } from '@edge-mesh/router';
import { agentFor, brokerFor, rawClient, routerFor, tempDir, waitFor } from './helpers.ts';
import { SCALE_WIDTH, scaleModel } from './scale-model.ts';

const GROUP = 'edge-pis';
const sha = (b: Buffer) => createHash('sha256').update(b).digest('hex');
/**
 * Version 3 (5 000 MatMuls) answers in ~50 ms against ~3-7 ms for the others; 20 ms of slack keeps a busy machine's
 * hiccups in a 40-request sample (two slow answers move its p95) from rolling back version 2.
 */
const PLAN = { canaryShare: 0.3, minRequests: 40, maxErrorRateDelta: 0.05, maxP95LatencyRatio: 3, minP95DeltaMs: 20 };

async function modelsFolder(dir: string, version: string, bytes: Buffer): Promise<void> {
  await writeFile(path.join(dir, 'scale.onnx'), bytes);
  const models = [{ name: 'scale', version, file: 'scale.onnx', sha256: sha(bytes), priceMicros: 0 }];
  await writeFile(path.join(dir, 'manifest.json'), JSON.stringify({ models }));
}

function step(
  operator: Identity,
  fields: Partial<Deployment> & Pick<Deployment, 'seq' | 'version' | 'sha256' | 'size' | 'phase'>,
): Deployment {
  return {
    v: 1,
    kind: 'deployment',
    operator: operator.id,
    issuedAt: Date.now(),
    group: GROUP,
    model: 'scale',
    priceMicros: 0,
    plan: PLAN,
    ...fields,
  };
}

async function post(
  router: RouterHandle,
  route: string,
  body: unknown,
  method = 'POST',
): Promise<{ status: number; json: { code?: string; sha256?: string; size?: number } }> {
  const isBytes = body instanceof Buffer;
  const response = await fetch(`${router.http!.url}${route}`, {
    method,
    headers: { 'content-type': isBytes ? 'application/vnd.edge-mesh.bundle' : 'application/json' },
    body: isBytes ? body : JSON.stringify(body),
  });
  return { status: response.status, json: (await response.json()) as { code?: string; sha256?: string; size?: number } };
}

/** Three callers in a loop through the router; each answer's y[0] is the factor of the version that ran. */
function steadyLoad(router: RouterHandle) {
  const x = new Float32Array(SCALE_WIDTH).fill(1);
  /** `at`: when the request was sent. */
  const answers: { at: number; factor: number }[] = [];
  const failures: string[] = [];
  let running = true;
  const loop = async () => {
    while (running) {
      const sentAt = Date.now();
      try {
        const r = await router.infer('scale', { x: { dtype: 'float32', shape: [1, SCALE_WIDTH], data: x } }, { deadlineMs: 10_000 });
        answers.push({ at: sentAt, factor: (r.outputs.y!.data as Float32Array)[0]! });
      } catch (err) {
        failures.push((err as Error).message);
      }
      // A refusal can come back without a turn of the event loop; yield so timers still run.
      await new Promise((r) => setImmediate(r));
    }
  };
  const loops = [loop(), loop(), loop()];
  return {
    answers,
    failures,
    since: (at: number) => answers.filter((a) => a.at >= at).map((a) => a.factor),
    /** Stops the callers; a request still unsettled 15 s later (past its deadline) is a failure too. */
    async stop() {
      running = false;
      const settled = await Promise.race([Promise.all(loops).then(() => true), new Promise<boolean>((r) => setTimeout(r, 15_000, false))]);
      if (!settled) failures.push('a request never settled');
    },
  };
}

test('the canary analysis: a latency rollback needs both the ratio and the slack; errors and the deadline as planned', () => {
  const window = (latenciesMs: number[], failed = 0): VersionWindow => ({ ok: latenciesMs.length, failed, latenciesMs });
  const fast = window(Array.from({ length: 40 }, (_, i) => 2 + (i % 5) * 0.2));
  // Two hiccups in 40 answers set the p95 (the 39th of 40): 4x the old p95 but only 9 ms above it.
  const hiccups = window(Array.from({ length: 40 }, (_, i) => (i < 2 ? 12 : 2)));
  const slow = window(Array.from({ length: 40 }, () => 60));
  assert.equal(judgeCanary(PLAN, fast, hiccups, 1000).decision, 'promote');
  assert.equal(judgeCanary({ ...PLAN, minP95DeltaMs: undefined }, fast, hiccups, 1000).decision, 'rollback');
  assert.equal(judgeCanary({ ...PLAN, minP95DeltaMs: 5 }, fast, hiccups, 1000).decision, 'rollback');
  const verdict = judgeCanary(PLAN, fast, slow, 1000);
  assert.deepEqual(verdict, { decision: 'rollback', reason: 'p95 60 ms against 2.8 ms (allowed ×3 or +20 ms)' });
  // Far above the slack but within the ratio: held.
  const slowOld = window(Array.from({ length: 40 }, () => 50));
  assert.equal(judgeCanary(PLAN, slowOld, window(Array.from({ length: 40 }, () => 120)), 1000).decision, 'promote');
  // Errors do not wait for latency, and too few answers hold until the deadline.
  assert.match(
    judgeCanary(
      PLAN,
      fast,
      window(
        Array.from({ length: 37 }, () => 2),
        3,
      ),
      1000,
    ).reason,
    /^error rate 0.075/,
  );
  const few = window([2, 2]);
  assert.equal(judgeCanary(PLAN, fast, few, 1000).decision, 'hold');
  assert.equal(judgeCanary({ ...PLAN, maxCanaryMs: 5000 }, fast, few, 6000).decision, 'rollback');
});

test('a signed rollout under steady load: canary then promotion, then a slow version rolled back by itself; no request fails', async (t) => {
  const broker = await brokerFor(t);
  const operator = generateIdentity('operator');
  const operators = new Map([[operator.id, operator.publicKey]]);
  const router = await routerFor(t, broker.url, {
    http: { port: 0 },
    rollouts: { operators, signer: operator, dir: await tempDir(t), judgeEveryMs: 50 },
  });
  const v1 = scaleModel(1);
  const v2 = scaleModel(2);
  const v3 = scaleModel(3, 5000);
  const folder = await tempDir(t);
  await modelsFolder(folder, '1', v1);
  const stateDirs = [await tempDir(t), await tempDir(t)];
  const identities = [generateIdentity('agent'), generateIdentity('agent')];
  const agentOptions = (i: number) => ({
    brokerUrl: broker.url,
    modelsDir: folder,
    identity: identities[i]!,
    deploy: { operators, groups: [GROUP], stateDir: stateDirs[i]!, bundleBaseUrls: [router.http!.url] },
  });
  const agents: AgentHandle[] = [await agentFor(t, agentOptions(0)), await agentFor(t, agentOptions(1))];
  await router.waitForModel('scale', 10_000, 2);
  const load = steadyLoad(router);
  t.after(() => load.stop());

  // Run 1: version 2, a canary that holds.
  assert.deepEqual((await post(router, '/v1/bundles', v2, 'PUT')).json, { sha256: sha(v2), size: v2.byteLength });
  const canary2 = signDeployment(
    operator,
    step(operator, {
      seq: 1,
      version: '2',
      sha256: sha(v2),
      size: v2.byteLength,
      phase: 'canary',
      previous: { version: '1', sha256: sha(v1) },
    }),
  );
  const posted = await post(router, '/v1/deployments', signedDeploymentToJson(canary2));
  assert.equal(posted.status, 200, JSON.stringify(posted.json));
  await waitFor(() => router.rollouts!.status('scale')[0]?.canaryAgents === 2, 20_000, 'both agents to announce the canary');
  const canaryFrom = Date.now();
  await waitFor(() => router.rollouts!.status('scale')[0]?.phase !== 'canary', 30_000, 'the verdict on version 2');
  assert.equal(router.rollouts!.status('scale')[0]?.phase, 'promoted', router.rollouts!.auditLog('scale').at(-1)?.reason);
  const during = load.since(canaryFrom);
  const share = during.filter((f) => f === 2).length / during.length;
  assert.ok(share > 0.1 && share < 0.6, `canary share ${share} of ${during.length} answers should be near 0.3`);
  assert.ok(
    during.every((f) => f === 1 || f === 2),
    'only versions 1 and 2 answer during the canary',
  );
  await waitFor(
    () => agents.every((a) => a.status().models?.[0]?.version === '2' && !a.status().canaries),
    10_000,
    'agents to serve 2 alone',
  );
  const afterPromotion = Date.now();
  await waitFor(() => load.since(afterPromotion).length >= 50, 20_000, '50 answers after the promotion');
  assert.deepEqual([...new Set(load.since(afterPromotion))], [2], 'after the promotion every answer comes from version 2');
  assert.deepEqual(load.failures, [], 'no request failed during the first rollout');

  // Run 2: version 3, many times slower: the analysis rolls it back without anyone asking.
  await post(router, '/v1/bundles', v3, 'PUT');
  const canary3 = signDeployment(
    operator,
    step(operator, {
      seq: 3,
      version: '3',
      sha256: sha(v3),
      size: v3.byteLength,
      phase: 'canary',
      previous: { version: '2', sha256: sha(v2) },
      plan: { ...PLAN, minRequests: 20 },
    }),
  );
  assert.equal((await post(router, '/v1/deployments', signedDeploymentToJson(canary3))).status, 200);
  await waitFor(() => router.rollouts!.status('scale')[0]?.phase === 'rolled-back', 60_000, 'the automatic rollback');
  const verdict = router.rollouts!.status('scale')[0]!;
  assert.equal(verdict.version, '3');
  const audit = router.rollouts!.auditLog('scale');
  assert.match(audit.at(-1)!.reason, /^p95 /, 'rolled back for its latency');
  await waitFor(() => agents.every((a) => a.status().models?.[0]?.version === '2' && !a.status().canaries), 10_000, 'agents to drop 3');
  const afterRollback = Date.now();
  await waitFor(() => load.since(afterRollback).length >= 50, 20_000, '50 answers after the rollback');
  assert.deepEqual([...new Set(load.since(afterRollback))], [2], 'after the rollback every answer comes from version 2');
  await load.stop();
  assert.deepEqual(load.failures, [], 'no request failed during either rollout');
  assert.ok(load.answers.length > 300, `${load.answers.length} answers`);

  // Every step is in the audit log, signed, chained, with who decided.
  assert.deepEqual(
    audit.map((e) => [e.version, e.phase, e.by]),
    [
      ['2', 'canary', operator.id],
      ['2', 'promoted', 'router'],
      ['3', 'canary', operator.id],
      ['3', 'rolled-back', 'router'],
    ],
  );
  for (let i = 1; i < audit.length; i++) assert.notEqual(audit[i]!.prev, '', 'each line links to the one before');
  const status = (await fetch(`${router.http!.url}/v1/rollouts/scale`).then((r) => r.json())) as { rollout: { phase: string } };
  assert.equal(status.rollout.phase, 'rolled-back');

  // An agent restarting after the rollout comes back on the version it announced last (2), from its journal.
  await agents[0]!.close();
  const restarted = await agentFor(t, agentOptions(0));
  assert.equal(restarted.status().models?.[0]?.version, '2');
  assert.equal(restarted.status().canaries, undefined);
});

test('what a liar sends is refused: unknown key, wrong bytes, a replayed old step, another group; the router refuses the same', async (t) => {
  const broker = await brokerFor(t);
  const operator = generateIdentity('operator');
  const stranger = generateIdentity('operator');
  const operators = new Map([[operator.id, operator.publicKey]]);
  const router = await routerFor(t, broker.url, { http: { port: 0 }, rollouts: { operators, dir: await tempDir(t) } });
  const v1 = scaleModel(1);
  const v2 = scaleModel(2);
  const folder = await tempDir(t);
  await modelsFolder(folder, '1', v1);
  // A mirror that serves other bytes than the hash it is asked for.
  const mirror = createServer((_req, res) => res.end(scaleModel(5)));
  await new Promise<void>((r) => mirror.listen(0, '127.0.0.1', r));
  t.after(
    () =>
      new Promise<void>((resolve) => {
        mirror.closeAllConnections();
        mirror.close(() => resolve());
      }),
  );
  const mirrorUrl = `http://127.0.0.1:${(mirror.address() as { port: number }).port}`;
  const agent = await agentFor(t, {
    brokerUrl: broker.url,
    modelsDir: folder,
    deploy: { operators, groups: [GROUP], stateDir: await tempDir(t), bundleBaseUrls: [mirrorUrl] },
  });
  const raw = await rawClient(t, broker.url, 'operator-test');
  const send = (group: string, signed: ReturnType<typeof signDeployment>) =>
    raw.client.publish(deploymentTopics.step(group, 'scale'), encodeMessage(signed as never), { qos: 1, retain: true });
  const events = () => agent.deployments!.events;
  const lastEvent = async (n: number) => {
    await waitFor(() => events().length >= n, 10_000, `deployment event ${n}`);
    await agent.deployments!.settled();
    return events()[n - 1]!;
  };
  const base = {
    version: '2',
    sha256: sha(v2),
    size: v2.byteLength,
    phase: 'canary' as const,
    previous: { version: '1', sha256: sha(v1) },
  };

  // Signed by a key the agent does not trust.
  send(GROUP, signDeployment(stranger, step(stranger, { seq: 1, ...base })));
  assert.equal((await lastEvent(1)).code, 'MESH_UNAUTHORIZED');
  // Trusted, but the only source serves bytes that do not hash to the manifest's sha256.
  send(GROUP, signDeployment(operator, step(operator, { seq: 2, ...base })));
  assert.equal((await lastEvent(2)).code, 'MESH_MODEL_INTEGRITY');
  // Trusted, for a group the agent is not in, replayed onto the agent's group topic.
  send(GROUP, signDeployment(operator, step(operator, { seq: 3, ...base, group: 'other-group' })));
  const otherGroup = await lastEvent(3);
  assert.equal(otherGroup.code, 'MESH_UNAUTHORIZED');
  assert.match(otherGroup.message, /signed for other-group/);
  // A good canary from the router's store, then a rollback, then the old canary step replayed.
  const put = await post(router, '/v1/bundles', v2, 'PUT');
  assert.equal(put.status, 200, JSON.stringify(put.json));
  const good = signDeployment(operator, step(operator, { seq: 4, ...base, urls: [`${router.http!.url}/bundles/${sha(v2)}`] }));
  send(GROUP, good);
  assert.equal((await lastEvent(4)).ok, true);
  await waitFor(() => agent.status().canaries?.[0]?.version === '2', 5_000, 'the canary announced');
  send(GROUP, signDeployment(operator, step(operator, { seq: 5, ...base, phase: 'rolled-back' })));
  assert.equal((await lastEvent(5)).ok, true);
  await waitFor(() => agent.status().canaries === undefined, 5_000, 'the canary dropped');
  send(GROUP, good);
  const replay = await lastEvent(6);
  assert.equal(replay.code, 'MESH_UNAUTHORIZED');
  assert.match(replay.message, /replayed/);
  assert.equal(agent.status().canaries, undefined, 'the replayed step changed nothing');
  assert.equal(agent.status().models?.[0]?.version, '1');

  // The router: an unknown key is 401, a bundle it does not hold is 404, a replayed seq is 400.
  assert.equal(
    (await post(router, '/v1/deployments', signedDeploymentToJson(signDeployment(stranger, step(stranger, { seq: 1, ...base }))))).status,
    401,
  );
  const v9 = scaleModel(9);
  const missing = signDeployment(operator, step(operator, { seq: 1, ...base, version: '9', sha256: sha(v9), size: v9.byteLength }));
  assert.equal((await post(router, '/v1/deployments', signedDeploymentToJson(missing))).status, 404);
  assert.equal((await post(router, '/v1/deployments', signedDeploymentToJson(good))).status, 200);
  const replayed = await post(router, '/v1/deployments', signedDeploymentToJson(good));
  assert.equal(replayed.status, 400);
  assert.equal(replayed.json.code, 'MESH_BAD_REQUEST');
  // A tampered manifest (one byte of the signed bytes changed) is refused as unsigned.
  const tampered = { ...good, manifest: Uint8Array.from(good.manifest) };
  tampered.manifest[tampered.manifest.length - 1]! ^= 1;
  assert.ok([400, 401].includes((await post(router, '/v1/deployments', signedDeploymentToJson(tampered))).status));
  // A body far larger than any signed step is refused on its length, as MESH_TOO_LARGE, before it is parsed.
  const oversized = await post(router, '/v1/deployments', { manifest: 'A'.repeat(DEPLOYMENT_BODY_LIMIT), sig: '' });
  assert.equal(oversized.status, 413);
  assert.equal(oversized.json.code, 'MESH_TOO_LARGE');
});
