/**
 * router-pick: wall-clock cost of one `selectAgent` on fleets of 100, 1,000 and 10,000 agents (10 % fast GPU,
 * 30 % mid GPU, 60 % CPU; 10 sites; 3 models, each served by a subset, some cold). Virtual time advances
 * 0.05 ms per pick, so the pool is rebuilt (every poolRefreshMs = 1 s, an O(N log N) sort) once per 20,000
 * picks and shows up in the mean and max rather than the p50; its cost is reported on its own as pool_build_ms.
 * Between timed picks the registry keeps changing (sends, replies, queue reports, every agent's 1 s heartbeat), untimed.
 */
import { percentileSorted, round } from '@edge-mesh/client';
import {
  createRegistry,
  currentPool,
  mulberry32,
  onQueueReport,
  onReply,
  onSend,
  type Registry,
  selectAgent,
  upsertAgent,
} from '@edge-mesh/router';
import type { BenchContext, BenchResult } from './lib.ts';

const CLASSES = [
  { name: 'gpu-fast', share: 0.1, speed: 1, slots: 3 },
  { name: 'gpu-mid', share: 0.3, speed: 4, slots: 2 },
  { name: 'cpu', share: 0.6, speed: 40, slots: 1 },
];
const MODELS = ['kws', 'ocr', 'vad'];

function buildFleet(nodes: number, seed: number): Registry {
  const rng = mulberry32(seed);
  const reg = createRegistry({ seed, site: 'site-0' });
  for (let i = 0; i < nodes; i++) {
    const u = rng();
    const cls = u < 0.1 ? CLASSES[0]! : u < 0.4 ? CLASSES[1]! : CLASSES[2]!;
    const speed = cls.speed * Math.exp(0.2 * (rng() * 2 - 1));
    upsertAgent(
      reg,
      {
        agentId: `agent-${i}`,
        hardwareClass: cls.name,
        site: `site-${Math.floor(rng() * 10)}`,
        slots: cls.slots,
        models: MODELS.filter(() => rng() < 0.7).map((model, k) => ({
          model,
          serviceMs: 10 * speed * (k + 1),
          warm: rng() < 0.7,
          coldLoadMs: 3000,
        })),
      },
      0,
    );
  }
  return reg;
}

function measure(nodes: number, picks: number, seed: number) {
  const reg = buildFleet(nodes, seed);
  const rng = mulberry32(seed + 1);
  const ids = [...reg.agents.keys()];
  const t0 = performance.now();
  currentPool(reg, { model: 'kws' }, 0);
  const poolBuildMs = performance.now() - t0;
  const samples = new Float64Array(picks);
  let nowMs = 1;
  let refused = 0;
  const explored = { n: 0 };
  const inflight: string[] = [];
  let nextHeartbeatMs = 1_000;
  // Warm-up: let V8 optimise the pick path before timing it.
  for (let i = 0; i < 2000; i++) selectAgent(reg, { model: MODELS[i % 3]!, bytesUp: 20_000, deadlineMs: nowMs + 1000 }, nowMs, rng);
  for (let i = 0; i < picks; i++) {
    nowMs += 0.05;
    const request = { model: MODELS[i % 3]!, bytesUp: 20_000 + (i % 5) * 50_000, bytesDown: 1_000, deadlineMs: nowMs + 1000 };
    const start = process.hrtime.bigint();
    const sel = selectAgent(reg, request, nowMs, rng);
    samples[i] = Number(process.hrtime.bigint() - start) / 1000;
    if (!sel.ok) {
      refused++;
      continue;
    }
    if (sel.explored) explored.n++;
    onSend(reg, sel.agentId, request.model, nowMs);
    inflight.push(sel.agentId, request.model);
    if (inflight.length > 200) {
      const id = inflight.shift()!;
      const model = inflight.shift()!;
      onReply(reg, id, model, { queueMs: 1, execMs: 10 + rng() * 20, rttMs: 3 + rng() * 5, bytes: request.bytesUp }, nowMs);
    }
    if (i % 10 === 0) onQueueReport(reg, ids[Math.floor(rng() * ids.length)]!, Math.floor(rng() * 3), nowMs);
    // Every agent's 1 s heartbeat (untimed), so none goes silent past heartbeatTimeoutMs.
    if (nowMs >= nextHeartbeatMs) {
      for (const id of ids) onQueueReport(reg, id, reg.agents.get(id)!.reportedRif, nowMs);
      nextHeartbeatMs += 1_000;
    }
  }
  const mean = samples.reduce((s, v) => s + v, 0) / picks;
  const sorted = samples.sort();
  return {
    nodes,
    picks,
    pick_p50_us: round(percentileSorted(sorted, 50), 2),
    pick_p99_us: round(percentileSorted(sorted, 99), 2),
    pick_mean_us: round(mean, 2),
    pick_max_us: round(sorted[sorted.length - 1]!, 1),
    pool_build_ms: round(poolBuildMs, 2),
    refused_rate: round(refused / picks, 4),
    explored_rate: round(explored.n / picks, 4),
  };
}

export async function run(ctx: BenchContext): Promise<BenchResult> {
  const picks = typeof ctx.args.picks === 'string' ? Number(ctx.args.picks) : ctx.quick ? 50_000 : 300_000;
  const sizes: Record<string, ReturnType<typeof measure>> = {};
  for (const nodes of [100, 1_000, 10_000]) {
    const r = measure(nodes, picks, 42);
    ctx.log(`router-pick ${JSON.stringify(r)}`);
    sizes[String(nodes)] = r;
  }
  const big = sizes['10000']!;
  return {
    bench: 'router-pick',
    quick: ctx.quick,
    nodes: 10_000,
    pick_p50_us: big.pick_p50_us,
    pick_p99_us: big.pick_p99_us,
    pick_mean_us: big.pick_mean_us,
    pool_build_ms: big.pool_build_ms,
    picks,
    sizes,
  };
}
