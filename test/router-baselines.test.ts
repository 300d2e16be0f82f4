/** The baseline balancers (router/src/baselines/): each one's rule, as its source states it. */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import type { Attempt, AttemptEnd, EngineRequest } from '@edge-mesh/client';
import { type AgentStatus, PROTOCOL_VERSION } from '@edge-mesh/protocol';
import {
  type BaselinePolicy,
  type BaselineReply,
  createEnvoyPolicy,
  createFinaglePolicy,
  createLinkerdPolicy,
  createPrequalPolicy,
  FailureAccrual,
  FINAGLE_PENALTY,
  FinaglePeakEwma,
  hotColdPick,
  mulberry32,
  type ProbeAnswer,
  type RouterAsk,
  reuseBudget,
  TokenRetryBudget,
  TowerPeakEwma,
} from '@edge-mesh/router';

const status = (agent: string, latencyMs: number, workers = 1, state: AgentStatus['state'] = 'online'): AgentStatus => ({
  v: PROTOCOL_VERSION,
  kind: 'status',
  agent,
  state,
  ts: 0,
  workers,
  models: [{ name: 'm', version: '1', sha256: '0'.repeat(64), priceMicros: 0, latencyMs, inputs: [], outputs: [] }],
});

let keys = 0;
const request = (nowMs: number): EngineRequest<RouterAsk> => ({
  key: String(keys++),
  deadlineAt: nowMs + 3_000,
  startedAt: nowMs,
  data: { model: 'm', bytesUp: 100 },
  maxAttempts: 3,
  model: 'm',
});

/** Sends one attempt through a policy and ends it after `ms` with `end`. */
function roundTrip(p: BaselinePolicy, agentId: string, atMs: number, ms: number, end: AttemptEnd<BaselineReply>): void {
  const a: Attempt<RouterAsk> = {
    request: request(atMs),
    agentId,
    kind: 'first',
    index: 0,
    paid: false,
    sentAt: atMs,
    plan: { agentId },
    timedOut: false,
  };
  p.onSend?.(a, atMs);
  p.onAttemptEnd?.(a, end, atMs + ms);
}
const ok: AttemptEnd<BaselineReply> = { kind: 'reply', reply: { queueMs: 0, execMs: 1 } };

/** A random stream that replays the given numbers, then 0.5 forever. */
const script = (...xs: number[]) => {
  let i = 0;
  return () => (i < xs.length ? xs[i++]! : 0.5);
};

test('finagle: weighted P2C compares load ÷ weight, not raw load (WeightedP2CPick)', () => {
  // a: 1 worker at 1 ms (weight 1); b: 1 worker at 10 ms (weight 0.1). Draws: 0.5 → a, 0.95 → b.
  const p = createFinaglePolicy({ random: script(0.5, 0.95), maxExtraLoad: 0 });
  p.onStatus(status('a', 1), 0);
  p.onStatus(status('b', 10), 0);
  roundTrip(p, 'a', 0, 50, ok); // a's cost 50 ms
  roundTrip(p, 'b', 0, 10, ok); // b's cost 10 ms
  // Raw load would pick b (10 < 50); load ÷ weight picks a (50 / 1 < 10 / 0.1).
  assert.equal(p.pick(request(50), new Set(), 'first', 50)?.agentId, 'a');
  // Equal weights compare plain load: the same history on two 1 ms agents picks the cheaper one.
  const q = createFinaglePolicy({ random: script(0.25, 0.75), maxExtraLoad: 0 });
  q.onStatus(status('a', 1), 0);
  q.onStatus(status('b', 1), 0);
  roundTrip(q, 'a', 0, 50, ok);
  roundTrip(q, 'b', 0, 10, ok);
  assert.equal(q.pick(request(50), new Set(), 'first', 50)?.agentId, 'b');
});

test("finagle: peak EWMA exactly as PeakEwma.scala's Metric", () => {
  const e = new FinaglePeakEwma(10_000, 0);
  assert.equal(e.load(0), 0);
  const ts = e.start(0);
  assert.equal(e.load(5), FINAGLE_PENALTY + 1);
  assert.equal(FINAGLE_PENALTY, 2 ** 47 - 1);
  e.end(ts, 100);
  assert.equal(e.cost, 100);
  const t2 = e.start(10_100);
  e.end(t2, 10_120);
  const w = Math.exp(-10_020 / 10_000);
  assert.ok(Math.abs(e.cost - (100 * w + 20 * (1 - w))) < 1e-9);
  const c0 = e.cost;
  e.start(30_120);
  assert.ok(Math.abs(e.load(30_120) - c0 * Math.exp(-2) * 2) < 1e-9);
});

test('finagle: failure accrual marks dead after 5 failures, revives through one probe', () => {
  const f = new FailureAccrual(() => 0.5, 0);
  for (let i = 0; i < 4; i++) {
    f.onApply(i);
    f.failure(i);
  }
  assert.equal(f.status(4), 0); // Open
  f.onApply(4);
  f.failure(4);
  assert.equal(f.status(5), 1); // Busy: marked dead for 5 s
  assert.equal(f.status(5_004), 0); // ProbeOpen after 5 s
  f.onApply(5_004);
  assert.equal(f.status(5_005), 1); // ProbeClosed: one probe at a time
  f.failure(5_100); // the probe fails (the consecutive count still stands): dead again, 5–10 s
  assert.equal(f.status(5_100 + 4_999), 1);
  assert.equal(f.status(5_100 + 10_001), 0);
  f.onApply(15_200);
  f.success(15_300);
  assert.equal(f.state, 'alive');
  assert.equal(f.marks, 0);
});

test('finagle: a backup after the (1 − maxExtraLoad) quantile of recent latencies, re-read every 3 s', () => {
  const p = createFinaglePolicy({ random: script(), maxExtraLoad: 0.05 });
  p.onStatus(status('a', 1), 0);
  p.onStatus(status('b', 1), 0);
  assert.equal(p.pick(request(0), new Set(), 'first', 0)?.hedgeAfterMs, undefined); // no history: no backups
  for (let i = 1; i <= 100; i++) roundTrip(p, i % 2 ? 'a' : 'b', 0, i, ok);
  const plan = p.pick(request(3_000), new Set(), 'first', 3_000);
  assert.equal(plan?.hedgeAfterMs, 95);
  assert.equal(p.pick(request(3_001), new Set(), 'hedge', 3_001)?.hedgeAfterMs, undefined);
  // Requeues only what never reached the model.
  assert.ok(p.retryable('MESH_BUSY') && p.retryable('MESH_AGENT_LOST'));
  assert.ok(!p.retryable('MESH_TIMEOUT') && !p.retryable('MESH_INFERENCE_FAILED'));
});

test('retry budget: 20 % of requests within the ttl, plus the reserve', () => {
  const b = new TokenRetryBudget({ ttlMs: 10_000, minRetriesPerSec: 0, percentCanRetry: 0.2 }, 0);
  for (let i = 0; i < 100; i++) b.deposit(i);
  let n = 0;
  while (b.tryWithdraw(200)) n++;
  assert.equal(n, 20);
  for (let i = 0; i < 100; i++) b.deposit(300);
  assert.equal(b.tryWithdraw(20_000), false); // deposits expired with the ttl
  const r = new TokenRetryBudget({ ttlMs: 10_000, minRetriesPerSec: 10, percentCanRetry: 0.2 }, 0);
  let m = 0;
  while (r.tryWithdraw(0)) m++;
  assert.equal(m, 100); // the reserve: 10 retries/s over the 10 s ttl
});

test('linkerd: tower peak EWMA starts at the 30 ms default RTT and decays; P2C takes the lower load', () => {
  const e = new TowerPeakEwma(30, 10_000, 0);
  assert.equal(e.load(0), 30);
  assert.ok(Math.abs(e.load(10_000) - 30 * Math.exp(-1)) < 1e-9);
  e.start();
  e.end(10_000, 10_200); // 200 ms > estimate: the peak is taken
  assert.equal(e.load(10_200), 200);
  const p = createLinkerdPolicy({ random: script(0, 0) });
  p.onStatus(status('a', 1), 0);
  p.onStatus(status('b', 1), 0);
  roundTrip(p, 'a', 0, 100, ok);
  // Draws: i = 0 (a), j = 0 → shifted past i to 1 (b); a's 100 ms peak loses to b's default 30 ms.
  assert.equal(p.pick(request(100), new Set(), 'first', 100)?.agentId, 'b');
  // Agents already tried are not ready for this request.
  assert.equal(p.pick(request(100), new Set(['b']), 'retry', 100)?.agentId, 'a');
});

test('envoy: weighted least request follows weight ÷ (active + 1); equal weights use P2C on active requests', () => {
  const p = createEnvoyPolicy({ random: () => 0.5 });
  p.onStatus(status('fast', 1), 0); // weight 128
  p.onStatus(status('slow', 4), 0); // weight 32
  const counts: Record<string, number> = { fast: 0, slow: 0 };
  for (let i = 0; i < 400; i++) counts[p.pick(request(0), new Set(), 'first', 0)!.agentId]!++;
  assert.ok(Math.abs(counts.fast! / counts.slow! - 4) < 0.1, JSON.stringify(counts));
  // With requests active at the fast host its effective weight falls: 128 / 4 = 32 against 32.
  for (let i = 0; i < 3; i++) {
    const a: Attempt<RouterAsk> = {
      request: request(0),
      agentId: 'fast',
      kind: 'first',
      index: 0,
      paid: false,
      sentAt: 0,
      plan: { agentId: 'fast' },
      timedOut: false,
    };
    p.onSend?.(a, 0);
  }
  counts.fast = 0;
  counts.slow = 0;
  for (let i = 0; i < 400; i++) counts[p.pick(request(0), new Set(), 'first', 0)!.agentId]!++;
  assert.ok(Math.abs(counts.fast! / counts.slow! - 1) < 0.1, JSON.stringify(counts));
  // The per-try timeout is a third of the route timeout (num_retries 2).
  assert.equal(p.pick(request(0), new Set(), 'first', 0)?.timeoutMs, 1_000);
});

test('envoy: 5 consecutive 5xx eject a host, never more than 10 % of the cluster, back after 30 s', () => {
  const p = createEnvoyPolicy({ random: mulberry32(7) });
  for (let i = 0; i < 20; i++) p.onStatus(status(`n${i}`, 1), 0);
  const err: AttemptEnd<BaselineReply> = { kind: 'error', error: { code: 'MESH_INFERENCE_FAILED' } as never };
  for (let k = 0; k < 5; k++) for (const id of ['n0', 'n1', 'n2']) roundTrip(p, id, 1_000, 1, err);
  const picked = new Set<string>();
  for (let i = 0; i < 200; i++) picked.add(p.pick(request(2_000), new Set(), 'first', 2_000)!.agentId);
  // 10 % of 20 hosts: two ejected, the third stays.
  const out = ['n0', 'n1', 'n2'].filter((id) => !picked.has(id));
  assert.equal(out.length, 2, `ejected ${out}`);
  const back = new Set<string>();
  for (let i = 0; i < 200; i++) back.add(p.pick(request(41_000), new Set(), 'first', 41_000)!.agentId);
  for (const id of out) assert.ok(back.has(id), `${id} back after the base ejection time`);
});

test('prequal: hot-cold lexicographic selection and the reuse budget', () => {
  const pool = [
    { rif: 0, latencyMs: 50 },
    { rif: 1, latencyMs: 20 },
    { rif: 2, latencyMs: 30 },
    { rif: 9, latencyMs: 5 },
  ];
  // Q_RIF 0.75 over RIFs [0, 1, 2, 9]: 9 is hot; among the cold, the lowest latency (20 ms) wins.
  assert.equal(
    hotColdPick(pool, 0.75, (e) => e.rif),
    pool[1],
  );
  // All hot (threshold below every RIF cannot happen with a quantile): with one entry it is cold.
  assert.equal(
    hotColdPick([pool[3]!], 0.84, (e) => e.rif),
    pool[3],
  );
  // RIF per worker: 8 in flight on 4 workers is as cold as 2 on 1.
  assert.equal(reuseBudget(16, 40, 3, 1), 2);
  assert.equal(reuseBudget(16, 100, 3, 1), 1);
  assert.equal(reuseBudget(16, 16, 3, 1), 16); // probes cannot keep up: reuse up to the pool size

  const answers = new Map<string, ProbeAnswer>([
    ['a', { rif: 5, latencyMs: 5 }],
    ['b', { rif: 0, latencyMs: 40 }],
    ['c', { rif: 1, latencyMs: 20 }],
  ]);
  const sent: string[] = [];
  const later: (() => void)[] = [];
  const p = createPrequalPolicy({
    random: script(0, 0.4, 0.8),
    probe: (agentId, _m, cb) => {
      sent.push(agentId);
      later.push(() => cb(answers.get(agentId)!, 1));
    },
    qRif: 0.5,
    removePerQuery: 0,
  });
  for (const id of ['a', 'b', 'c']) p.onStatus(status(id, 1), 0);
  p.pick(request(0), new Set(), 'first', 0); // empty pool: random; three probes go out
  assert.deepEqual([...sent].sort(), ['a', 'b', 'c']);
  for (const f of later) f();
  // Q_RIF 0.5 over [0, 1, 5]: a is hot; b (40 ms) and c (20 ms) are cold: c.
  assert.equal(p.pick(request(2), new Set(), 'retry', 2)?.agentId, 'c');
});
