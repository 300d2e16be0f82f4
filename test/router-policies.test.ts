/** The live router running another balancer than its own (router/src/policies.ts), on a real broker with real agents. */
import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import type { Attempt } from '@edge-mesh/client';
import { sampleInputs } from '@edge-mesh/demo';
import { type AgentStatus, generateIdentity, MeshError } from '@edge-mesh/protocol';
import {
  type LivePolicy,
  type LivePolicyFactory,
  observedBy,
  ROUTER_POLICIES,
  type RouterAsk,
  type RouterHandle,
  resolveRouterPolicy,
  startRouter,
} from '@edge-mesh/router';
import { agentFor, brokerFor, quiet, routerFor } from './helpers.ts';

/** A test balancer: round robin over the agents whose status says online, from statuses alone. */
function roundRobin() {
  const online = new Set<string>();
  const seen = { statuses: 0, loads: 0, ends: 0, context: undefined as Parameters<LivePolicyFactory>[0] | undefined };
  let next = 0;
  const factory: LivePolicyFactory = (context) => {
    seen.context = context;
    return {
      name: 'round-robin',
      maxAttempts: 2,
      budget: undefined,
      retryable: (code) => code === 'MESH_AGENT_LOST',
      onStatus(status: AgentStatus) {
        seen.statuses++;
        if (status.state === 'online') online.add(status.agent);
        else online.delete(status.agent);
      },
      onLoad() {
        seen.loads++;
      },
      pick(_request, tried) {
        const candidates = [...online].sort().filter((id) => !tried.has(id));
        if (candidates.length === 0) return undefined;
        return { agentId: candidates[next++ % candidates.length]! };
      },
      onAttemptEnd() {
        seen.ends++;
      },
    };
  };
  return { factory, seen };
}

test('the policy choice: ours by default, a factory as given, a name only when built in', () => {
  assert.equal(resolveRouterPolicy(undefined), undefined);
  assert.equal(resolveRouterPolicy('ours'), undefined);
  const { factory } = roundRobin();
  assert.equal(resolveRouterPolicy(factory), factory);
  assert.throws(
    () => resolveRouterPolicy('no-such-balancer'),
    (err: unknown) => err instanceof MeshError && err.code === 'MESH_CONFIG' && /no-such-balancer/.test(err.message),
  );
  // Not a way to reach Object.prototype's members either.
  assert.throws(
    () => resolveRouterPolicy('toString'),
    (err: unknown) => err instanceof MeshError && err.code === 'MESH_CONFIG',
  );
  if (!Object.hasOwn(ROUTER_POLICIES, 'finagle')) {
    assert.throws(
      () => resolveRouterPolicy('finagle'),
      (err: unknown) => err instanceof MeshError && /not built into this router/.test(err.message),
    );
  } else assert.equal(typeof resolveRouterPolicy('finagle'), 'function');
});

test('observedBy: the active policy decides, the observer sees every send, timeout and end after it', () => {
  const calls: string[] = [];
  const active: LivePolicy = {
    name: 'active',
    pick: () => ({ agentId: 'a' }),
    onSend: () => calls.push('active.send'),
    onTimeout: () => calls.push('active.timeout'),
    onAttemptEnd: () => calls.push('active.end'),
  };
  const policy = observedBy(active, {
    pick: () => assert.fail('the observer never picks'),
    onSend: () => calls.push('observer.send'),
    onTimeout: () => calls.push('observer.timeout'),
    onAttemptEnd: () => calls.push('observer.end'),
  });
  const request = { key: 'k', deadlineAt: 1_000, startedAt: 0, data: { model: 'kws', bytesUp: 1 }, maxAttempts: 3, model: 'kws' };
  assert.deepEqual(policy.pick(request, new Set(), 'first', 0), { agentId: 'a' });
  assert.equal(policy.mayHedge, undefined, 'no hedge rule of its own: the engine asks none');
  const attempt = {
    request,
    agentId: 'a',
    kind: 'first',
    index: 0,
    paid: false,
    sentAt: 0,
    plan: { agentId: 'a' },
    timedOut: false,
  } as Attempt<RouterAsk>;
  policy.onSend!(attempt, 0);
  policy.onTimeout!(attempt, 1);
  policy.onAttemptEnd!(attempt, { kind: 'cancelled', reason: 'answered-elsewhere' }, 2);
  assert.deepEqual(calls, ['active.send', 'observer.send', 'active.timeout', 'observer.timeout', 'active.end', 'observer.end']);
});

describe('a live router running another balancer', { timeout: 60_000 }, () => {
  test('forwards through the selected policy, fed the verified statuses and load reports; its own estimates still learn', async (t) => {
    const broker = await brokerFor(t);
    const a = await agentFor(t, { brokerUrl: broker.url, heartbeatMs: 200 });
    const b = await agentFor(t, { brokerUrl: broker.url, heartbeatMs: 200 });
    const { factory, seen } = roundRobin();
    const router = await routerFor(t, broker.url, { policy: factory, maxAttempts: 3 });
    assert.equal(router.policy, 'round-robin');
    assert.equal(seen.context?.maxAttempts, 3);
    assert.equal(seen.context?.hedging, true);
    await router.waitForModel('kws', 10_000, 2);

    const results: Awaited<ReturnType<RouterHandle['infer']>>[] = [];
    for (let i = 0; i < 10; i++) results.push(await router.infer('kws', sampleInputs('kws', 1 + i), { deadlineMs: 5_000 }));
    const byAgent = (id: string) => results.filter((r) => r.agentId === id).length;
    assert.equal(byAgent(a.id), 5, 'round robin, as the test policy says');
    assert.equal(byAgent(b.id), 5);
    assert.ok(seen.statuses >= 2, `statuses seen: ${seen.statuses}`);
    await new Promise((r) => setTimeout(r, 500));
    assert.ok(seen.loads > 0, 'load reports reach it');
    assert.equal(seen.ends, 10);
    for (const id of [a.id, b.id]) {
      const entry = router.registry.agents.get(id)!;
      assert.ok(entry.models.get('kws')!.latency.count >= 5, 'the router estimates learned from its attempts');
      assert.equal(entry.outstanding, 0);
    }
    assert.equal(router.counters.ok, 10);
    assert.deepEqual(router.counters.sentTo, { [a.id]: 5, [b.id]: 5 });
    // Route leases still come from the router's own selection.
    assert.ok([a.id, b.id].includes(router.route('kws', { deadlineMs: 5_000 }).agentId));

    // An agent going offline reaches the policy (through its verified last word), and it routes around it.
    await b.close();
    const after = await Promise.all(
      Array.from({ length: 4 }, (_, i) => router.infer('kws', sampleInputs('kws', 1 + i), { deadlineMs: 5_000 })),
    );
    for (const r of after) assert.equal(r.agentId, a.id);
  });

  test('an unknown policy name is refused at start', async (t) => {
    const broker = await brokerFor(t);
    await assert.rejects(
      startRouter({ brokerUrl: broker.url, identity: generateIdentity('router'), logger: quiet, policy: 'no-such-balancer' }),
      (err: unknown) => err instanceof MeshError && err.code === 'MESH_CONFIG',
    );
  });
});
