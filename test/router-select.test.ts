/** Router core: selection table tests, sampling statistics, ejection, Vivaldi, estimate formulas. No sockets. */
import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import type { Attempt } from '@edge-mesh/client';
import { type AgentStatus, MeshError } from '@edge-mesh/protocol';
import {
  type AgentDescriptor,
  applyVivaldiSample,
  createRegistry,
  createRouterPolicy,
  currentPool,
  expectedCompletionMs,
  hedgeDelayMs,
  isEjected,
  mulberry32,
  newCoord,
  onFailure,
  onLoad,
  onQueueReport,
  onReply,
  onSend,
  onStatus,
  perTryTimeoutMs,
  pFailAt,
  type Registry,
  type RouteRequest,
  type RouterAsk,
  type RouterOptions,
  selectAgent,
  serviceMsAt,
  upsertAgent,
  vivaldiDistanceMs,
} from '@edge-mesh/router';

/** Two-candidate pools with no exploration make every table row deterministic. */
function registry(agents: AgentDescriptor[], options: RouterOptions = {}, nowMs = 0): Registry {
  const reg = createRegistry({ site: 'near', sameSiteRttMs: 2, crossSiteRttMs: 80, exploreRate: 0, ...options });
  for (const a of agents) upsertAgent(reg, a, nowMs);
  return reg;
}

const agent = (
  agentId: string,
  serviceMs: number,
  extra: Partial<AgentDescriptor> & { warm?: boolean; coldLoadMs?: number } = {},
): AgentDescriptor => ({
  agentId,
  hardwareClass: extra.hardwareClass ?? 'gpu',
  site: extra.site ?? 'near',
  slots: extra.slots ?? 1,
  models: [
    { model: 'kws', serviceMs, warm: extra.warm ?? true, ...(extra.coldLoadMs !== undefined ? { coldLoadMs: extra.coldLoadMs } : {}) },
  ],
});

describe('selectAgent table', () => {
  const rows: {
    name: string;
    agents: AgentDescriptor[];
    setup?: (reg: Registry) => void;
    request: RouteRequest;
    nowMs: number;
    expect: string;
  }[] = [
    {
      name: 'fast near node beats slow far node',
      agents: [agent('far-slow', 400, { site: 'far' }), agent('near-fast', 10)],
      request: { model: 'kws' },
      nowMs: 1,
      expect: 'near-fast',
    },
    {
      name: 'fast far node beats a CPU node next door',
      agents: [agent('far-fast', 10, { site: 'far' }), agent('near-cpu', 400)],
      request: { model: 'kws' },
      nowMs: 1,
      expect: 'far-fast',
    },
    {
      name: 'reported queue depth shifts the choice',
      agents: [agent('fast-busy', 10), agent('mid-idle', 50)],
      setup: (reg) => onQueueReport(reg, 'fast-busy', 20, 1),
      request: { model: 'kws' },
      nowMs: 1,
      expect: 'mid-idle',
    },
    {
      name: "the router's own outstanding requests shift the choice",
      agents: [agent('fast', 10), agent('mid', 50)],
      setup: (reg) => {
        for (let i = 0; i < 6; i++) onSend(reg, 'fast', 'kws', 1);
      },
      request: { model: 'kws' },
      nowMs: 1,
      expect: 'mid',
    },
    {
      name: 'a cold model pays its load time',
      agents: [agent('fast-cold', 10, { warm: false, coldLoadMs: 3000 }), agent('slow-warm', 80)],
      request: { model: 'kws' },
      nowMs: 1,
      expect: 'slow-warm',
    },
    {
      name: 'a cold node wins when every warm node has a long queue',
      agents: [agent('fast-cold', 10, { warm: false, coldLoadMs: 300 }), agent('slow-warm', 80)],
      setup: (reg) => onQueueReport(reg, 'slow-warm', 10, 1),
      request: { model: 'kws' },
      nowMs: 1,
      expect: 'fast-cold',
    },
    {
      name: 'a large upload prefers the near node',
      agents: [agent('far', 10, { site: 'far' }), agent('near', 60)],
      request: { model: 'kws', bytesUp: 1_000_000 },
      nowMs: 1,
      expect: 'near',
    },
    {
      name: 'the deadline refuses at once when nothing can make it',
      agents: [agent('a', 100), agent('b', 120)],
      request: { model: 'kws', deadlineMs: 51 },
      nowMs: 1,
      expect: 'MESH_DEADLINE_EXCEEDED',
    },
    {
      name: 'a queue is no reason to refuse: the agent runs the earliest deadline first',
      agents: [agent('busy', 20)],
      setup: (reg) => onQueueReport(reg, 'busy', 10, 1),
      request: { model: 'kws', deadlineMs: 101 },
      nowMs: 1,
      expect: 'busy',
    },
    {
      name: 'a deadline one node can make is routed there',
      agents: [agent('slow', 300), agent('ok', 40)],
      request: { model: 'kws', deadlineMs: 101 },
      nowMs: 1,
      expect: 'ok',
    },
    { name: 'an unknown model has no agent', agents: [agent('a', 10)], request: { model: 'ocr' }, nowMs: 1, expect: 'MESH_NO_AGENT' },
    {
      name: 'excluded (previous attempt) agents are skipped',
      agents: [agent('best', 10), agent('other', 30)],
      request: { model: 'kws', exclude: new Set(['best']) },
      nowMs: 1,
      expect: 'other',
    },
    {
      name: 'a silent agent (no heartbeat for 3 s) is skipped',
      agents: [agent('best', 10), agent('other', 30)],
      setup: (reg) => onQueueReport(reg, 'other', 0, 3_500),
      request: { model: 'kws' },
      nowMs: 3_600,
      expect: 'other',
    },
  ];
  for (const row of rows) {
    test(row.name, () => {
      const reg = registry(row.agents);
      row.setup?.(reg);
      const sel = selectAgent(reg, row.request, row.nowMs, mulberry32(7));
      assert.equal(sel.ok ? sel.agentId : sel.code, row.expect);
    });
  }
});

test('ECT follows the formula: κ · (RTT + bytes/rate + S·max(0, q + W·os + 1 − c)/c + S + cold)', () => {
  const reg = registry([agent('a', 20, { slots: 2 })], { routers: 3, defaultBytesPerMs: 1000 });
  const e = reg.agents.get('a')!.models.get('kws')!;
  onQueueReport(reg, 'a', 4, 0);
  onSend(reg, 'a', 'kws', 0);
  // ahead = 4 + 3·1 = 7; wait = 20 · (7 + 1 − 2) / 2 = 60; net = 2 + 5000/1000 = 7.
  assert.equal(expectedCompletionMs(e, { model: 'kws', bytesUp: 4000, bytesDown: 1000 }, 0), 7 + 60 + 20);
  e.warm = false;
  e.coldLoadMs = 1000;
  assert.equal(expectedCompletionMs(e, { model: 'kws' }, 0), 2 + 60 + 20 + 1000);
});

test('estimates update as the formulas say', () => {
  const status: AgentStatus = {
    v: 1,
    kind: 'status',
    agent: 'jetson-1',
    state: 'online',
    ts: 0,
    providers: ['cuda', 'cpu'],
    workers: 2,
    models: [{ name: 'kws', version: '1', sha256: '0'.repeat(64), priceMicros: 1, latencyMs: 20, inputs: [], outputs: [] }],
  };
  const reg = createRegistry({ site: 'near' });
  const a = onStatus(reg, status, 0, { site: 'near' })!;
  assert.equal(a.hardwareClass, 'gpu-cuda');
  assert.equal(a.slots, 2);
  const e = a.models.get('kws')!;
  assert.equal(serviceMsAt(e, 0), 20, 'seeded by the measured latency');

  onSend(reg, 'jetson-1', 'kws', 0);
  assert.equal(a.outstanding, 1);
  onReply(reg, 'jetson-1', 'kws', { queueMs: 0, execMs: 40, rttMs: 6, bytes: 100 }, 5_000);
  const w = Math.exp(-5_000 / 10_000);
  assert.ok(Math.abs(e.serviceMs - (w * 20 + (1 - w) * 40)) < 1e-9, 'S = w·S + (1 − w)·exec, w = e^(−Δt/τ)');
  assert.equal(a.outstanding, 0);
  assert.ok(a.rttMs > 5 && a.rttMs < 6, `the first sample moves the RTT most of the way from its 4 ms prior: ${a.rttMs}`);
  onReply(reg, 'jetson-1', 'kws', { queueMs: 0, execMs: 40, rttMs: 6 + 100_000 / 500, bytes: 100_000 }, 6_000);
  // Two sizes fix the line (router/src/netfit.ts): 6 ms at 100 bytes and 206 ms at 100 kB is 500 bytes/ms.
  assert.ok(Math.abs(a.bytesPerMs - 500) < 25, `a large payload teaches the rate: ${a.bytesPerMs}`);
  assert.ok(Math.abs(a.rttMs - 6) < 0.5, `and leaves the RTT at the small one's: ${a.rttMs}`);

  onFailure(reg, 'jetson-1', 'kws', 6_000);
  assert.ok(Math.abs(a.pFail - 0.1) < 1e-9, 'p_fail EWMA α = 0.1');
  onLoad(
    reg,
    {
      v: 1,
      kind: 'load',
      agent: 'jetson-1',
      ts: 0,
      seq: 1,
      queued: 3,
      inFlight: 2,
      workers: 4,
      models: { kws: { queued: 3, inFlight: 2, serviceMs: 25, served: 9, failed: 0 } },
    },
    7_000,
  );
  assert.equal(a.reportedRif, 5);
  assert.equal(a.slots, 4);
  assert.equal(e.priorServiceMs, 25);
  // With no samples the service estimate drifts back to the agent's own figure.
  assert.ok(Math.abs(serviceMsAt(e, 1_000_000) - 25) < 1e-6);

  onStatus(reg, { ...status, state: 'offline' }, 8_000);
  assert.equal(a.up, false);
  assert.equal(selectAgent(reg, { model: 'kws' }, 8_000, mulberry32(1)).ok, false);
});

test('an agent is tracked for 256 models at most: more are ignored, renamed ones replace the old, and what no agent serves is forgotten', () => {
  const reg = registry([agent('steady', 10)]);
  const many = (prefix: string, n: number) => Array.from({ length: n }, (_, i) => ({ model: `${prefix}-${i}`, serviceMs: 5 }));
  // 256: the most models a status may list (protocol/src/schemas.ts), MAX_MODELS_PER_AGENT in the registry.
  const a = upsertAgent(reg, { agentId: 'many', hardwareClass: 'cpu-x64', models: [...many('a', 300), { model: 'kws', serviceMs: 5 }] }, 0);
  assert.equal(a.models.size, 256, 'the first 256 names only');
  assert.ok(a.models.has('a-255') && !a.models.has('a-256') && !a.models.has('kws'));
  assert.equal(reg.pools.size, 257);
  // Every status names a new set (and a new class): the old names, and their class stats, go with it.
  for (let round = 0; round < 20; round++) {
    upsertAgent(
      reg,
      { agentId: 'many', hardwareClass: `cpu-${round}`, models: [...many(`r${round}`, 255), { model: 'kws', serviceMs: 5 }] },
      round,
    );
  }
  assert.equal(reg.pools.size, 256, "kws and the last round's 255 names");
  assert.equal(reg.classStats.size, 257, "steady's kws, and the 256 (class, model) the renaming agent holds now");
  assert.deepEqual([...reg.classMembers.keys()].sort(), ['cpu-19', 'gpu']);
  assert.equal(reg.pools.get('kws')!.entries.length, 2);
  // kws is still routed; once no agent names it, its pool and class stats are forgotten.
  const picked = selectAgent(reg, { model: 'kws', deadlineMs: 1_000 }, 20, mulberry32(1));
  assert.ok(picked.ok);
  upsertAgent(reg, { agentId: 'many', hardwareClass: 'cpu-19', models: [] }, 21);
  upsertAgent(reg, { ...agent('steady', 10), models: [] }, 21);
  assert.equal(reg.pools.size, 0);
  assert.equal(reg.classStats.size, 0);
});

test('hedge delay = max(p95, 2 × predicted); per-try timeout = clamp(5 × predicted, 250 ms, remaining) with no history', () => {
  // The history is another node's of the same class: this node has none of its own, so the class p95 counts.
  const reg = registry([agent('a', 10), agent('b', 10)]);
  const e = reg.agents.get('a')!.models.get('kws')!;
  assert.equal(hedgeDelayMs(e, 30), 60, 'no history: 2 × predicted');
  for (let i = 0; i < 100; i++) onReply(reg, 'b', 'kws', { queueMs: 0, execMs: 10, e2eMs: i < 90 ? 20 : 500 }, i);
  assert.equal(hedgeDelayMs(e, 30), 500, 'p95 of the (class, model) e2e history');
  assert.equal(hedgeDelayMs(e, 400), 800);
  assert.equal(perTryTimeoutMs(reg, 10), 250);
  assert.equal(perTryTimeoutMs(reg, 100), 500);
  assert.equal(perTryTimeoutMs(reg, 100, 120), 120);
  assert.equal(perTryTimeoutMs(reg, 10, Number.POSITIVE_INFINITY, e), 250, 'a node with no history of its own: the same rule');
});

/** 100 nodes, 10 / 30 / 60 % fast GPU / mid GPU / CPU, 40× apart; all in one pool so only the sampling differs. */
function mixedFleet(): Registry {
  const agents: AgentDescriptor[] = [];
  for (let i = 0; i < 100; i++) {
    const [cls, ms, slots] = i < 10 ? ['gpu-fast', 10, 3] : i < 40 ? ['gpu-mid', 40, 2] : ['cpu', 400, 1];
    agents.push({
      agentId: `n-${i}`,
      hardwareClass: cls as string,
      site: 'near',
      slots: slots as number,
      models: [{ model: 'kws', serviceMs: ms as number }],
    });
  }
  return registry(agents, { poolSize: 100 });
}

test('capacity-weighted sampling on a 10/30/60 % fleet picks fast nodes far more often than uniform', () => {
  const count = (uniform: boolean) => {
    const reg = mixedFleet();
    const rng = mulberry32(12345);
    const byClass: Record<string, number> = { 'gpu-fast': 0, 'gpu-mid': 0, cpu: 0 };
    const n = 20_000;
    for (let i = 0; i < n; i++) {
      const sel = selectAgent(reg, { model: 'kws' }, 1, rng, { uniform, choices: 2 });
      assert.ok(sel.ok);
      byClass[sel.entry.agent.hardwareClass]!++;
    }
    return Object.fromEntries(Object.entries(byClass).map(([k, v]) => [k, v / n]));
  };
  const weighted = count(false);
  const uniform = count(true);
  // Uniform pair: P(at least one fast) = 1 − 0.9² ≈ 0.19 and P(two CPUs) = 0.36; weighted: capacity 3/10 vs 1/400.
  assert.ok(uniform['gpu-fast']! > 0.15 && uniform['gpu-fast']! < 0.24, JSON.stringify(uniform));
  assert.ok(uniform.cpu! > 0.3, JSON.stringify(uniform));
  assert.ok(weighted['gpu-fast']! > 0.8, JSON.stringify(weighted));
  assert.ok(weighted.cpu! < 0.01, JSON.stringify(weighted));
});

test('ejected nodes are never chosen and come back slowly', () => {
  const ids = ['e-0', 'e-1', 'e-2', 'e-3'];
  const reg = registry(
    ids.map((id) => agent(id, 10)),
    { slowStartWindowMs: 30_000 },
    -60_000, // past the slow start of the whole fleet
  );
  const keepAlive = (t: number) => {
    for (const id of ids) onQueueReport(reg, id, 0, t);
  };
  const share = (t: number, n = 4000) => {
    keepAlive(t);
    const rng = mulberry32(99);
    let hits = 0;
    for (let i = 0; i < n; i++) {
      const sel = selectAgent(reg, { model: 'kws' }, t, rng);
      assert.ok(sel.ok);
      if (sel.agentId === 'e-0') hits++;
    }
    return hits / n;
  };
  assert.ok(share(0) > 0.18, 'a healthy node gets its share');
  for (let i = 0; i < 4; i++) onFailure(reg, 'e-0', 'kws', 1);
  assert.equal(isEjected(reg.agents.get('e-0')!, 1), false, '4 consecutive failures do not eject');
  assert.equal(onFailure(reg, 'e-0', 'kws', 1), true, 'the 5th does');
  // 30 s × k (k = 1) ± 10 %: out for at least 27 s.
  for (const t of [2, 1_000, 10_000, 26_000]) assert.equal(share(t, 500), 0, `never chosen at ${t} ms`);
  const back = reg.agents.get('e-0')!.ejectedUntilMs;
  assert.ok(back >= 27_001 && back <= 33_001, `ejected until ${back}`);
  const justBack = share(back + 1_000);
  const later = share(back + 40_000);
  assert.ok(justBack > 0 && justBack < 0.08, `slow start right after return: ${justBack}`);
  assert.ok(later > 0.18, `full share after the ramp: ${later}`);
  // A second ejection lasts twice as long.
  for (let i = 0; i < 5; i++) onFailure(reg, 'e-0', 'kws', back + 41_000);
  assert.ok(reg.agents.get('e-0')!.ejectedUntilMs - (back + 41_000) >= 54_000);
});

test('ejection never takes out more than half of a hardware class', () => {
  const reg = registry([agent('c-0', 10), agent('c-1', 10)]);
  for (let i = 0; i < 5; i++) onFailure(reg, 'c-0', 'kws', 1);
  for (let i = 0; i < 5; i++) onFailure(reg, 'c-1', 'kws', 1);
  assert.equal(isEjected(reg.agents.get('c-0')!, 2), true);
  assert.equal(isEjected(reg.agents.get('c-1')!, 2), false);
});

test('a per-try timeout, a busy refusal or a crash is not a broken agent: none of them ejects; five errors in a row do', () => {
  // On the homogeneous control every agent of the one class ran over its per-try timer in the same
  // burst; five in a row ejected it, up to half the fleet, and the rest drowned (docs/routing.md).
  const ids = ['b-0', 'b-1', 'b-2', 'b-3'];
  const reg = registry(
    ids.map((id) => agent(id, 10)),
    {},
    -60_000,
  );
  const policy = createRouterPolicy(reg, { warming: false, hedging: false });
  let n = 0;
  const attemptAt = (agentId: string, t: number): Attempt<RouterAsk> => {
    const request = {
      key: `r${n++}`,
      deadlineAt: t + 500,
      startedAt: t,
      data: { model: 'kws', bytesUp: 100 },
      maxAttempts: 3,
      model: 'kws',
    };
    const attempt = {
      request,
      agentId,
      kind: 'first',
      index: 0,
      paid: false,
      sentAt: t,
      plan: { agentId, predictedMs: 12, timeoutMs: 250 },
      timedOut: false,
    } as Attempt<RouterAsk>;
    policy.onSend!(attempt, t);
    return attempt;
  };
  const share = (t: number, who = 'b-0') => {
    for (const id of ids) onQueueReport(reg, id, 0, t);
    const rng = mulberry32(5);
    let hits = 0;
    for (let i = 0; i < 2000; i++) {
      const sel = selectAgent(reg, { model: 'kws' }, t, rng);
      if (sel.ok && sel.agentId === who) hits++;
    }
    return hits / 2000;
  };
  assert.ok(share(0) > 0.18, 'a healthy agent gets its share');
  const b0 = reg.agents.get('b-0')!;
  for (let i = 0; i < 10; i++) policy.onTimeout!(attemptAt('b-0', 10 * i), 10 * i + 250);
  assert.equal(isEjected(b0, 400), false, 'ten per-try timeouts in a row do not eject');
  assert.ok(pFailAt(b0, 400) > 0.5, `p_fail ${pFailAt(b0, 400)}`);
  assert.ok(share(400) < 0.05, `but the agent is priced down: ${share(400)}`);
  // A liar refuses everything as busy while claiming an empty queue (its load reports say empty too):
  // not ejected, but its failures price it out all the same.
  const busy = () => new MeshError('MESH_BUSY', 'queue full', { details: { rif: 0, workMs: 0 } });
  for (let i = 0; i < 10; i++) policy.onAttemptEnd!(attemptAt('b-1', 500 + i), { kind: 'error', error: busy() }, 501 + i);
  assert.equal(isEjected(reg.agents.get('b-1')!, 600), false, 'ten busy refusals in a row do not eject');
  assert.ok(share(600, 'b-1') < 0.05, `the refuser is priced down: ${share(600, 'b-1')}`);
  // A crash fails every attempt the agent held at once: one event, not five failures. The agent is down
  // until it is heard from again, then comes back through the slow start, not after an ejection.
  for (let i = 0; i < 6; i++) {
    const error = new MeshError('MESH_AGENT_LOST', 'agent went offline');
    policy.onAttemptEnd!(attemptAt('b-3', 600 + i), { kind: 'error', error }, 650);
  }
  const b3 = reg.agents.get('b-3')!;
  assert.equal(b3.up, false, 'a lost agent is down');
  assert.equal(isEjected(b3, 660), false, 'six attempts lost with it do not eject it');
  // An agent that answers errors is broken: the fifth in a row ejects it.
  for (let i = 0; i < 5; i++) {
    const error = new MeshError('MESH_INFERENCE_FAILED', 'runtime failed');
    policy.onAttemptEnd!(attemptAt('b-2', 700 + i), { kind: 'error', error }, 701 + i);
  }
  assert.equal(isEjected(reg.agents.get('b-2')!, 710), true, 'five errors in a row eject');
});

test('exploration is bounded by ε and reaches outside the pool', () => {
  const agents = Array.from({ length: 200 }, (_, i) => agent(`x-${i}`, 10));
  const reg = registry(agents, { exploreRate: 0.03, poolSize: 16 });
  const pool = currentPool(reg, { model: 'kws' }, 1)!;
  assert.equal(pool.pool.length, 16);
  // Make the pool look busy (no rebuild before 1 s), so an exploration candidate wins whenever it is drawn.
  for (const e of pool.pool) onQueueReport(reg, e.agent.agentId, 5, 1);
  const rng = mulberry32(2024);
  let explored = 0;
  let outside = 0;
  const n = 20_000;
  for (let i = 0; i < n; i++) {
    const sel = selectAgent(reg, { model: 'kws' }, 1, rng);
    assert.ok(sel.ok);
    if (sel.explored) explored++;
    if (!pool.inPool.has(sel.entry)) outside++;
  }
  assert.equal(outside, explored);
  assert.ok(explored / n > 0.02 && explored / n < 0.04, `explored ${explored / n}`);
});

test('pool spills over to farther capacity when the near pool has no free slots', () => {
  const agents = [
    ...Array.from({ length: 4 }, (_, i) => agent(`near-${i}`, 10)),
    ...Array.from({ length: 20 }, (_, i) => agent(`far-${i}`, 10, { site: 'far' })),
  ];
  const reg = registry(agents, { poolSize: 4 });
  assert.deepEqual(
    currentPool(reg, { model: 'kws' }, 1)!
      .pool.map((e) => e.agent.agentId)
      .sort(),
    ['near-0', 'near-1', 'near-2', 'near-3'],
  );
  for (let i = 0; i < 4; i++) onQueueReport(reg, `near-${i}`, 8, 1_100);
  assert.ok(currentPool(reg, { model: 'kws' }, 1_900)!.pool.length > 4);
});

test('Vivaldi converges on a small synthetic triangle', () => {
  const truth = [
    { x: 0, y: 0, h: 2 },
    { x: 30, y: 0, h: 3 },
    { x: 0, y: 40, h: 5 },
  ];
  const rtt = (i: number, j: number) => Math.hypot(truth[i]!.x - truth[j]!.x, truth[i]!.y - truth[j]!.y) + truth[i]!.h + truth[j]!.h;
  const coords = truth.map(() => newCoord());
  const rng = mulberry32(3);
  for (let round = 0; round < 2000; round++) {
    const i = Math.floor(rng() * 3);
    const j = (i + 1 + Math.floor(rng() * 2)) % 3;
    applyVivaldiSample(coords[i]!, { ...coords[j]! }, rtt(i, j), rng);
  }
  for (let i = 0; i < 3; i++) {
    for (let j = i + 1; j < 3; j++) {
      const predicted = vivaldiDistanceMs(coords[i]!, coords[j]!);
      assert.ok(Math.abs(predicted - rtt(i, j)) / rtt(i, j) < 0.05, `${i}-${j}: ${predicted} vs ${rtt(i, j)}`);
    }
  }
  assert.ok(
    coords.every((c) => c.error < 0.2),
    JSON.stringify(coords),
  );
});

test('a fail-fast node stops looking fast', () => {
  const reg = registry([agent('fails-fast', 5), agent('honest', 12)]);
  assert.equal((selectAgent(reg, { model: 'kws' }, 1, mulberry32(1)) as { agentId: string }).agentId, 'fails-fast');
  for (let i = 0; i < 3; i++) onFailure(reg, 'fails-fast', 'kws', 1);
  const sel = selectAgent(reg, { model: 'kws' }, 2, mulberry32(1));
  assert.ok(sel.ok && sel.agentId === 'honest');
});
