/**
 * What a reply may claim (docs/routing.md): the agent's queue, its cold-load time and its model state
 * travel on the wire, and a receiver bounds each claim by what it measured. No sockets here; the live
 * version, with a lying agent on a real broker, is in router-live.test.ts.
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { boundQueueClaim, fitTimesToAttempt, maxHeldRequests } from '@edge-mesh/client';
import { type AgentStatus, decodeMessage, encodeMessage, MeshError, newRequestId } from '@edge-mesh/protocol';
import {
  createRegistry,
  createRouterPolicy,
  expectedCompletionMs,
  fleetUtilization,
  markDown,
  mulberry32,
  onLoad,
  onReply,
  onSend,
  onStatus,
  type Registry,
  selectAgent,
  upsertAgent,
} from '@edge-mesh/router';

const reply = { v: 1, kind: 'res', id: newRequestId(), agent: 'agent-abc', model: 'kws', outputs: {}, queueMs: 0, execMs: 1 } as const;

test('the schema takes a queue, work and load time in range, and refuses anything else', () => {
  const ok = decodeMessage(encodeMessage({ ...reply, rif: 3, workMs: 2.5, loadMs: 1_200 }), ['res']);
  assert.deepEqual([ok.rif, ok.workMs, ok.loadMs], [3, 2.5, 1_200]);
  const old = decodeMessage(encodeMessage(reply), ['res']);
  assert.equal(old.rif, undefined, 'a reply without them still decodes (the fields are optional)');
  const err = decodeMessage(
    encodeMessage({ v: 1, kind: 'err', id: reply.id, agent: 'agent-abc', code: 'MESH_BUSY', message: 'full', rif: 66, workMs: 6 }),
    ['err'],
  );
  assert.equal(err.rif, 66);
  for (const bad of [
    { rif: -1 },
    { rif: 1.5 },
    { rif: 2 ** 21 },
    { workMs: Number.NaN },
    { workMs: Number.POSITIVE_INFINITY },
    { workMs: -0.5 },
    { loadMs: 1e300 },
  ]) {
    assert.throws(
      () => decodeMessage(encodeMessage({ ...reply, ...bad }), ['res']),
      (e: unknown) => e instanceof MeshError && e.code === 'MESH_BAD_REQUEST',
      JSON.stringify(bad),
    );
  }
  const load = { v: 1, kind: 'load', agent: 'agent-abc', ts: 0, seq: 1, queued: 0, inFlight: 0, workers: 1 } as const;
  const model = { queued: 0, inFlight: 0, serviceMs: 5, served: 0, failed: 0 };
  const loading = decodeMessage(encodeMessage({ ...load, models: { kws: { ...model, state: 'loading', etaMs: 800 } } }), ['load']);
  assert.equal(loading.models.kws!.state, 'loading');
  assert.throws(() => decodeMessage(encodeMessage({ ...load, models: { kws: { ...model, state: 'hot' as 'warm' } } }), ['load']));
});

test('claim rules: times fit the attempt, a queue fits what the agent can hold and the service times known', () => {
  assert.deepEqual(fitTimesToAttempt({ queueMs: 3, execMs: 5 }, 20), { queueMs: 3, execMs: 5, loadMs: 0 });
  assert.deepEqual(fitTimesToAttempt({ queueMs: 300, execMs: 500, loadMs: 200 }, 20), { queueMs: 6, execMs: 10, loadMs: 4 });
  assert.equal(maxHeldRequests(2, 64, 4), 2 * 4 + 64 * 4);
  assert.equal(maxHeldRequests(2, undefined, 4), 4_096);
  assert.deepEqual(boundQueueClaim(1_048_576, undefined, { maxRif: 68 }), { rif: 68, workMs: Number.NaN });
  assert.deepEqual(boundQueueClaim(10, 1e7, { maxRif: 68, minServiceMs: 1, maxServiceMs: 20 }), { rif: 10, workMs: 800 });
  assert.deepEqual(boundQueueClaim(10, 0, { maxRif: 68, minServiceMs: 1, maxServiceMs: 20 }), { rif: 10, workMs: 2.5 });
});

function status(agent: string, latencyMs: number): AgentStatus {
  return {
    v: 1,
    kind: 'status',
    agent,
    state: 'online',
    ts: 0,
    workers: 1,
    queueLimit: 64,
    models: [{ name: 'kws', version: '1', sha256: '0'.repeat(64), priceMicros: 0, latencyMs, inputs: [], outputs: [] }],
  };
}

/** Two agents alike in every measured way; the test makes one of them lie. */
function twins(): Registry {
  const reg = createRegistry({ site: 'near', exploreRate: 0 });
  onStatus(reg, status('honest', 10), 0, { site: 'near' });
  onStatus(reg, status('liar', 10), 0, { site: 'near' });
  return reg;
}

test('a lying agent cannot crash the router or reach past the bounds', () => {
  const reg = twins();
  // Everything at the top of what the schema lets through, and times that do not fit the attempt.
  for (let i = 0; i < 50; i++) {
    onSend(reg, 'liar', 'kws', i * 100);
    onReply(
      reg,
      'liar',
      'kws',
      { queueMs: 86_400_000, execMs: 86_400_000, loadMs: 86_400_000, e2eMs: 12, rif: 1_048_576, workMs: 86_400_000, bytes: 100 },
      i * 100,
    );
  }
  const liar = reg.agents.get('liar')!;
  const entry = liar.models.get('kws')!;
  assert.ok(liar.reportedRif <= 4 + 64, `queue claim ${liar.reportedRif} bounded by one worker and one 64-deep queue`);
  assert.ok(entry.serviceMs <= 12, `service time ${entry.serviceMs} within the 12 ms the router timed`);
  assert.ok(entry.stats.coldLoadMs <= 12, `cold-load time ${entry.stats.coldLoadMs} within the attempt too`);
  const ect = expectedCompletionMs(entry, { model: 'kws', bytesUp: 1_000 }, 5_000);
  assert.ok(Number.isFinite(ect) && ect >= 0, `ECT ${ect}`);
  const sel = selectAgent(reg, { model: 'kws', deadlineMs: 10_000 }, 5_000, mulberry32(1));
  assert.ok(sel.ok && Number.isFinite(sel.predictedMs));
});

test('claiming a full queue repels no more than the agent measured latency does', () => {
  const reg = twins();
  // Both answer every attempt in 12 ms. The liar claims its queue is full, 64 requests × 10 ms ahead.
  for (let i = 0; i < 60; i++) {
    for (const [agent, rif, workMs] of [
      ['honest', 0, 0],
      ['liar', 64, 640],
    ] as const) {
      onSend(reg, agent, 'kws', i * 100);
      onReply(reg, agent, 'kws', { queueMs: 0, execMs: 10, e2eMs: 12, rif, workMs, bytes: 100 }, i * 100);
    }
  }
  const ect = (agent: string) => expectedCompletionMs(reg.agents.get(agent)!.models.get('kws')!, { model: 'kws' }, 6_000);
  assert.ok(ect('honest') < 13, `honest ${ect('honest')}`);
  // Uncapped, the claim would put 640 ms of queue in front of it; capped at its own p99 (12 ms), it costs
  // the liar at most one more measured attempt time.
  assert.ok(ect('liar') <= ect('honest') + 13, `liar ${ect('liar')} against honest ${ect('honest')}`);
});

test('claiming an empty queue attracts no more than the agent measured latency earns', () => {
  const reg = twins();
  onStatus(reg, status('faster', 10), 0, { site: 'near' });
  // Liar and honest take 100 ms per attempt, 90 of them waiting in a queue. The honest one says so; the
  // liar claims no queue at all, but the 90 ms it hides are still in the attempt the router timed. A third
  // agent honestly takes 60 ms.
  for (let i = 0; i < 60; i++) {
    for (const [agent, e2eMs, queueMs, rif] of [
      ['honest', 100, 90, 9],
      ['liar', 100, 0, 0],
      ['faster', 60, 50, 5],
    ] as const) {
      onSend(reg, agent, 'kws', i * 100);
      onReply(reg, agent, 'kws', { queueMs, execMs: 10, e2eMs, rif, workMs: rif * 10, bytes: 100 }, i * 100);
    }
  }
  const ect = (agent: string) => expectedCompletionMs(reg.agents.get(agent)!.models.get('kws')!, { model: 'kws' }, 6_000);
  assert.ok(ect('liar') >= 0.95 * 100, `liar predicted ${ect('liar')} ms for attempts that take 100`);
  assert.ok(Math.abs(ect('liar') - ect('honest')) < 5, `liar ${ect('liar')} against honest ${ect('honest')}`);
  // Between the liar and the agent that really is faster, the faster one wins.
  markDown(reg.agents.get('honest')!, 6_000);
  const rng = mulberry32(3);
  let toLiar = 0;
  for (let i = 0; i < 1_000; i++) {
    const sel = selectAgent(reg, { model: 'kws' }, 6_000, rng);
    if (sel.ok && sel.agentId === 'liar') toLiar++;
  }
  assert.equal(toLiar, 0, `${toLiar} of 1,000 picks to the liar`);
});

test('hedge cut-off: the agents reported load, not the router own count of requests on the wire; one liar moves it by its share only', () => {
  const reg = createRegistry({ site: 'near' });
  for (let i = 0; i < 10; i++)
    upsertAgent(reg, { agentId: `n${i}`, hardwareClass: 'cpu', slots: 2, models: [{ model: 'kws', serviceMs: 10 }] }, 0);
  const load = (agent: string, rif: number) =>
    onLoad(
      reg,
      {
        v: 1,
        kind: 'load',
        agent,
        ts: 0,
        seq: 1,
        queued: 0,
        inFlight: rif,
        workers: 2,
        models: { kws: { queued: 0, inFlight: rif, serviceMs: 10, served: 0, failed: 0 } },
      },
      100,
    );
  // Four attempts outstanding at each agent (most of them still on the wire), one running at each.
  for (let i = 0; i < 10; i++) {
    for (let k = 0; k < 4; k++) onSend(reg, `n${i}`, 'kws', 100);
    load(`n${i}`, 1);
  }
  assert.equal(fleetUtilization(reg, 200), 0.5, 'one of two slots busy at each agent');
  const policy = createRouterPolicy(reg);
  const request = { key: 'k', deadlineAt: 5_000, startedAt: 0, data: { model: 'kws', bytesUp: 100 }, maxAttempts: 3, model: 'kws' };
  assert.equal(policy.mayHedge!(request, 200), true, 'hedges allowed at 0.5 (the own count alone reads 2)');
  load('n0', 4_000);
  assert.ok(fleetUtilization(reg, 200) <= 0.55 + 1e-9, `one liar of ten: ${fleetUtilization(reg, 200)}`);
  assert.equal(policy.mayHedge!(request, 200), true);
  // A report goes stale after claimStaleMs: then the router's own count stands in for it.
  assert.equal(fleetUtilization(reg, 100 + 6_000), 1);
});

test('a model reported loading is warm after its ETA for selection; one reported cold costs its load time', () => {
  const reg = createRegistry({ site: 'near', exploreRate: 0 });
  upsertAgent(reg, { agentId: 'a', hardwareClass: 'cpu', models: [{ model: 'kws', serviceMs: 10, coldLoadMs: 2_000 }] }, 0);
  const entry = reg.agents.get('a')!.models.get('kws')!;
  const report = (state: 'warm' | 'loading' | 'cold', etaMs?: number) =>
    onLoad(
      reg,
      {
        v: 1,
        kind: 'load',
        agent: 'a',
        ts: 0,
        seq: 1,
        queued: 0,
        inFlight: 0,
        workers: 1,
        models: { kws: { queued: 0, inFlight: 0, serviceMs: 10, served: 0, failed: 0, state, ...(etaMs !== undefined ? { etaMs } : {}) } },
      },
      1_000,
    );
  const base = expectedCompletionMs(entry, { model: 'kws' }, 1_000);
  report('cold');
  assert.ok(Math.abs(expectedCompletionMs(entry, { model: 'kws' }, 1_000) - base - 2_000) < 1e-6);
  report('loading', 300);
  assert.ok(Math.abs(expectedCompletionMs(entry, { model: 'kws' }, 1_100) - base - 200) < 1e-6);
  report('warm');
  assert.equal(expectedCompletionMs(entry, { model: 'kws' }, 1_000), base);
});

/** A load report for one agent serving kws: `queued` requests ahead, the model in `state`. */
function kwsLoad(agent: string, queued: number, state?: 'warm' | 'loading' | 'cold', etaMs?: number) {
  return {
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
  } as const;
}

test('a loading node is admitted with its ETA when ETA + service beats the alternatives within the deadline, and refused past it', () => {
  const reg = createRegistry({ site: 'near', exploreRate: 0 });
  onStatus(reg, status('busy', 50), 0, { site: 'near' });
  onStatus(reg, status('loading', 50), 0, { site: 'near' });
  const rng = mulberry32(7);
  const pick = (deadlineMs: number, at = 1_000) => selectAgent(reg, { model: 'kws', deadlineMs: at + deadlineMs }, at, rng);
  // The warm one has 20 requests of 50 ms ahead of it: about a second. The other is loading the model.
  onLoad(reg, kwsLoad('busy', 20), 1_000);
  onLoad(reg, kwsLoad('loading', 0, 'loading', 300), 1_000);
  const soon = pick(2_000);
  assert.ok(soon.ok && soon.agentId === 'loading', `ready in 300 ms beats a second of queue: ${JSON.stringify(soon)}`);
  assert.ok(soon.ok && soon.predictedMs >= 300 && soon.predictedMs < 600, `its ETA is in the prediction: ${soon.ok && soon.predictedMs}`);

  onLoad(reg, kwsLoad('loading', 0, 'loading', 4_000), 1_000);
  const later = pick(2_000);
  assert.ok(later.ok && later.agentId === 'busy', 'an ETA of 4 s loses to a second of queue');

  // Alone: admitted when its ETA fits the deadline, refused at once when it cannot.
  markDown(reg.agents.get('busy')!, 1_000);
  const fits = pick(6_000);
  assert.ok(fits.ok && fits.agentId === 'loading', 'admitted, not refused for not being warm');
  const late = pick(2_000);
  assert.ok(!late.ok && late.code === 'MESH_DEADLINE_EXCEEDED', 'refused: ready only after the deadline');
});

test('claiming "loading, ready in 0 ms" over and over earns no more than the load time measured there', () => {
  const reg = createRegistry({ site: 'near', exploreRate: 0 });
  onStatus(reg, status('a', 10), 0, { site: 'near' });
  const entry = reg.agents.get('a')!.models.get('kws')!;
  // A reply that waited 2 s for the model to load: the router learns the load time there.
  onSend(reg, 'a', 'kws', 0);
  onReply(reg, 'a', 'kws', { queueMs: 0, execMs: 10, loadMs: 2_000, e2eMs: 2_015, bytes: 100 }, 2_015);
  const warm = expectedCompletionMs(entry, { model: 'kws' }, 3_000);
  // Evicted and loading again; the agent keeps claiming it is ready now.
  for (let t = 3_000; t <= 4_000; t += 250) onLoad(reg, kwsLoad('a', 0, 'loading', 0), t);
  const claimed = expectedCompletionMs(entry, { model: 'kws' }, 4_000);
  assert.ok(Math.abs(claimed - warm - 1_000) < 10, `a second of the measured 2 s load is left: ${claimed - warm}`);
  assert.ok(expectedCompletionMs(entry, { model: 'kws' }, 5_000) - warm < 10, 'and none once the measured time has passed');
  // An honest ETA longer than the measured time stands; a reply (the model answered) makes it warm at once.
  onLoad(reg, kwsLoad('a', 0, 'loading', 3_000), 5_000);
  assert.ok(Math.abs(expectedCompletionMs(entry, { model: 'kws' }, 5_000) - warm - 3_000) < 10);
  onSend(reg, 'a', 'kws', 5_000);
  onReply(reg, 'a', 'kws', { queueMs: 0, execMs: 10, e2eMs: 15, bytes: 100 }, 5_015);
  assert.ok(Math.abs(expectedCompletionMs(entry, { model: 'kws' }, 5_015) - warm) < 10);
});

test('claiming loadMs 0 for a reply that waited for a cold load gains nothing: a cold model there costs no less, a warm one no less', () => {
  const reg = twins();
  // Both waited 2 s for the model to load; the honest one says so, the liar hides it.
  for (const [agent, loadMs] of [
    ['honest', 2_000],
    ['liar', 0],
  ] as const) {
    onSend(reg, agent, 'kws', 0);
    onReply(reg, agent, 'kws', { queueMs: 0, execMs: 10, loadMs, e2eMs: 2_012, bytes: 100 }, 2_012);
  }
  const ect = (agent: string, at: number) => expectedCompletionMs(reg.agents.get(agent)!.models.get('kws')!, { model: 'kws' }, at);
  assert.ok(ect('liar', 2_100) >= ect('honest', 2_100) - 1, `warm: liar ${ect('liar', 2_100)} against honest ${ect('honest', 2_100)}`);
  // Both evicted: the liar's cold load is priced at what its hardware class measured, not at nothing.
  for (const agent of ['honest', 'liar']) onLoad(reg, kwsLoad(agent, 0, 'cold'), 3_000);
  assert.ok(ect('liar', 3_000) >= ect('honest', 3_000) - 1, `cold: liar ${ect('liar', 3_000)} against honest ${ect('honest', 3_000)}`);
  assert.ok(ect('liar', 3_000) >= 2_000);
});
