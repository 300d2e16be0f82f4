/**
 * The live router on a fleet: 20 real agents (real ONNX sessions of the wake-word model) on a real
 * broker, with injected faults: slow hardware, far links, a dead agent, a gray failure. Also the SDK's
 * direct mode, where the router only hands out route leases.
 */
import assert from 'node:assert/strict';
import { describe, type TestContext, test } from 'node:test';
import type { AgentHandle } from '@edge-mesh/agent';
import { sampleInputs } from '@edge-mesh/demo';
import { type AgentStatus, decodeCbor, generateIdentity, topics } from '@edge-mesh/protocol';
import { type LivePolicyFactory, ROUTER_POLICIES, type RouterHandle } from '@edge-mesh/router';
import { agentFor, brokerFor, kwsOnlyDir, meshFor, routerFor, spawnAgent, waitFor } from './helpers.ts';

/** Runs `n` calls with at most `concurrency` in flight. */
async function runAll<T>(n: number, concurrency: number, call: (i: number) => Promise<T>): Promise<T[]> {
  const out: T[] = new Array(n);
  let next = 0;
  await Promise.all(
    Array.from({ length: concurrency }, async () => {
      while (next < n) {
        const i = next++;
        out[i] = await call(i);
      }
    }),
  );
  return out;
}

/**
 * A stand-in baseline for the fleet comparison while no baseline is built into the router: power of two
 * choices on this router's own count of attempts in flight, candidates from the statuses alone.
 */
const p2cOutstanding: LivePolicyFactory = ({ random }) => {
  const online = new Map<string, Set<string>>();
  const inFlight = new Map<string, number>();
  return {
    name: 'p2c-outstanding',
    budget: undefined,
    onStatus(status: AgentStatus) {
      for (const agents of online.values()) agents.delete(status.agent);
      if (status.state !== 'online') return;
      for (const m of status.models ?? []) {
        if (!online.has(m.name)) online.set(m.name, new Set());
        online.get(m.name)!.add(status.agent);
      }
    },
    pick(request, tried) {
      const candidates = [...(online.get(request.data.model) ?? [])].filter((id) => !tried.has(id));
      if (candidates.length === 0) return undefined;
      const a = candidates[Math.floor(random() * candidates.length)]!;
      const b = candidates[Math.floor(random() * candidates.length)]!;
      return { agentId: (inFlight.get(b) ?? 0) < (inFlight.get(a) ?? 0) ? b : a };
    },
    onSend: (attempt) => void inFlight.set(attempt.agentId, (inFlight.get(attempt.agentId) ?? 0) + 1),
    onAttemptEnd: (attempt) => void inFlight.set(attempt.agentId, Math.max(0, (inFlight.get(attempt.agentId) ?? 0) - 1)),
  };
};

/** The injected fleet: 4 fast near agents, 12 slow (+25 ms execution), 3 far (+15 ms link), one separate process to kill. */
async function injectedFleet(t: TestContext, brokerUrl: string) {
  const dir = await kwsOnlyDir(t);
  const fast: AgentHandle[] = [];
  const slow: AgentHandle[] = [];
  const far: AgentHandle[] = [];
  const starts: Promise<void>[] = [];
  for (let i = 0; i < 4; i++) starts.push(agentFor(t, { brokerUrl, modelsDir: dir }).then((a) => void fast.push(a)));
  for (let i = 0; i < 12; i++)
    starts.push(agentFor(t, { brokerUrl, modelsDir: dir, faults: { extraExecMs: 25 } }).then((a) => void slow.push(a)));
  for (let i = 0; i < 3; i++)
    starts.push(agentFor(t, { brokerUrl, modelsDir: dir, faults: { linkDelayMs: 15 } }).then((a) => void far.push(a)));
  await Promise.all(starts);
  const deadIdentity = generateIdentity('agent');
  const dead = await spawnAgent(t, brokerUrl, deadIdentity);
  return { fast, slow, far, dead, deadIdentity };
}

function quantile(sorted: number[], q: number): number {
  return sorted[Math.min(sorted.length - 1, Math.floor(q * sorted.length))]!;
}

describe('router on a fleet', { timeout: 180_000 }, () => {
  test('20 agents: most traffic goes to the fast near ones, none to slow or far ones once learned, none to a dead one', async (t) => {
    const broker = await brokerFor(t);
    // The twentieth agent is a separate process, killed with SIGKILL once the router knows it.
    const { fast, slow, far, dead, deadIdentity } = await injectedFleet(t, broker.url);

    const router = await routerFor(t, broker.url);
    await router.waitForModel('kws', 20_000, 20);
    // What the broker did with the dead agent, for the message should the router not see it go: when its connection
    // closed, and each status published on its topic (its will included) with the state it carried.
    const startedAt = Date.now();
    const brokerSaw: string[] = [];
    broker.aedes.on('clientDisconnect', (client) => {
      if (client.id === deadIdentity.id) brokerSaw.push(`disconnect at ${Date.now() - startedAt} ms`);
    });
    broker.aedes.on('publish', (packet) => {
      if (packet.topic !== topics.agentStatus(deadIdentity.id)) return;
      let state = '?';
      try {
        state = String((decodeCbor(packet.payload as Buffer) as { state?: unknown }).state);
      } catch {}
      brokerSaw.push(`status ${state} (retain ${packet.retain}) at ${Date.now() - startedAt} ms`);
    });
    dead.kill('SIGKILL');
    await waitFor(
      () => router.agents().find((a) => a.id === deadIdentity.id)?.up === false,
      10_000,
      'the router to see the dead agent go offline',
    ).catch((err: Error) => {
      const seen = router.agents().find((a) => a.id === deadIdentity.id);
      throw new Error(
        `${err.message}: child exit ${dead.exitCode} signal ${dead.signalCode}; the router's view ${JSON.stringify(seen && { up: seen.up, state: (seen as { status?: { state?: string } }).status?.state })}; statuses it refused ${router.counters.statusRejected} as unverified, ${router.counters.statusMalformed} as malformed, ${router.counters.staleOffline} as an older session's offline, ${router.counters.staleRetained} as stale retained copies; the broker: ${brokerSaw.join(', ') || 'nothing'}, still connected ${dead.pid !== undefined && Object.hasOwn((broker.aedes as unknown as { clients: object }).clients, deadIdentity.id)}`,
      );
    });

    const inputs = sampleInputs('kws', 1);
    const results = await runAll(600, 4, () => router.infer('kws', inputs, { deadlineMs: 5_000 }));
    assert.equal(results.length, 600);
    assert.equal(router.counters.ok, 600);
    assert.equal(router.counters.failed, 0);

    const count = (agents: AgentHandle[], from = 0) => results.slice(from).filter((r) => agents.some((a) => a.id === r.agentId)).length;
    const fastShare = count(fast) / results.length;
    const lateFast = count(fast, 300) / 300;
    const tally = { fast: count(fast), slow: count(slow), far: count(far) };
    t.diagnostic(
      `served: ${JSON.stringify(tally)}; fast share ${fastShare.toFixed(3)}, of the last 300 ${lateFast.toFixed(3)}; silenced ${router.counters.silenced}, retries ${router.counters.retries}, hedges ${router.counters.hedges}`,
    );
    assert.equal(router.counters.sentTo[deadIdentity.id] ?? 0, 0, 'no attempt to the dead agent');
    assert.ok(results.every((r) => r.agentId !== deadIdentity.id));
    // Four of twenty agents are fast and near: uniform choice would give them 20 %.
    assert.ok(fastShare > 0.6, `fast near agents served ${(100 * fastShare).toFixed(1)} % (${JSON.stringify(tally)})`);
    assert.ok(
      lateFast > 0.8,
      `after learning, fast near agents served ${(100 * lateFast).toFixed(1)} % of the last 300 (${JSON.stringify(tally)})`,
    );
    // The router told network from compute: far agents are slow by their link, slow ones by their execution.
    const farEntry = router.registry.agents.get(far[0]!.id)!;
    const fastEntry = router.registry.agents.get(fast[0]!.id)!;
    if (Number.isFinite(farEntry.rttMs) && Number.isFinite(fastEntry.rttMs))
      assert.ok(farEntry.rttMs > fastEntry.rttMs + 10, `far rtt ${farEntry.rttMs} vs near ${fastEntry.rttMs}`);
  });

  test('the same injected fleet under each policy: ours, the baselines built into the router (finagle), p2c as a stand-in; both p99s printed', async (t) => {
    const broker = await brokerFor(t);
    const { fast, slow, far, deadIdentity, dead } = await injectedFleet(t, broker.url);
    // Warm every agent first (its first runs are slower), so the policy measured first is not the one
    // that pays for it; each router still starts knowing nothing.
    const warmer = await meshFor(t, { brokerUrl: broker.url });
    await warmer.waitForModel('kws', 20_000, 19);
    for (const agent of [...fast, ...slow, ...far])
      for (let i = 0; i < 5; i++) await warmer.infer('kws', sampleInputs('kws', 1), { deadlineMs: 5_000, agentId: agent.id });
    const policies: [string, string | LivePolicyFactory][] = [
      ['ours', 'ours'],
      ...Object.keys(ROUTER_POLICIES).map((name): [string, string] => [name, name]),
      ['p2c-outstanding', p2cOutstanding],
    ];
    if (!Object.hasOwn(ROUTER_POLICIES, 'finagle'))
      t.diagnostic('finagle is not built into this router: only ours and the p2c stand-in run');
    const routers: [string, RouterHandle][] = [];
    for (const [name, policy] of policies) {
      const router = await routerFor(t, broker.url, { policy });
      await router.waitForModel('kws', 20_000, 20);
      routers.push([name, router]);
    }
    dead.kill('SIGKILL');
    for (const [, router] of routers)
      await waitFor(() => router.agents().find((a) => a.id === deadIdentity.id)?.up === false, 10_000, 'the dead agent offline');

    const inputs = sampleInputs('kws', 1);
    const figures: Record<
      string,
      { p50_ms: number; p99_ms: number; p99_last300_ms: number; failed: number; fast_share: number; extra: Record<string, number> }
    > = {};
    // One policy at a time on the same warm agents, each with a router that starts knowing nothing.
    for (const [name, router] of routers) {
      const results = await runAll(600, 4, () =>
        router.infer('kws', inputs, { deadlineMs: 5_000 }).then(
          (r) => r,
          () => undefined,
        ),
      );
      const ok = results.filter((r) => r !== undefined);
      const all = ok.map((r) => r.timings.totalMs).sort((x, y) => x - y);
      const last = results
        .slice(300)
        .filter((r) => r !== undefined)
        .map((r) => r.timings.totalMs)
        .sort((x, y) => x - y);
      figures[name] = {
        p50_ms: Number(quantile(all, 0.5).toFixed(1)),
        p99_ms: Number(quantile(all, 0.99).toFixed(1)),
        p99_last300_ms: Number(quantile(last, 0.99).toFixed(1)),
        failed: results.length - ok.length,
        fast_share: Number((ok.filter((r) => fast.some((a) => a.id === r.agentId)).length / ok.length).toFixed(3)),
        extra: { retries: router.counters.retries, hedges: router.counters.hedges, silenced: router.counters.silenced },
      };
      assert.equal(router.counters.sentTo[deadIdentity.id] ?? 0, 0, `${name}: nothing to the dead agent`);
    }
    t.diagnostic(`fleet p99 by policy: ${JSON.stringify(figures)}`);
    // Measured, not a race to win here: every policy serves the fleet; ours fails nothing and learns the fast agents.
    assert.equal(figures.ours!.failed, 0);
    assert.ok(figures.ours!.fast_share > 0.6, JSON.stringify(figures));
  });

  test('a gray failure: attempts on an agent that turned slow move to another one (a hedge, or a retry after the per-try timeout), the loser cancelled', async (t) => {
    const broker = await brokerFor(t);
    const dir = await kwsOnlyDir(t);
    const a = await agentFor(t, { brokerUrl: broker.url, modelsDir: dir });
    // b is slower, so the router prefers a until a turns slow (by a margin that a busy machine's noise in
    // a few-millisecond model does not hide).
    const b = await agentFor(t, { brokerUrl: broker.url, modelsDir: dir, faults: { extraExecMs: 10 } });
    const router = await routerFor(t, broker.url, { maxAttempts: 2 });
    await router.waitForModel('kws', 10_000, 2);
    const inputs = sampleInputs('kws', 2);
    // Both healthy: the router learns their service time and its p95.
    await runAll(60, 2, () => router.infer('kws', inputs, { deadlineMs: 5_000 }));
    assert.ok((router.counters.sentTo[a.id] ?? 0) > (router.counters.sentTo[b.id] ?? 0), JSON.stringify(router.counters.sentTo));

    a.setFaults({ extraExecMs: 2_000 });
    const before = { ...router.counters };
    const results = await runAll(20, 1, () => router.infer('kws', inputs, { deadlineMs: 5_000 }));
    // The first request after the change meets the slow agent. A hedge moves it when the budget has a token;
    // ordinary tails of the healthy phase may have spent them (hedging is on whenever the agents report
    // room), and then the per-try timeout (1.5 × the agent's p99, at least 50 ms) moves it instead.
    const moved = results.filter((r) => r.tried.length > 1 && r.tried[0] === a.id);
    assert.ok(moved.length >= 1, `no request moved off the slow agent (${JSON.stringify(router.counters)})`);
    for (const r of moved) {
      assert.equal(r.agentId, b.id, 'the attempt on the healthy agent wins');
      assert.deepEqual(r.tried, [a.id, b.id]);
      assert.ok(r.timings.totalMs < 1_000, `moved request took ${r.timings.totalMs} ms`);
    }
    // A request first sent to b may be hedged to a before the router has seen a turn slow: b still answers it.
    for (const r of results.filter((x) => x.tried[0] === b.id)) assert.equal(r.agentId, b.id, `tried ${r.tried.join(', ')}`);
    assert.ok(router.counters.cancels > before.cancels, 'the slow attempt was cancelled');
    // Every request finished well before the 2 s the slow agent takes.
    assert.ok(
      results.every((r) => r.timings.totalMs < 1_000),
      results.map((r) => r.timings.totalMs.toFixed(0)).join(' '),
    );
    // Hedges are paid from the budget: never more than a few per cent of requests plus the initial token.
    assert.ok(router.counters.hedges - before.hedges <= 1 + 0.05 * 80 + 1, `hedges ${router.counters.hedges}`);
  });

  test('direct mode: the SDK takes route leases from the router and sends straight to agents; without an answer it routes by itself', async (t) => {
    const broker = await brokerFor(t);
    const dir = await kwsOnlyDir(t);
    const near = await agentFor(t, { brokerUrl: broker.url, modelsDir: dir });
    const slowAgent = await agentFor(t, { brokerUrl: broker.url, modelsDir: dir, faults: { extraExecMs: 30 } });
    const router = await routerFor(t, broker.url, { leaseTtlMs: 200 });
    await router.waitForModel('kws', 10_000, 2);
    // Teach the router which agent is slow (through its own forwarding).
    await runAll(40, 2, () => router.infer('kws', sampleInputs('kws', 1), { deadlineMs: 5_000 }));

    const mesh = await meshFor(t, { brokerUrl: broker.url, router: router.id });
    await mesh.waitForModel('kws', 10_000, 2);
    const forwardedBefore = router.counters.requests;
    const results = await runAll(100, 2, () => mesh.infer('kws', sampleInputs('kws', 1), { deadlineMs: 5_000 }));
    assert.ok(results.every((r) => r.routedBy === router.id));
    assert.equal(mesh.counters.routed, 100);
    assert.ok(mesh.counters.leases >= 1 && router.counters.leases >= 1);
    // Leases are reused: far fewer route requests than inference requests.
    assert.ok(router.counters.leases < 60, `leases ${router.counters.leases}`);
    // The requests themselves never went through the router.
    assert.equal(router.counters.requests, forwardedBefore);
    const onNear = results.filter((r) => r.agentId === near.id).length;
    assert.ok(onNear > 80, `near agent served ${onNear} of 100 (slow ${slowAgent.id.slice(0, 12)})`);

    // A client told to use a router that does not exist falls back to routing by itself.
    const orphan = await meshFor(t, { brokerUrl: broker.url, router: generateIdentity('router').id, leaseTimeoutMs: 1_000 });
    await orphan.waitForModel('kws', 10_000);
    const r = await orphan.infer('kws', sampleInputs('kws', 1), { deadlineMs: 5_000 });
    assert.equal(r.routedBy, undefined);
    assert.equal(orphan.counters.leaseFallbacks, 1);
    // It waited for the lease once: the next requests, within a second, do not ask again.
    const startedAt = performance.now();
    for (let i = 0; i < 3; i++) await orphan.infer('kws', sampleInputs('kws', 1), { deadlineMs: 5_000 });
    assert.ok(performance.now() - startedAt < 1_000, `3 requests took ${(performance.now() - startedAt).toFixed(0)} ms`);
    assert.equal(orphan.counters.leaseFallbacks, 4);
  });
});
