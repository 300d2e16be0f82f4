/** The live router on a real broker with real agents: routing, forwarding, failover, offline agents. */
import assert from 'node:assert/strict';
import { describe, type TestContext, test } from 'node:test';
import { openMeshConnection } from '@edge-mesh/client';
import { sampleInputs } from '@edge-mesh/demo';
import {
  type AgentStatus,
  decodeMessage,
  encodeMessage,
  generateIdentity,
  type InferReply,
  MeshError,
  newRequestId,
  PROTOCOL_VERSION,
  parseTopic,
  signStatus,
  topics,
} from '@edge-mesh/protocol';
import { agentFor, brokerFor, busyWait, meshFor, modelsDir, routerFor, spawnAgent, waitFor } from './helpers.ts';

/**
 * An agent that announces itself (a signed status, models copied from `like`, faster than any) and answers
 * every request at once with empty outputs and whatever extra reply fields `claims()` gives: a liar.
 */
async function lyingAgent(t: TestContext, brokerUrl: string, like: AgentStatus, claims: () => Record<string, unknown>) {
  const identity = generateIdentity('agent');
  const connection = openMeshConnection(brokerUrl, { identity });
  t.after(() => connection.close());
  await connection.firstConnect;
  const client = connection.client;
  let requests = 0;
  client.on('message', (topic, payload) => {
    const parsed = parseTopic(topic);
    if (parsed?.kind !== 'request') return;
    const request = decodeMessage(payload, ['req']);
    requests++;
    const reply = {
      v: PROTOCOL_VERSION,
      kind: 'res',
      id: request.id,
      agent: identity.id,
      model: request.model,
      outputs: {},
      queueMs: 0,
      execMs: 0,
    };
    client.publish(topics.clientReply(parsed.senderId, identity.id), encodeMessage({ ...reply, ...claims() } as InferReply), { qos: 1 });
  });
  await new Promise<void>((resolve, reject) =>
    client.subscribe(topics.agentRequest(identity.id, '+'), { qos: 1 }, (err) => (err ? reject(err) : resolve())),
  );
  const status: AgentStatus = {
    v: PROTOCOL_VERSION,
    kind: 'status',
    agent: identity.id,
    state: 'online',
    ts: Date.now(),
    session: 'liar',
    models: like.models!.map((m) => ({ ...m, latencyMs: 0.001 })),
    workers: 1,
    queueLimit: 8,
  };
  await new Promise<void>((resolve) =>
    client.publish(topics.agentStatus(identity.id), encodeMessage(signStatus(identity, status)), { qos: 1, retain: true }, () => resolve()),
  );
  return {
    id: identity.id,
    get requests() {
      return requests;
    },
  };
}

/**
 * An agent that announces itself like `like` (faster than any), sends load reports every `heartbeatMs`,
 * and holds every request it gets without answering until told to: a liar that can fake its death by
 * going quiet or by announcing itself offline, and answer afterwards.
 */
async function mutingAgent(t: TestContext, brokerUrl: string, like: AgentStatus, heartbeatMs = 200) {
  const identity = generateIdentity('agent');
  const connection = openMeshConnection(brokerUrl, { identity });
  t.after(() => connection.close());
  await connection.firstConnect;
  const client = connection.client;
  const held: { senderId: string; id: Uint8Array; model: string }[] = [];
  client.on('message', (topic, payload) => {
    const parsed = parseTopic(topic);
    if (parsed?.kind !== 'request') return;
    const request = decodeMessage(payload, ['req']);
    held.push({ senderId: parsed.senderId, id: request.id, model: request.model });
  });
  await new Promise<void>((resolve, reject) =>
    client.subscribe(topics.agentRequest(identity.id, '+'), { qos: 1 }, (err) => (err ? reject(err) : resolve())),
  );
  const announce = (state: 'online' | 'offline', session: string) => {
    const status: AgentStatus = {
      v: PROTOCOL_VERSION,
      kind: 'status',
      agent: identity.id,
      state,
      ts: Date.now(),
      session,
      models: like.models!.map((m) => ({ ...m, latencyMs: 0.001 })),
      workers: 1,
      queueLimit: 8,
    };
    return new Promise<void>((resolve) =>
      client.publish(topics.agentStatus(identity.id), encodeMessage(signStatus(identity, status)), { qos: 1, retain: true }, () =>
        resolve(),
      ),
    );
  };
  let seq = 0;
  const beat = () =>
    client.publish(
      topics.agentLoad(identity.id),
      encodeMessage({
        v: PROTOCOL_VERSION,
        kind: 'load',
        agent: identity.id,
        ts: Date.now(),
        seq: ++seq,
        queued: 0,
        inFlight: 0,
        workers: 1,
        models: {},
      }),
      { qos: 0 },
    );
  let heartbeat: NodeJS.Timeout | undefined;
  const startBeating = () => {
    heartbeat ??= setInterval(beat, heartbeatMs);
  };
  const stopBeating = () => {
    clearInterval(heartbeat);
    heartbeat = undefined;
  };
  t.after(stopBeating);
  await announce('online', 'mute-1');
  startBeating();
  return {
    id: identity.id,
    get held() {
      return held.length;
    },
    startBeating,
    stopBeating,
    announce,
    /** Answers every request held so far, `times` times each, claiming an empty queue and no time spent. */
    answerAll(times = 1) {
      for (const h of held)
        for (let i = 0; i < times; i++) {
          const reply: InferReply = {
            v: PROTOCOL_VERSION,
            kind: 'res',
            id: h.id,
            agent: identity.id,
            model: h.model,
            outputs: {},
            queueMs: 0,
            execMs: 0,
            rif: 0,
            workMs: 0,
            loadMs: 0,
          };
          client.publish(topics.clientReply(h.senderId, identity.id), encodeMessage(reply), { qos: 1 });
        }
    },
  };
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

  /**
   * A SIGSTOPped agent's requests, sent through the router and through the SDK, finish on the other agent. With `lagMs`,
   * this process (the router, the SDK and the other agent) is busy that long on every turn of its event loop once the
   * agent stops, so no liveness check runs on time.
   */
  const hangsMidRequest = async (t: TestContext, model: string, lagMs: number) => {
    const broker = await brokerFor(t);
    const hungKey = generateIdentity('agent');
    // Its link holds every request and reply 5 s (MESH_AGENT_FAULTS): a request that reached it cannot have been answered
    // by the time it is stopped below, however the processes are scheduled. Its load reports do not show the delay.
    const hung = await spawnAgent(t, broker.url, hungKey, ['--heartbeat-ms', '200'], {
      MESH_AGENT_FAULTS: JSON.stringify({ linkDelayMs: 5_000 }),
    });
    const survivor = await agentFor(t, { brokerUrl: broker.url, heartbeatMs: 200 });
    // No per-try timeout and no hedge can move a request before its deadline, and the hung agent's last
    // will comes only when its keep-alive runs out (15 s), after the deadline: only its silence can.
    const router = await routerFor(t, broker.url, { hedging: false, config: { minPerTryTimeoutMs: 60_000, minQuantileTimeoutMs: 60_000 } });
    const mesh = await meshFor(t, { brokerUrl: broker.url, router: router.id, minHedgeAfterMs: 60_000 });
    await router.waitForModel(model, 10_000, 2);
    await mesh.waitForModel(model, 10_000, 2);
    await waitFor(() => mesh.agents().every((a) => a.load !== undefined && a.load.seq >= 3), 5_000, 'a few heartbeats from both');

    const deadlineMs = 12_000;
    const viaRouter = Array.from({ length: 8 }, (_, i) => router.infer(model, sampleInputs(model, 1 + (i % 4)), { deadlineMs }));
    const viaSdk = Array.from({ length: 8 }, (_, i) => mesh.infer(model, sampleInputs(model, 1 + (i % 4)), { deadlineMs }));
    // Work of both outstanding there when it stops: with its link delay, none of it can have been answered yet.
    await waitFor(
      () =>
        (router.registry.agents.get(hungKey.id)?.outstanding ?? 0) > 0 &&
        (mesh.agents().find((a) => a.id === hungKey.id)?.outstanding ?? 0) > 0,
      10_000,
      'work on the agent about to hang',
    );
    hung.kill('SIGSTOP');
    const stoppedAt = Date.now();
    if (lagMs > 0) {
      const lag = setInterval(() => busyWait(lagMs), 20);
      t.after(() => clearInterval(lag));
    }
    // Every failure is reported with what its engine knew (agents tried, the last error's words) and what each side
    // counted: a request that fails here is rare and has to be read from one CI log.
    const settle = async <T>(calls: Promise<T>[], who: string): Promise<T[]> => {
      const outcomes = await Promise.allSettled(calls);
      const failed = outcomes.flatMap((o) => (o.status === 'rejected' ? [o.reason as MeshError] : []));
      assert.equal(
        failed.length,
        0,
        `${who}: ${failed.length} of ${calls.length} failed ${Date.now() - stoppedAt} ms after the stop: ${JSON.stringify(
          failed.map((e) => ({ message: e.message, details: e.details, cause: (e.cause as Error | undefined)?.message })),
        )}; hung agent ${hungKey.id}, survivor ${survivor.id} ${JSON.stringify(survivor.counters)}; router ${JSON.stringify(router.counters)}; SDK ${JSON.stringify(mesh.counters)}`,
      );
      return outcomes.map((o) => (o as PromiseFulfilledResult<T>).value);
    };
    const routed = await settle(viaRouter, 'via the router');
    const direct = await settle(viaSdk, 'via the SDK');
    t.diagnostic(
      `all 16 answered ${Date.now() - stoppedAt} ms after the stop; router ${JSON.stringify({ silenced: router.counters.silenced, retries: router.counters.retries })}, SDK ${JSON.stringify({ silenced: mesh.counters.silenced, timeouts: mesh.counters.timeouts, failovers: mesh.counters.failovers })}`,
    );
    // Every routed request that started on the hung agent moved to the survivor (it answered none before it stopped).
    const moved = routed.filter((r) => r.tried[0] === hungKey.id);
    assert.ok(moved.length > 0, `some routed request started on the hung agent: ${JSON.stringify(routed.map((r) => r.tried))}`);
    for (const r of moved) assert.deepEqual([r.agentId, r.tried.length], [survivor.id, 2]);
    for (const r of routed) assert.equal(r.agentId, survivor.id);
    assert.ok(router.counters.silenced > 0, 'given up for silence');
    assert.ok(
      direct.some((r) => r.attempts > 1 && r.agentId === survivor.id),
      'some SDK request moved to the survivor',
    );
    // Every SDK request completes: with a lease, the router's long per-try timeout leaves it to the silence;
    // routing locally, short per-try timeouts move most of them, and the silence those the budget did not.
    assert.ok(mesh.counters.silenced > 0 || mesh.counters.timeouts > 0);
    assert.equal(
      mesh.agents().some((a) => a.id === hungKey.id),
      true,
      'the hung agent is still online as far as its status goes (no last will yet)',
    );
  };

  test('an agent that hangs mid-request, its last will not due before the deadline: its requests move on once its heartbeats stop, for the router and the SDK', (t) =>
    hangsMidRequest(t, 'ocr-det', 0));

  test('the same while this process lags 300 ms on every turn of its event loop: the silence is still found', (t) =>
    hangsMidRequest(t, 'kws', 300));

  test('a fake death: an agent that holds requests and goes quiet, or announces itself offline, then answers anyway, is counted once and not learned from twice', async (t) => {
    const broker = await brokerFor(t);
    const real = await agentFor(t, { brokerUrl: broker.url, heartbeatMs: 200 });
    const liar = await mutingAgent(t, broker.url, real.status());
    // Per-try timeouts and hedges far away: only the liar's silence or its last words move a request.
    const router = await routerFor(t, broker.url, { hedging: false, config: { minPerTryTimeoutMs: 60_000, minQuantileTimeoutMs: 60_000 } });
    const mesh = await meshFor(t, { brokerUrl: broker.url, router: router.id, minHedgeAfterMs: 60_000 });
    await router.waitForModel('kws', 10_000, 2);
    await mesh.waitForModel('kws', 10_000, 2);
    await waitFor(() => mesh.agents().every((a) => a.load !== undefined && a.load.seq >= 3), 5_000, 'a few heartbeats from both');
    const records: { agentId: string; ok: boolean }[] = [];
    router.onAttempt((a) => records.push({ agentId: a.agentId, ok: a.ok }));
    const liarRecords = () => records.filter((r) => r.agentId === liar.id).length;

    const batch = (n: number) => [
      ...Array.from({ length: n }, (_, i) => router.infer('kws', sampleInputs('kws', 1 + i), { deadlineMs: 8_000 })),
      ...Array.from({ length: n }, (_, i) => mesh.infer('kws', sampleInputs('kws', 1 + i), { deadlineMs: 8_000 })),
    ];
    const check = async (calls: ReturnType<typeof batch>, what: string) => {
      const results = await Promise.all(calls);
      for (const r of results) assert.equal(r.agentId, real.id, `${what}: answered by the real agent`);
      assert.ok(
        results.some((r) => r.attempts > 1),
        `${what}: some request started on the liar and moved: ${JSON.stringify(results.map((r) => r.attempts))}`,
      );
      return results;
    };

    // 1. Quiet: the liar holds its requests and stops its heartbeats; they move on once it is judged silent.
    const quiet1 = batch(6);
    await waitFor(() => liar.held > 0, 5_000, 'requests held by the liar');
    liar.stopBeating();
    const started = Date.now();
    await check(quiet1, 'silent');
    assert.ok(Date.now() - started < 8_000);
    assert.ok(router.counters.silenced > 0 && mesh.counters.silenced > 0);
    const okBefore = router.counters.ok;
    const recordsBefore = liarRecords();
    const learnedBefore = router.registry.agents.get(liar.id)!.models.get('kws')!.latency.count;
    // Then it answers every request, twice, claiming an empty queue: the requests are over.
    liar.answerAll(2);
    await new Promise((r) => setTimeout(r, 300));
    assert.equal(router.counters.ok, okBefore, 'no request answered twice');
    assert.equal(router.counters.requests, 6);
    assert.equal(liarRecords(), recordsBefore, 'no attempt result from the late answers');
    assert.equal(router.registry.agents.get(liar.id)!.models.get('kws')!.latency.count, learnedBefore, 'nothing learned from them');
    assert.equal(router.registry.agents.get(liar.id)!.outstanding, 0);
    assert.equal(mesh.agents().find((a) => a.id === liar.id)?.outstanding ?? 0, 0);

    // 2. Offline: back online in a new session, it takes requests, announces itself offline (as its last
    // will would) and answers them after all.
    await liar.announce('online', 'mute-2');
    liar.startBeating();
    await waitFor(() => router.registry.agents.get(liar.id)?.up === true, 5_000, 'the liar up again');
    const heldBefore = liar.held;
    const gone = batch(6);
    await waitFor(() => liar.held > heldBefore, 5_000, 'requests held by the liar again');
    liar.stopBeating();
    await liar.announce('offline', 'mute-2');
    await check(gone, 'offline');
    const ok2 = router.counters.ok;
    const records2 = liarRecords();
    liar.answerAll(1);
    await new Promise((r) => setTimeout(r, 300));
    assert.equal(router.counters.ok, ok2);
    assert.equal(router.counters.ok, 12);
    assert.equal(liarRecords(), records2);
    assert.equal(router.registry.agents.get(liar.id)!.outstanding, 0);
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

  test('a client that floods route questions is answered up to its rate and the rest dropped; another client still gets its lease', async (t) => {
    const broker = await brokerFor(t);
    await agentFor(t, { brokerUrl: broker.url, modelsDir: await modelsDir() });
    const router = await routerFor(t, broker.url, { routeQuestionsPerSecond: 5, routeQuestionsBurst: 10 });
    await router.waitForModel('kws', 10_000);
    const ask = async (who: string, n: number) => {
      const identity = generateIdentity('app');
      const connection = openMeshConnection(broker.url, { identity });
      t.after(() => connection.close());
      await connection.firstConnect;
      let leases = 0;
      connection.client.on('message', () => leases++);
      await new Promise<void>((resolve, reject) =>
        connection.client.subscribe(topics.clientLeasesFor(identity.id), { qos: 1 }, (err) => (err ? reject(err) : resolve())),
      );
      for (let i = 0; i < n; i++) {
        const question = encodeMessage({ v: PROTOCOL_VERSION, kind: 'route', id: newRequestId(), model: 'kws' });
        connection.client.publish(topics.routerRoute(router.id, identity.id), Buffer.from(question), { qos: 1 });
      }
      return {
        who,
        get leases() {
          return leases;
        },
      };
    };
    const flooder = await ask('flooder', 300);
    await waitFor(() => router.counters.questionsDropped + flooder.leases >= 300, 10_000, 'the flood read');
    const honest = await ask('honest', 1);
    await waitFor(() => honest.leases === 1, 5_000, 'the other client leased');
    // The burst and what refilled while the flood was read (well under a second here).
    assert.ok(flooder.leases >= 10 && flooder.leases <= 30, `${flooder.leases} leases for 300 questions`);
    assert.equal(router.counters.questionsDropped, 300 - flooder.leases);
  });

  test('replies carry the agent queue: the router and the SDK learn it between heartbeats', async (t) => {
    const broker = await brokerFor(t);
    // No heartbeat within the test: whatever the clients learn of the queue, they learn from replies.
    const agent = await agentFor(t, { brokerUrl: broker.url, heartbeatMs: 600_000 });
    const router = await routerFor(t, broker.url, { hedging: false });
    const mesh = await meshFor(t, { brokerUrl: broker.url });
    await router.waitForModel('ocr-det', 10_000);
    await mesh.waitForModel('ocr-det', 10_000);
    const seen: number[] = [];
    router.onAttempt(() => seen.push(router.registry.agents.get(agent.id)!.reportedRif));
    // Six at once on one worker: every reply but the last leaves requests behind it.
    await Promise.all(
      Array.from({ length: 6 }, (_, i) => router.infer('ocr-det', sampleInputs('ocr-det', 1 + (i % 4)), { deadlineMs: 20_000 })),
    );
    assert.ok(Math.max(...seen) > 0, `the router saw the queue in the replies: ${seen.join(',')}`);
    assert.equal(router.registry.agents.get(agent.id)!.reportedRif, 0, 'and the last reply left nothing behind');
    const queues: number[] = [];
    await Promise.all(
      Array.from({ length: 6 }, (_, i) =>
        mesh.infer('ocr-det', sampleInputs('ocr-det', 1 + (i % 4)), { deadlineMs: 20_000 }).then(() => {
          queues.push(mesh.agents().find((a) => a.id === agent.id)!.claimedQueue!.rif);
        }),
      ),
    );
    assert.ok(Math.max(...queues) > 0, `the SDK saw the queue in the replies: ${queues.join(',')}`);
    assert.equal(mesh.agents().find((a) => a.id === agent.id)!.load, undefined, 'no load report came');
  });

  test('an agent that renames its models and its hardware on every status: the router keeps pools and class stats for the current ones only, and the honest agent is still routed', async (t) => {
    const broker = await brokerFor(t);
    const honest = await agentFor(t, { brokerUrl: broker.url });
    const router = await routerFor(t, broker.url);
    await router.waitForModel('kws', 10_000);
    const honestModels = honest.status().models!;

    const identity = generateIdentity('agent');
    const connection = openMeshConnection(broker.url, { identity });
    t.after(() => connection.close());
    await connection.firstConnect;
    // 40 signed statuses of 256 models each (the most a status may list), every name new each time; the ones in the
    // middle also name kws, so its pool is shared with the honest agent until the last status drops it.
    const statuses = 40;
    let last: string[] = [];
    for (let i = 0; i < statuses; i++) {
      last = Array.from({ length: 256 }, (_, j) => `churn-${i}-${j}`);
      if (i > 0 && i < statuses - 1) last[0] = 'kws';
      const status: AgentStatus = {
        v: PROTOCOL_VERSION,
        kind: 'status',
        agent: identity.id,
        state: 'online',
        ts: Date.now(),
        session: 'churn',
        hardware: { platform: 'linux', arch: `arch${i}`, cpus: 1, cpuModel: 'churn', memoryMb: 64 },
        models: last.map((name) => ({ name, version: '1', sha256: '0'.repeat(64), priceMicros: 0, latencyMs: 1, inputs: [], outputs: [] })),
        workers: 1,
      };
      await new Promise<void>((resolve) =>
        connection.client.publish(
          topics.agentStatus(identity.id),
          encodeMessage(signStatus(identity, status)),
          { qos: 1, retain: true },
          () => resolve(),
        ),
      );
    }
    await waitFor(
      () => router.registry.agents.get(identity.id)?.models.has(last[0]!) === true,
      10_000,
      'the router to take the last status',
    );

    const { pools, classStats, classMembers } = router.registry;
    const expected = new Set([...honestModels.map((m) => m.name), ...last]);
    assert.deepEqual(new Set(pools.keys()), expected, `${pools.size} pools for ${expected.size} models served now`);
    assert.equal(classStats.size, honestModels.length + last.length, 'one (class, model) per entry, none left behind');
    assert.deepEqual(
      new Set(classMembers.keys()),
      new Set([router.registry.agents.get(honest.id)!.hardwareClass, 'cpu-arch39']),
      'no empty hardware class left behind',
    );
    assert.deepEqual(
      pools.get('kws')!.entries.map((e) => e.agent.agentId),
      [honest.id],
    );
    const result = await router.infer('kws', sampleInputs('kws', 1), { deadlineMs: 5_000 });
    assert.equal(result.agentId, honest.id);
  });

  test('a lying agent: claims outside the schema lose the reply and the request moves on; claims at its top are bounded', async (t) => {
    const broker = await brokerFor(t);
    const real = await agentFor(t, { brokerUrl: broker.url });
    let claims: Record<string, unknown> = {};
    const liar = await lyingAgent(t, broker.url, real.status(), () => claims);
    /** A fresh router and SDK client (no history of the liar), and a way to get one request to the liar through each. */
    const clients = async () => {
      const router = await routerFor(t, broker.url, { hedging: false });
      const mesh = await meshFor(t, { brokerUrl: broker.url, minHedgeAfterMs: 60_000 });
      await router.waitForModel('kws', 10_000, 2);
      await mesh.waitForModel('kws', 10_000, 2);
      const viaLiar = async (infer: () => Promise<{ agentId: string; attempts: number }>) => {
        for (let i = 0; i < 30; i++) {
          const before = liar.requests;
          const r = await infer();
          if (liar.requests > before) return r;
        }
        assert.fail('the liar was never tried');
      };
      return {
        router,
        mesh,
        throughRouter: () => viaLiar(() => router.infer('kws', sampleInputs('kws', 1), { deadlineMs: 5_000 })),
        throughSdk: () => viaLiar(() => mesh.infer('kws', sampleInputs('kws', 1), { deadlineMs: 5_000 })),
      };
    };

    // Outside the schema: the reply does not decode, so it never answers; the per-try timeout moves the
    // request to the real agent.
    claims = { rif: -1 };
    const first = await clients();
    for (const r of [await first.throughRouter(), await first.throughSdk()]) {
      assert.equal(r.agentId, real.id);
      assert.equal(r.attempts, 2);
    }

    // In the schema, but absurd: a queue of a million, a day of work, of loading, of queueing and running.
    claims = { rif: 1_048_576, workMs: 86_400_000, loadMs: 86_400_000, queueMs: 86_400_000, execMs: 86_400_000 };
    const second = await clients();
    assert.equal((await second.throughRouter()).agentId, liar.id);
    assert.equal((await second.throughSdk()).agentId, liar.id);
    const entry = second.router.registry.agents.get(liar.id)!;
    assert.ok(entry.reportedRif <= 4 + 8 * 4, `queue claim bounded by what its status says it holds: ${entry.reportedRif}`);
    const model = entry.models.get('kws')!;
    assert.ok(model.serviceMs < 1_000, `service time bounded by the attempt the router timed: ${model.serviceMs}`);
    const claimed = second.mesh.agents().find((a) => a.id === liar.id)!.claimedQueue!;
    assert.ok(claimed.rif <= 4 + 8 * 4, `the SDK bounds it too: ${claimed.rif}`);
    // And both still serve: the next requests complete.
    await second.router.infer('kws', sampleInputs('kws', 2), { deadlineMs: 5_000 });
    await second.mesh.infer('kws', sampleInputs('kws', 2), { deadlineMs: 5_000 });
  });
});
