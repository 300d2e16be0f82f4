/** The SDK's own choice of agent (sdk/src/policy.ts) for a model that is loading or cold there. No sockets. */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { createFleetView, createRequestEngine, type EngineRequest, type Outcome } from '@edge-mesh/client';
import { encodeMessage, type InferReply, MeshError } from '@edge-mesh/protocol';
import { createSdkPolicy, type SdkReply, type SdkRequest } from '../src/policy.ts';

function fleetOf(...agents: string[]) {
  let now = 1_000;
  const fleet = createFleetView({ requireSignedStatus: false, now: () => now });
  for (const agent of agents)
    fleet.onStatus(
      agent,
      encodeMessage({
        v: 1,
        kind: 'status',
        agent,
        state: 'online',
        ts: 0,
        session: 's',
        workers: 1,
        queueLimit: 64,
        models: [{ name: 'kws', version: '1', sha256: '0'.repeat(64), priceMicros: 0, latencyMs: 50, inputs: [], outputs: [] }],
      }),
    );
  const load = (agent: string, queued: number, state?: 'warm' | 'loading' | 'cold', etaMs?: number) =>
    fleet.onLoad(
      agent,
      encodeMessage({
        v: 1,
        kind: 'load',
        agent,
        ts: 0,
        seq: 1,
        queued,
        inFlight: 0,
        workers: 1,
        models: {
          kws: {
            queued,
            inFlight: 0,
            serviceMs: 50,
            served: 0,
            failed: 0,
            ...(state ? { state } : {}),
            ...(etaMs !== undefined ? { etaMs } : {}),
          },
        },
      }),
    );
  return {
    fleet,
    load,
    at: (t: number) => {
      now = t;
    },
  };
}

function request(deadlineAt: number): EngineRequest<SdkRequest> {
  return {
    key: 'k',
    deadlineAt,
    startedAt: 0,
    maxAttempts: 3,
    model: 'kws',
    data: { model: 'kws', payloadFor: () => new Uint8Array(), lease: undefined, viaRouter: false, pinned: undefined, routedBy: undefined },
  };
}

test('the SDK sends to a loading agent when its ETA + service beats a warm one’s queue, not when the ETA is longer', () => {
  const { fleet, load } = fleetOf('busy', 'loading');
  const policy = createSdkPolicy({ fleet, minHedgeAfterMs: 0, random: () => 0 });
  load('busy', 20); // a second of queue
  load('loading', 0, 'loading', 300);
  const soon = policy.pick(request(10_000), new Set(), 'first', 1_000)!;
  assert.equal(soon.agentId, 'loading');
  assert.ok(soon.predictedMs! >= 300 && soon.predictedMs! < 600, `its ETA is in the estimate: ${soon.predictedMs}`);
  load('loading', 0, 'loading', 4_000);
  assert.equal(policy.pick(request(10_000), new Set(), 'first', 1_000)!.agentId, 'busy');
  // Cold (loaded on first use): it costs a load, the default 5 s before any reply said how long.
  load('loading', 0, 'cold');
  const cold = policy.pick(request(10_000), new Set(['busy']), 'first', 1_000)!;
  assert.ok(cold.predictedMs! >= 5_000, `cold costs a load: ${cold.predictedMs}`);
});

test('an agent claiming "loading, ready in 0 ms" over and over gains no more than the load time its replies showed', () => {
  const { fleet, load, at } = fleetOf('agent-a');
  const policy = createSdkPolicy({ fleet, minHedgeAfterMs: 0, random: () => 0 });
  const req = request(60_000);
  const plan = policy.pick(req, new Set(), 'first', 1_000)!;
  assert.equal(plan.agentId, 'agent-a');
  const attempt = { request: req, agentId: 'agent-a', kind: 'first', index: 0, paid: false, sentAt: 1_000, plan, timedOut: false } as const;
  policy.onSend!(attempt, 1_000);
  // Its reply waited 2 s for the model to load.
  const reply = {
    v: 1,
    kind: 'res',
    id: new Uint8Array(16),
    agent: 'a',
    model: 'kws',
    outputs: {},
    queueMs: 0,
    execMs: 50,
    loadMs: 2_000,
  } as InferReply;
  policy.onAttemptEnd!(attempt, { kind: 'reply', reply: { reply, outputs: {} } }, 3_060);
  const warm = policy.pick(req, new Set(), 'first', 3_100)!.predictedMs!;
  // Evicted, loading again, and claiming it is ready now, every report.
  for (const t of [4_000, 4_500, 5_000]) {
    at(t);
    load('agent-a', 0, 'loading', 0);
  }
  const claimed = policy.pick(req, new Set(), 'first', 5_000)!.predictedMs!;
  assert.ok(Math.abs(claimed - warm - 1_000) < 10, `a second of the 2 s it took is left: ${claimed - warm}`);
  assert.ok(policy.pick(req, new Set(), 'first', 6_100)!.predictedMs! - warm < 10, 'none once that time has passed');
});

test('an agent claiming loadMs 0 for a reply that waited 2 s for its model gains nothing: the 2 s count as network time', () => {
  const { fleet } = fleetOf('agent-honest', 'agent-liar');
  const policy = createSdkPolicy({ fleet, minHedgeAfterMs: 0, random: () => 0 });
  const req = request(60_000);
  const answer = (agentId: string, loadMs: number) => {
    const attempt = {
      request: req,
      agentId,
      kind: 'first',
      index: 0,
      paid: false,
      sentAt: 1_000,
      plan: { agentId },
      timedOut: false,
    } as const;
    policy.onSend!(attempt, 1_000);
    const reply = {
      v: 1,
      kind: 'res',
      id: new Uint8Array(16),
      agent: agentId,
      model: 'kws',
      outputs: {},
      queueMs: 0,
      execMs: 50,
      loadMs,
    } as InferReply;
    policy.onAttemptEnd!(attempt, { kind: 'reply', reply: { reply, outputs: {} } }, 3_051);
  };
  // Both waited 2 s for a cold load; the honest one says so, the liar claims it did not.
  answer('agent-honest', 2_000);
  answer('agent-liar', 0);
  const expected = (agentId: string) =>
    policy.pick(req, new Set(['agent-honest', 'agent-liar'].filter((a) => a !== agentId)), 'retry', 3_100)!.predictedMs!;
  assert.ok(
    expected('agent-liar') > expected('agent-honest') + 300,
    `liar ${expected('agent-liar')} against honest ${expected('agent-honest')}`,
  );
});

test('floorMs: the fastest untried agent by its own claim; one honest agent keeps it low; one probe a second gets past it', () => {
  const { fleet } = fleetOf('honest', 'liar');
  const claim = (agent: string, serviceMs: number) =>
    fleet.onLoad(
      agent,
      encodeMessage({
        v: 1,
        kind: 'load',
        agent,
        ts: 0,
        seq: 1,
        queued: 0,
        inFlight: 0,
        workers: 1,
        models: { kws: { queued: 0, inFlight: 0, serviceMs, served: 0, failed: 0 } },
      }),
    );
  claim('honest', 40);
  claim('liar', 1e9);
  const policy = createSdkPolicy({ fleet, minHedgeAfterMs: 0, random: () => 0 });
  const floorMs = policy.floorMs!;
  // Enough time for the honest agent: nothing to shed, whatever the liar claims.
  assert.equal(floorMs(request(1_100), new Set(), 1_000), undefined);
  // Too little for either: the first such request in a second is let through (a probe), the next is shed.
  assert.equal(floorMs(request(1_030), new Set(), 1_000), undefined);
  assert.equal(floorMs(request(1_030), new Set(), 1_010), 40);
  assert.equal(floorMs(request(2_030), new Set(), 2_000), undefined, 'a second later, another probe');
  // With the honest agent tried, only the liar is left: its claim is the floor.
  assert.equal(floorMs(request(60_000), new Set(['honest']), 2_010), 1e9);
  // No candidate at all: nothing known, nothing shed here (the engine answers MESH_NO_AGENT).
  assert.equal(floorMs(request(1_030), new Set(['honest', 'liar']), 2_020), undefined);
});

/** A request on a lease from router-1 listing these agents, best first, with the router's predictions. */
function leased(agents: [string, number][]): EngineRequest<SdkRequest> {
  const base = request(60_000);
  const lease = {
    router: 'router-1',
    agents: agents.map(([agent, predictedMs]) => ({ agent, predictedMs, serviceMs: 50, timeoutMs: 1_000, hedgeAfterMs: 500 })),
    freshUntil: Number.POSITIVE_INFINITY,
    usableUntil: Number.POSITIVE_INFINITY,
  };
  return { ...base, data: { ...base.data, lease, viaRouter: true } };
}

function attemptAt(req: EngineRequest<SdkRequest>, agentId: string, sentAt: number) {
  return { request: req, agentId, kind: 'first', index: 0, paid: false, sentAt, plan: { agentId }, timedOut: false } as const;
}

test('a leased agent this client saw fail is passed over while the lease has another; an honest lease is followed', () => {
  const { fleet } = fleetOf('liar', 'honest', 'other');
  const routed: boolean[] = [];
  const policy = createSdkPolicy({ fleet, minHedgeAfterMs: 0, random: () => 0, onRouted: (r) => routed.push(r) });
  // Nothing suspect: the lease's order is followed, whichever agent it puts first.
  const first = leased([
    ['honest', 10],
    ['liar', 40],
  ]);
  assert.equal(policy.pick(first, new Set(), 'first', 1_000)!.agentId, 'honest');
  assert.equal(first.data.routedBy, 'router-1');
  assert.equal(
    policy.pick(
      leased([
        ['liar', 5],
        ['honest', 40],
      ]),
      new Set(),
      'first',
      1_000,
    )!.agentId,
    'liar',
  );
  // The router keeps ranking the liar first (it never sees the replies); every request there fails (its runtime, or
  // its own code: any code that says the agent failed rather than the request).
  const faults = ['MESH_INFERENCE_FAILED', 'MESH_INTERNAL', 'MESH_MODEL_INTEGRITY'] as const;
  for (let i = 0; i < 21; i++) {
    const req = leased([
      ['liar', 5],
      ['honest', 40],
    ]);
    const attempt = attemptAt(req, 'liar', 1_000 + i);
    policy.onSend!(attempt, attempt.sentAt);
    policy.onAttemptEnd!(attempt, { kind: 'error', error: new MeshError(faults[i % 3]!, 'failed') }, 1_001 + i);
  }
  // Each of the three codes alone makes an agent suspect; a code about the request does not.
  for (const code of [...faults, 'MESH_BAD_INPUT'] as const) {
    const fresh = createSdkPolicy({ fleet, minHedgeAfterMs: 0, random: () => 0 });
    const req = leased([['liar', 5]]);
    const attempt = attemptAt(req, 'liar', 1_000);
    fresh.onSend!(attempt, attempt.sentAt);
    fresh.onAttemptEnd!(attempt, { kind: 'error', error: new MeshError(code, 'failed') }, 1_001);
    assert.deepEqual(fresh.suspects('kws', 1_002), code === 'MESH_BAD_INPUT' ? [] : ['liar'], code);
  }
  const after = leased([
    ['liar', 5],
    ['honest', 40],
  ]);
  assert.equal(policy.pick(after, new Set(), 'first', 1_100)!.agentId, 'honest');
  assert.equal(after.data.routedBy, 'router-1', 'still on the lease');
  // A lease of nothing but the liar: the SDK picks by itself, among agents it has not seen fail.
  routed.length = 0;
  assert.notEqual(policy.pick(leased([['liar', 5]]), new Set(), 'first', 1_100)!.agentId, 'liar');
  assert.deepEqual(routed, [false]);
  // The route question leaves it out, unless nothing else serves the model.
  assert.deepEqual(policy.suspects('kws', 1_100), ['liar']);
  // Suspicion lapses (3 s after the last failure): the lease is followed again.
  assert.equal(
    policy.pick(
      leased([
        ['liar', 5],
        ['honest', 40],
      ]),
      new Set(),
      'first',
      4_100,
    )!.agentId,
    'liar',
  );
  assert.deepEqual(policy.suspects('kws', 4_100), []);
});

test('a leased agent claiming many workers still counts this client’s outstanding work there in full', () => {
  const { fleet } = fleetOf('liar', 'honest');
  fleet.onStatus(
    'liar',
    encodeMessage({
      v: 1,
      kind: 'status',
      agent: 'liar',
      state: 'online',
      ts: 0,
      session: 's',
      workers: 1_000,
      queueLimit: 64,
      models: [{ name: 'kws', version: '1', sha256: '0'.repeat(64), priceMicros: 0, latencyMs: 50, inputs: [], outputs: [] }],
    }),
  );
  const policy = createSdkPolicy({ fleet, minHedgeAfterMs: 0, random: () => 0 });
  const lease: [string, number][] = [
    ['liar', 10],
    ['honest', 12],
  ];
  const req = leased(lease);
  assert.equal(policy.pick(req, new Set(), 'first', 1_000)!.agentId, 'liar');
  const attempt = attemptAt(req, 'liar', 1_000);
  policy.onSend!(attempt, 1_000);
  // 50 ms of this client's work waits there: not 50 / 1,000.
  assert.equal(policy.pick(leased(lease), new Set(), 'first', 1_000)!.agentId, 'honest');
});

test('a leased agent that answers far later than the router predicted is passed over until its lateness fades', () => {
  const { fleet } = fleetOf('liar', 'honest');
  const policy = createSdkPolicy({ fleet, minHedgeAfterMs: 0, random: () => 0 });
  // The router believes the liar's claims (idle and fast) and never sees its replies: it keeps ranking it first.
  const lease: [string, number][] = [
    ['liar', 1],
    ['honest', 2],
  ];
  const reply = (agentId: string) =>
    ({ v: 1, kind: 'res', id: new Uint8Array(16), agent: agentId, model: 'kws', outputs: {}, queueMs: 0, execMs: 0.01 }) as InferReply;
  /** One leased request, answered `ms` after it was sent at `at`; returns the agent the policy chose. */
  const serve = (at: number, ms: (agentId: string) => number) => {
    const req = leased(lease);
    const plan = policy.pick(req, new Set(), 'first', at)!;
    const attempt = {
      request: req,
      agentId: plan.agentId,
      kind: 'first',
      index: 0,
      paid: false,
      sentAt: at,
      plan,
      timedOut: false,
    } as const;
    policy.onSend!(attempt, at);
    policy.onAttemptEnd!(attempt, { kind: 'reply', reply: { reply: reply(plan.agentId), outputs: {} } }, at + ms(plan.agentId));
    return plan.agentId;
  };
  const slow = (agentId: string) => (agentId === 'liar' ? 100 : 1);
  // First the lease is followed; the liar's answer comes 100 ms late and the next requests go to the honest agent.
  assert.equal(serve(1_000, slow), 'liar');
  const next = Array.from({ length: 20 }, (_, i) => serve(1_200 + i * 10, slow));
  assert.deepEqual(new Set(next), new Set(['honest']));
  // An honest agent answering as predicted keeps no lateness: with the liar gone, it is not passed over.
  assert.ok(policy.pick(leased(lease), new Set(['liar']), 'retry', 1_500)!.agentId === 'honest');
  // The lateness fades: some seconds later the liar is tried again (and, still late, passed over again).
  assert.equal(serve(30_000, slow), 'liar');
  assert.equal(serve(30_200, slow), 'honest');
  // An attempt past its per-try timeout and cancelled unanswered counts as late by at least the time it ran.
  const fresh = createSdkPolicy({ fleet, minHedgeAfterMs: 0, random: () => 0 });
  const req = leased(lease);
  const plan = fresh.pick(req, new Set(), 'first', 1_000)!;
  assert.equal(plan.agentId, 'liar');
  const attempt = { request: req, agentId: 'liar', kind: 'first', index: 0, paid: false, sentAt: 1_000, plan, timedOut: true } as const;
  fresh.onSend!(attempt, 1_000);
  fresh.onAttemptEnd!(attempt, { kind: 'cancelled', reason: 'answered-elsewhere' }, 1_300);
  assert.equal(fresh.pick(leased(lease), new Set(), 'first', 1_301)!.agentId, 'honest');
});

test('a retry, failover or hedge never goes to a silent agent; a first attempt still may when no other is left', () => {
  const { fleet, load, at } = fleetOf('hung', 'survivor');
  const policy = createSdkPolicy({ fleet, minHedgeAfterMs: 0, random: () => 0 });
  // Heartbeats every 200 ms from both, then only from the survivor: 'hung' is silent 1 s after its last one.
  for (const t of [1_000, 1_200, 1_400]) {
    at(t);
    load('hung', 0);
    load('survivor', 0);
  }
  for (const t of [1_600, 1_800, 2_000, 2_200, 2_400]) {
    at(t);
    load('survivor', 5);
  }
  at(2_500);
  assert.equal(fleet.silent('hung', 2_500), true);
  assert.equal(fleet.silent('survivor', 2_500), false);
  // Idle by its last report, 'hung' would win on expected time; silent, it is passed over while the survivor is left.
  assert.equal(policy.pick(request(10_000), new Set(), 'first', 2_500)!.agentId, 'survivor');
  // The survivor already tried (its attempt timed out and still runs): no retry, failover or hedge to the silent one.
  for (const kind of ['retry', 'failover', 'hedge'] as const)
    assert.equal(policy.pick(request(10_000), new Set(['survivor']), kind, 2_500), undefined, kind);
  assert.equal(policy.pick(request(10_000), new Set(['survivor']), 'first', 2_500)?.agentId, 'hung');
  // Heard from again, it is an agent like any other.
  load('hung', 0);
  assert.equal(policy.pick(request(10_000), new Set(['survivor']), 'retry', 2_500)?.agentId, 'hung');
});

test('with the other agent tried and its attempt failed, a request fails with that error instead of retrying at a silent agent', () => {
  const { fleet, load, at } = fleetOf('hung', 'survivor');
  const policy = createSdkPolicy({ fleet, minHedgeAfterMs: 60_000, random: () => 0 });
  for (const t of [1_000, 1_200, 1_400]) {
    at(t);
    load('hung', 0);
    load('survivor', 0);
  }
  for (const t of [1_600, 1_800, 2_000, 2_200, 2_400]) {
    at(t);
    load('survivor', 5);
  }
  at(2_500);
  const sent: string[] = [];
  const engine = createRequestEngine<SdkRequest, SdkReply>({
    policy,
    transport: { send: (a) => void sent.push(a.agentId), cancel() {} },
    clock: { now: () => 2_500, setTimer: () => undefined, clearTimer() {} },
    liveness: { isSilent: (agentId, now) => fleet.silent(agentId, now) },
  });
  const { data } = request(12_500);
  let outcome: Outcome<SdkRequest, SdkReply> | undefined;
  engine.start({ key: 'k', deadlineAt: 12_500, data, model: 'kws' }, (o) => {
    outcome = o;
  });
  assert.deepEqual(sent, ['survivor']);
  engine.fail('k', 'survivor', new MeshError('MESH_BUSY', 'queue full'));
  assert.deepEqual(sent, ['survivor'], 'no retry sent to the silent agent');
  assert.ok(outcome !== undefined && !outcome.ok, 'the request ended');
  assert.equal(outcome.error.code, 'MESH_BUSY');
  assert.equal(engine.pending, 0);
});
