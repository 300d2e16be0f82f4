/**
 * Fast recovery (issue 13, docs/operations.md "Recovery"): a real broker killed and started again on the
 * same port while the parts keep running.
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { type BrokerHandle, startBroker } from '@edge-mesh/broker';
import { sampleInputs } from '@edge-mesh/demo';
import { agentFor, kwsOnlyDir, meshFor, quiet, routerFor } from './helpers.ts';

async function restartableBroker(t: import('node:test').TestContext) {
  let broker: BrokerHandle = await startBroker({ port: 0, logger: quiet });
  const port = broker.port;
  t.after(() => broker.close());
  return {
    url: broker.url,
    port,
    stop: () => broker.close(),
    async start() {
      broker = await startBroker({ port, logger: quiet });
    },
  };
}

test('after a broker outage the SDK takes route leases from the router again', async (t) => {
  const broker = await restartableBroker(t);
  const dir = await kwsOnlyDir(t);
  await agentFor(t, { brokerUrl: broker.url, modelsDir: dir });
  const router = await routerFor(t, broker.url, { leaseTtlMs: 200 });
  await router.waitForModel('kws', 10_000);
  const mesh = await meshFor(t, { brokerUrl: broker.url, router: router.id, backoff: { baseMs: 20, maxMs: 200 } });
  await mesh.waitForModel('kws', 10_000);
  const inputs = sampleInputs('kws', 1);

  for (let i = 0; i < 20; i++) {
    const r = await mesh.infer('kws', inputs, { deadlineMs: 5_000 });
    assert.equal(r.routedBy, router.id, `request ${i} before the outage was not leased`);
  }

  await broker.stop();
  // Once the held lease is past use (4 ttl), requests during the outage ask for one while the SDK is disconnected.
  await new Promise((r) => setTimeout(r, 1_000));
  for (let i = 0; i < 5; i++) {
    await mesh.infer('kws', inputs, { deadlineMs: 300 }).catch(() => undefined);
  }
  assert.ok(mesh.counters.leaseFallbacks >= 5, `requests in the outage went without a lease (${mesh.counters.leaseFallbacks})`);
  await broker.start();

  // Back: the first requests may still be routed locally while the router re-learns the agent.
  const until = Date.now() + 20_000;
  for (;;) {
    const r = await mesh.infer('kws', inputs, { deadlineMs: 2_000 }).catch(() => undefined);
    if (r?.routedBy === router.id) break;
    assert.ok(Date.now() < until, 'no leased request within 20 s of the broker coming back');
    await new Promise((r) => setTimeout(r, 50));
  }
  let leased = 0;
  for (let i = 0; i < 40; i++) {
    const r = await mesh.infer('kws', inputs, { deadlineMs: 5_000 });
    if (r.routedBy === router.id) leased++;
  }
  assert.equal(leased, 40, `${leased}/40 leased after the outage`);
});
