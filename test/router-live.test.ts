/** The live router on a real broker with real agents: routing, forwarding, failover, offline agents. */
import assert from 'node:assert/strict';
import { describe, type TestContext, test } from 'node:test';
import { sampleInputs } from '@edge-mesh/demo';
import { generateIdentity, MeshError } from '@edge-mesh/protocol';
import { type RouterHandle, startRouter } from '@edge-mesh/router';
import { agentFor, brokerFor, meshFor, quiet, spawnAgent, waitFor } from './helpers.ts';

async function routerFor(
  t: TestContext,
  brokerUrl: string,
  options: Partial<Parameters<typeof startRouter>[0]> = {},
): Promise<RouterHandle> {
  const router = await startRouter({ brokerUrl, identity: generateIdentity('router'), logger: quiet, ...options });
  t.after(() => router.close());
  return router;
}

function sameTensors(a: Record<string, { dtype: string; shape: number[]; data: ArrayLike<unknown> }>, b: typeof a): void {
  assert.deepEqual(Object.keys(a).sort(), Object.keys(b).sort());
  for (const name of Object.keys(a)) {
    assert.equal(a[name]!.dtype, b[name]!.dtype, name);
    assert.deepEqual(a[name]!.shape, b[name]!.shape, name);
    assert.deepEqual(Array.from(a[name]!.data), Array.from(b[name]!.data), name);
  }
}

describe('live router', { timeout: 120_000 }, () => {
  test('routes to a live agent and forwards requests with the same outputs as a direct SDK call', async (t) => {
    const broker = await brokerFor(t);
    const agent = await agentFor(t, { brokerUrl: broker.url });
    const router = await routerFor(t, broker.url);
    await router.waitForModel('kws', 10_000);

    const route = router.route('kws', { deadlineMs: 5_000 });
    assert.equal(route.agentId, agent.id);
    assert.ok(route.predictedMs > 0 && Number.isFinite(route.predictedMs));
    assert.throws(
      () => router.route('no-such-model'),
      (err: unknown) => err instanceof MeshError && err.code === 'MESH_NO_AGENT',
    );
    assert.ok(router.models().some((m) => m.name === 'kws'));

    const mesh = await meshFor(t, { brokerUrl: broker.url });
    await mesh.waitForModel('kws', 10_000);
    for (const model of ['kws', 'vad']) {
      const inputs = sampleInputs(model, 3);
      const viaRouter = await router.infer(model, inputs, { deadlineMs: 10_000 });
      const direct = await mesh.infer(model, inputs, { deadlineMs: 10_000 });
      assert.equal(viaRouter.agentId, agent.id);
      assert.equal(viaRouter.model, model);
      sameTensors(viaRouter.outputs, direct.outputs);
    }
    assert.equal(router.counters.ok, 2);
    // Learned from the replies: the registry saw the attempts come back.
    assert.equal(router.registry.agents.get(agent.id)!.outstanding, 0);
  });

  test('an agent killed mid-request: its requests complete on another agent within their deadline, and no traffic goes to it afterwards', async (t) => {
    const broker = await brokerFor(t);
    const doomedKey = generateIdentity('agent');
    const doomed = await spawnAgent(t, broker.url, doomedKey);
    const survivor = await agentFor(t, { brokerUrl: broker.url });
    const router = await routerFor(t, broker.url, { hedging: false });
    await router.waitForModel('ocr-det', 10_000, 2);

    const deadlineMs = 20_000;
    const started = Date.now();
    const calls = Array.from({ length: 16 }, (_, i) => router.infer('ocr-det', sampleInputs('ocr-det', 1 + (i % 4)), { deadlineMs }));
    // Kill as soon as the doomed agent holds work.
    await waitFor(() => (router.counters.sentTo[doomedKey.id] ?? 0) > 0, 5_000, 'an attempt on the doomed agent');
    doomed.kill('SIGKILL');
    const results = await Promise.all(calls);
    const elapsed = Date.now() - started;
    assert.ok(elapsed < deadlineMs, `finished in ${elapsed} ms`);
    for (const r of results) assert.ok(r.agentId === survivor.id || r.agentId === doomedKey.id);
    const movedOver = results.filter((r) => r.tried[0] === doomedKey.id && r.agentId === survivor.id);
    assert.ok(
      movedOver.length > 0,
      `some request started on the killed agent and finished elsewhere: ${JSON.stringify(results.map((r) => r.tried))}`,
    );

    await waitFor(() => router.registry.agents.get(doomedKey.id)?.up === false, 5_000, 'the killed agent marked down');
    const sentBefore = router.counters.sentTo[doomedKey.id] ?? 0;
    for (let i = 0; i < 20; i++) assert.equal(router.route('kws', { deadlineMs: 5_000 }).agentId, survivor.id);
    const after = await Promise.all(
      Array.from({ length: 10 }, (_, i) => router.infer('kws', sampleInputs('kws', i + 1), { deadlineMs: 5_000 })),
    );
    for (const r of after) {
      assert.equal(r.agentId, survivor.id);
      assert.deepEqual(r.tried, [survivor.id]);
    }
    assert.equal(router.counters.sentTo[doomedKey.id] ?? 0, sentBefore);
  });

  test('an agent that went offline cleanly gets no traffic; with none left the router refuses with MESH_NO_AGENT', async (t) => {
    const broker = await brokerFor(t);
    const a = await agentFor(t, { brokerUrl: broker.url });
    const b = await agentFor(t, { brokerUrl: broker.url });
    const router = await routerFor(t, broker.url);
    await router.waitForModel('kws', 10_000, 2);
    await b.close();
    await waitFor(() => router.registry.agents.get(b.id)?.up === false, 5_000, 'agent b marked down');
    const results = await Promise.all(
      Array.from({ length: 12 }, (_, i) => router.infer('kws', sampleInputs('kws', i + 1), { deadlineMs: 5_000 })),
    );
    for (const r of results) assert.deepEqual(r.tried, [a.id]);
    assert.equal(router.counters.sentTo[b.id] ?? 0, 0);
    assert.equal(b.counters.received, 0);

    await a.close();
    await waitFor(() => router.registry.agents.get(a.id)?.up === false, 5_000, 'agent a marked down');
    await assert.rejects(
      router.infer('kws', sampleInputs('kws', 1), { deadlineMs: 300 }),
      (err: unknown) => err instanceof MeshError && (err.code === 'MESH_NO_AGENT' || err.code === 'MESH_DEADLINE_EXCEEDED'),
    );
  });
});
