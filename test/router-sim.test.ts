/** The router simulator (bench/sim/): determinism, paired random streams, baselines' formulas, metrics. */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { runSim, type SimResult } from '../bench/sim/engine.ts';
import { summarize } from '../bench/sim/metrics.ts';
import { OursPolicy } from '../bench/sim/ours.ts';
import { FINAGLE_PENALTY, LeastOutstandingPolicy, P2CPeakEwmaPolicy, PeakEwma, RandomPolicy } from '../bench/sim/policies.ts';
import type { Policy, PolicyEnv, ReplyInfo, SimRequest } from '../bench/sim/types.ts';
import { buildWorld } from '../bench/sim/world.ts';

const strip = ({ wall_ms: _w, ...rest }: SimResult) => rest;

test('same seed, same numbers; another seed, other numbers', () => {
  const cfg = { nodes: 30, durationMs: 3000, warmupMs: 300, load: 0.8, scenario: 'churn' as const };
  for (const make of [() => new P2CPeakEwmaPolicy(true), () => new OursPolicy()]) {
    const a = runSim(buildWorld({ ...cfg, seed: 7 }), make());
    const b = runSim(buildWorld({ ...cfg, seed: 7 }), make());
    assert.deepEqual(strip(a), strip(b));
    const c = runSim(buildWorld({ ...cfg, seed: 8 }), make());
    assert.notDeepEqual(strip(a), strip(c));
  }
});

test('random is worse than least-outstanding on a tiny fleet', () => {
  // Homogeneous: 4 fast nodes at ρ = 0.9. Random splits Poisson arrivals into independent queues at 0.9
  // each; joining the shortest queue pools them, so its waits (and tail) are shorter.
  const homog = buildWorld({ seed: 3, nodes: 4, mix: [1, 0, 0], durationMs: 20_000, warmupMs: 2000, load: 0.9 });
  const r = runSim(homog, new RandomPolicy());
  const l = runSim(homog, new LeastOutstandingPolicy());
  assert.ok(l.p99_ms < r.p99_ms, `least-outstanding p99 ${l.p99_ms} < random ${r.p99_ms}`);
  assert.ok(l.p50_ms <= r.p50_ms);
  // Heterogeneous: random sends 60 % of requests to the cpu tier, which holds ~4 % of the capacity: its
  // queues grow without bound, so most of those requests miss the deadline.
  const het = buildWorld({ seed: 3, nodes: 20, durationMs: 5000, warmupMs: 500, load: 0.8 });
  const rh = runSim(het, new RandomPolicy());
  const lh = runSim(het, new LeastOutstandingPolicy());
  assert.ok(rh.fail_rate > 0.4, `random fails ${rh.fail_rate}`);
  assert.ok(lh.fail_rate < rh.fail_rate);
});

test("Finagle's peak EWMA, exactly", () => {
  const e = new PeakEwma(10_000, 0);
  assert.equal(e.load(0), 0); // no history, nothing pending: cost 0 × 1
  const ts = e.start(0);
  assert.equal(e.load(5), FINAGLE_PENALTY + 1); // pending without history: the penalty
  assert.equal(FINAGLE_PENALTY, 2 ** 47 - 1); // Long.MaxValue >> 16
  e.end(ts, 100); // rtt 100 > cost 0: the peak is taken as is
  assert.equal(e.cost, 100);
  assert.equal(e.stamp, 100);
  // A lower sample blends with w = e^(−Δt/τ): Δt = 10 s → w = e^−1.
  const t2 = e.start(10_100);
  e.end(t2, 10_100 + 20); // rtt 20, Δt since stamp = 10,020 ms
  const w = Math.exp(-10_020 / 10_000);
  assert.ok(Math.abs(e.cost - (100 * w + 20 * (1 - w))) < 1e-9);
  // load() observes 0 first, so cost decays with idle time; then × (pending + 1).
  const c0 = e.cost;
  e.start(30_120);
  const load = e.load(30_120);
  assert.ok(Math.abs(load - c0 * Math.exp(-20_000 / 10_000) * 2) < 1e-9);
  // A peak above the current cost replaces it at once.
  e.end(30_120, 30_120 + 500);
  assert.equal(e.cost, 500);
});

test('failures count as infinite latency', () => {
  const s = summarize([10, 20, 30, Infinity]);
  assert.equal(s.fail_rate, 0.25);
  assert.equal(s.p50_ms, 20);
  assert.equal(s.p99_ms, Infinity);
  assert.equal(s.p999_ms, Infinity);
  // In a run: Finagle's peak EWMA loves the fail-fast nodes (5 ms errors look fast): failures, and an infinite tail.
  const w = buildWorld({ seed: 2, nodes: 40, durationMs: 4000, warmupMs: 400, load: 0.5, scenario: 'fail-fast' });
  const r = runSim(w, new P2CPeakEwmaPolicy(true));
  assert.ok(r.fail_rate > 0.01);
  assert.equal(r.p999_ms, Infinity);
  assert.equal(r.max_ms, Infinity);
});

/** Sends request i to node i mod N and records the agent-reported exec time; optionally burns random numbers. */
class Recorder implements Policy {
  readonly exec = new Map<number, number>();
  rng: number[] = [];
  private env!: PolicyEnv;
  constructor(
    readonly name: string,
    private burn: number,
  ) {}
  init(env: PolicyEnv): void {
    this.env = env;
  }
  pick(req: SimRequest): number {
    for (let i = 0; i < this.burn; i++) this.rng.push(this.env.rng.next());
    return req.id % this.env.nodes.length;
  }
  onSend(): void {}
  onReply(_node: number, req: SimRequest, reply: ReplyInfo): void {
    this.exec.set(req.id, reply.execMs);
  }
  onFailure(): void {}
}

test('paired random streams: the workload does not depend on the policy', () => {
  const w = buildWorld({ seed: 5, nodes: 20, durationMs: 2000, warmupMs: 0, load: 0.3, mix: [1, 0, 0] });
  const a = new Recorder('a', 0);
  const b = new Recorder('b', 3);
  const c = new Recorder('c', 3);
  runSim(w, a);
  runSim(w, b);
  runSim(w, c);
  assert.ok(a.exec.size > 100);
  // Same request on the same node: the same service time, however many random numbers the policy drew.
  assert.deepEqual([...a.exec], [...b.exec]);
  // Every policy gets the same random stream of its own.
  assert.deepEqual(b.rng, c.rng);
  // The trace is a function of the seed alone.
  const w2 = buildWorld({ seed: 5, nodes: 20, durationMs: 2000, warmupMs: 0, load: 0.3, mix: [1, 0, 0] });
  assert.deepEqual(w2.trace.t, w.trace.t);
  assert.deepEqual(w2.trace.z, w.trace.z);
});
