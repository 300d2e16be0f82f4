/**
 * The SDK and the router run one request engine (@edge-mesh/client): the same scripted agent, the same
 * answers, the same behaviour from both. These are the rows of the table where they used to differ:
 * per-try timeouts, which codes move a request to another agent, and hedges per request.
 */
import assert from 'node:assert/strict';
import { describe, type TestContext, test } from 'node:test';
import { openMeshConnection } from '@edge-mesh/client';
import { sampleInputs } from '@edge-mesh/demo';
import {
  type AgentStatus,
  decodeMessage,
  ERROR_CODES,
  encodeMessage,
  generateIdentity,
  type MeshError,
  type MeshErrorCode,
  PROTOCOL_VERSION,
  parseTopic,
  signStatus,
  topics,
} from '@edge-mesh/protocol';
import { type RouterHandle, startRouter } from '@edge-mesh/router';
import type { Mesh } from '@edge-mesh/sdk';
import { agentFor, brokerFor, meshFor, modelsDir, quiet } from './helpers.ts';

/**
 * An agent that announces itself as the fastest one there is (a signed status) and answers every
 * request with `answer(request)`: a coded error, or nothing at all (a silent agent).
 */
async function scriptedAgent(t: TestContext, brokerUrl: string, like: AgentStatus, answer: () => MeshErrorCode | 'silent') {
  const identity = generateIdentity('agent');
  const connection = openMeshConnection(brokerUrl, { identity });
  t.after(() => connection.close());
  await connection.firstConnect;
  const client = connection.client;
  let requests = 0;
  const bySender = new Map<string, number>();
  client.on('message', (topic, payload) => {
    const parsed = parseTopic(topic);
    if (parsed?.kind !== 'request') return;
    const request = decodeMessage(payload, ['req']);
    requests++;
    bySender.set(parsed.senderId, (bySender.get(parsed.senderId) ?? 0) + 1);
    const code = answer();
    if (code === 'silent') return;
    client.publish(
      topics.clientReply(parsed.senderId, identity.id),
      encodeMessage({ v: PROTOCOL_VERSION, kind: 'err', id: request.id, agent: identity.id, code, message: `scripted ${code}` }),
      { qos: 1 },
    );
  });
  await new Promise<void>((resolve, reject) =>
    client.subscribe(`${topics.agentRequest(identity.id, '+')}`, { qos: 1 }, (err) => (err ? reject(err) : resolve())),
  );
  const status: AgentStatus = {
    v: PROTOCOL_VERSION,
    kind: 'status',
    agent: identity.id,
    state: 'online',
    ts: Date.now(),
    session: 'scripted',
    models: like.models!.map((m) => ({ ...m, latencyMs: 0.001 })),
    workers: 64,
  };
  await new Promise<void>((resolve) =>
    client.publish(topics.agentStatus(identity.id), encodeMessage(signStatus(identity, status)), { qos: 1, retain: true }, () => resolve()),
  );
  return {
    id: identity.id,
    get requests() {
      return requests;
    },
    from: (senderId: string) => bySender.get(senderId) ?? 0,
  };
}

/** A broker, one real agent serving kws, a scripted agent in front of it, and an SDK client and a router. */
async function rig(t: TestContext, answer: () => MeshErrorCode | 'silent', clientOptions: { sdk?: object; router?: object } = {}) {
  const broker = await brokerFor(t);
  const real = await agentFor(t, { brokerUrl: broker.url, modelsDir: await modelsDir() });
  const scripted = await scriptedAgent(t, broker.url, real.status(), answer);
  const mesh: Mesh = await meshFor(t, { brokerUrl: broker.url, ...clientOptions.sdk });
  const router: RouterHandle = await startRouter({
    brokerUrl: broker.url,
    identity: generateIdentity('router'),
    logger: quiet,
    ...clientOptions.router,
  });
  t.after(() => router.close());
  await mesh.waitForModel('kws', 10_000, 2);
  await router.waitForModel('kws', 10_000, 2);
  return { real, scripted, mesh, router };
}

const kws = () => sampleInputs('kws', 4);

describe('the SDK and the router, one request engine', () => {
  test('codes that move a request to another agent are those the error table marks retryable, for both', async (t) => {
    // A sample of both kinds. Each client chooses among the two agents by its own estimates, so each
    // code is tried until the scripted agent got the first attempt; fresh clients per code, so what one
    // code taught them (a suspect agent, a failure rate) does not steer the next.
    const codes: MeshErrorCode[] = [
      'MESH_BUSY',
      'MESH_UNKNOWN_MODEL',
      'MESH_INFERENCE_FAILED',
      'MESH_SHUTTING_DOWN',
      'MESH_BAD_INPUT',
      'MESH_TOO_LARGE',
    ];
    let code: MeshErrorCode = codes[0]!;
    const broker = await brokerFor(t);
    const real = await agentFor(t, { brokerUrl: broker.url, modelsDir: await modelsDir() });
    const scripted = await scriptedAgent(t, broker.url, real.status(), () => code);
    for (code of codes) {
      const mesh = await meshFor(t, { brokerUrl: broker.url });
      const router = await startRouter({ brokerUrl: broker.url, identity: generateIdentity('router'), logger: quiet });
      t.after(() => router.close());
      await mesh.waitForModel('kws', 10_000, 2);
      await router.waitForModel('kws', 10_000, 2);
      for (const [who, sender, infer] of [
        ['sdk', mesh.clientId, () => mesh.infer('kws', kws(), { deadlineMs: 5_000 })],
        ['router', router.id, () => router.infer('kws', kws(), { deadlineMs: 5_000 })],
      ] as const) {
        let outcome: { ok: true; agentId: string; attempts: number } | { ok: false; error: MeshError } | undefined;
        for (let i = 0; i < 30 && scripted.from(sender) === 0; i++) {
          outcome = await infer().then(
            (r) => ({ ok: true as const, agentId: r.agentId, attempts: r.attempts }),
            (e: unknown) => ({ ok: false as const, error: e as MeshError }),
          );
        }
        assert.ok(scripted.from(sender) > 0 && outcome, `${who} never chose the scripted agent for ${code}`);
        if (ERROR_CODES[code].retryable) {
          assert.ok(outcome.ok, `${who}: ${code} is retryable, the real agent should answer (${!outcome.ok && outcome.error.message})`);
          assert.equal(outcome.agentId, real.id);
          assert.equal(outcome.attempts, 2, `${who}: ${code}`);
        } else {
          assert.ok(!outcome.ok, `${who}: ${code} is final`);
          assert.equal(outcome.error.code, code, `${who}: ${code}`);
        }
      }
    }
  });

  test('per-try timeout: an agent that does not answer is given up after its timeout, for both', async (t) => {
    // Hedging off, so only the per-try timeout (max(250 ms, 5 × predicted)) can move the request on.
    const { real, scripted, mesh, router } = await rig(t, () => 'silent', { sdk: { minHedgeAfterMs: 60_000 }, router: { hedging: false } });
    // Which agent a client tries first is its own (partly random) choice, so each client is asked until
    // the silent agent got a request from it; every answer on the way must come from the real agent.
    for (const [who, sender, infer] of [
      ['sdk', mesh.clientId, () => mesh.infer('kws', kws(), { deadlineMs: 5_000 })],
      ['router', router.id, () => router.infer('kws', kws(), { deadlineMs: 5_000 })],
    ] as const) {
      for (let i = 0; i < 30 && scripted.from(sender) === 0; i++) {
        const before = scripted.requests;
        const started = performance.now();
        const r = await infer();
        const ms = performance.now() - started;
        assert.equal(r.agentId, real.id, `${who}: only the real agent answers`);
        if (scripted.requests > before) {
          assert.equal(r.attempts, 2, `${who}: timed out on the silent agent, then the real one`);
          assert.ok(ms >= 240 && ms < 2_500, `${who}: answered after ${ms.toFixed(0)} ms (per-try timeout 250 ms, deadline 5 s)`);
        }
      }
      assert.ok(scripted.from(sender) > 0, `${who} never tried the silent agent first in 30 requests`);
    }
  });

  test('at most one hedge per request, for both', async (t) => {
    // Two silent agents in front of the real one: a second hedge would reach the real agent early.
    const broker = await brokerFor(t);
    const real = await agentFor(t, { brokerUrl: broker.url, modelsDir: await modelsDir() });
    const silent1 = await scriptedAgent(t, broker.url, real.status(), () => 'silent');
    const silent2 = await scriptedAgent(t, broker.url, real.status(), () => 'silent');
    const mesh = await meshFor(t, { brokerUrl: broker.url, minHedgeAfterMs: 20, maxAttempts: 3 });
    await mesh.waitForModel('kws', 10_000, 3);
    const started = performance.now();
    const r = await mesh.infer('kws', kws(), { deadlineMs: 5_000 });
    const ms = performance.now() - started;
    // First attempt on a silent agent, one hedge after ~20–60 ms (the other silent one or the real one),
    // then only the per-try timeout (250 ms) moves the request on: a second hedge would have come at ~40 ms.
    assert.equal(r.agentId, real.id);
    assert.ok(mesh.counters.hedges <= 1, `hedges ${mesh.counters.hedges}`);
    if (silent1.requests + silent2.requests === 2)
      assert.ok(ms >= 240, `the real agent answered after ${ms.toFixed(0)} ms: only a timeout reaches it`);
  });
});
