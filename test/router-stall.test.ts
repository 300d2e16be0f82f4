/**
 * The router must not blame agents for its own stalls (issue 13, docs/routing.md "The router's own stalls"). Before,
 * a router stalled by large JSON bodies counted the stall as agent round-trip time and then refused work it could
 * do ("no agent can finish kws within 1000 ms") for tens of seconds.
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { sampleInputs } from '@edge-mesh/demo';
import { generateIdentity, topics } from '@edge-mesh/protocol';
import { createRegistry, onReply, startRouter, upsertAgent } from '@edge-mesh/router';
import { modelBodyLimit } from '../router/src/http.ts';
import { StallMonitor } from '../router/src/stalls.ts';
import { agentFor, brokerFor, busyWait, quiet } from './helpers.ts';

test('StallMonitor: a late tick is a stall, kept with its times; one under way counts too', () => {
  let now = 1000;
  const m = new StallMonitor(() => now, { tickMs: 10, minStallMs: 20 });
  m.start();
  now = 1010;
  m.tick();
  assert.equal(m.stalledMs(0, 2000), 0, 'on time');
  now = 1510;
  m.tick();
  assert.equal(m.stalledMs(1000, 1510), 490, 'the tick due at 1020 came at 1510');
  assert.equal(m.stalledMs(1400, 1510), 110, 'only the overlap');
  assert.equal(m.stalledMs(1510, 1600), 0);
  now = 2510;
  assert.equal(m.stalledMs(1600, 2510), 910, 'a stall still under way (the tick due at 1520 has not come)');
  m.stop();
});

test('a reply across a router stall teaches the registry the agent time, not the stall', () => {
  const stalled = createRegistry({ site: 'a' });
  const plain = createRegistry({ site: 'a' });
  let now = 0;
  const monitor = new StallMonitor(() => now);
  stalled.stalls = monitor;
  for (const reg of [stalled, plain]) upsertAgent(reg, { agentId: 'x', hardwareClass: 'cpu', models: [{ model: 'kws', serviceMs: 2 }] }, 0);
  for (let i = 0; i < 20; i++) {
    now = i * 10;
    for (const reg of [stalled, plain]) onReply(reg, 'x', 'kws', { queueMs: 0, execMs: 2, e2eMs: 5 }, now);
  }
  // Sixteen attempts, each held 2.2 s by the router's own stall.
  for (let i = 0; i < 16; i++) {
    const sent = 1000 + i * 3000;
    now = sent + 2205;
    monitor.record(sent + 2, sent + 2202);
    for (const reg of [stalled, plain]) onReply(reg, 'x', 'kws', { queueMs: 0, execMs: 2, e2eMs: 2205, predictedMs: 5 }, now);
  }
  const a = stalled.agents.get('x')!;
  const b = plain.agents.get('x')!;
  assert.ok(a.rttMs < 20, `with the stalls taken out the RTT stays small: ${a.rttMs} ms`);
  assert.ok(a.kappa < 1.5, `and so does the agent's slowness factor: ${a.kappa}`);
  assert.ok(b.kappa > a.kappa * 2, `counted as the agent's, the stalls would inflate it: ${b.kappa} vs ${a.kappa}`);
});

test('right after stalls injected in the router, normal requests are served, not refused', { timeout: 60_000 }, async (t) => {
  const broker = await brokerFor(t);
  const agent = await agentFor(t, { brokerUrl: broker.url });
  const router = await startRouter({ brokerUrl: broker.url, identity: generateIdentity('router'), logger: quiet });
  t.after(() => router.close());
  await router.waitForModel('kws', 10_000);
  const inputs = sampleInputs('kws', 7);
  for (let i = 0; i < 10; i++) await router.infer('kws', inputs, { deadlineMs: 5000 });
  // The router's process (which here also hosts the broker and the agent) stalls for 1.5 s after each request is
  // sent and before the agent gets it: the stall lands inside the attempt's round trip.
  let stallNext = 0;
  broker.aedes.on('publish', (packet) => {
    if (stallNext > 0 && packet.topic === topics.agentRequest(agent.id, router.id)) {
      stallNext--;
      busyWait(1500);
    }
  });
  stallNext = 4;
  for (let i = 0; i < 4; i++) await router.infer('kws', inputs, { deadlineMs: 10_000 });
  assert.equal(stallNext, 0, 'every stall was injected');
  const entry = router.registry.agents.get(agent.id)!;
  assert.ok(entry.rttMs < 200, `the agent's RTT estimate did not absorb the stalls: ${entry.rttMs} ms`);
  // Right after: requests with a 1 s deadline are served.
  for (let i = 0; i < 10; i++) {
    const r = await router.infer('kws', inputs, { deadlineMs: 1000 });
    assert.equal(r.agentId, agent.id);
  }
});

test('per-model body limits come from the input shapes', () => {
  const kws = {
    name: 'kws',
    version: '1',
    sha256: '',
    priceMicros: 0,
    latencyMs: 1,
    inputs: [{ name: 'x', dtype: 'float32', shape: [1, 25, 96] as (number | string)[] }],
    outputs: [],
  };
  assert.equal(modelBodyLimit(kws, 64 << 20), 2400 * 32 + 64 * 1024);
  const free = { ...kws, inputs: [{ name: 'x', dtype: 'float32', shape: ['batch', 25, 96] }] };
  assert.equal(modelBodyLimit(free, 64 << 20), ((4 * 1024 * 1024) / 4) * 32 + 64 * 1024, 'a free dim: what one agent message can hold');
  assert.equal(modelBodyLimit(undefined, 64 << 20), 64 * 1024, 'an unknown model: the margin only');
  assert.equal(modelBodyLimit(kws, 1000), 1000, 'never above the router-wide limit');
});
