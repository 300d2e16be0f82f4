/**
 * `npm run bench -- router-sim [--quick]`: the router simulator (bench/sim/) over fleet mixes, loads and
 * scenarios, every policy on the same worlds (common random numbers), several seeds per point, on both
 * cores. Every policy sees only what the protocol carries (`info: "wire"`); the oracle alone reads the
 * true state. Failures count as +∞ in percentiles; JSON cannot hold ∞, so an infinite figure is null.
 *
 * Per point: each policy's median over seeds of p50/p95/p99/p99.9, its mean fail rate and extra load;
 * ours' p99 over the best non-oracle baseline's (the one with the lowest median p99), paired per seed,
 * as [median, 2.5 %, 97.5 %] of a bootstrap over seeds; the same against the oracle. The scenarios
 * (cold, churn, churn-stress, fail-fast) add the ratios their goals name. A full run also writes
 * bench/results/router-sim.md.
 * Options: --seeds N --nodes N --duration-s S --routers W --policies a,b --mixes a,b --loads 0.7,0.8 --scenarios a,b --workers K
 */
import { mkdirSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { Worker } from 'node:worker_threads';
import type { BenchContext, BenchResult } from './lib.ts';
import type { SimResult } from './sim/engine.ts';
import { bootstrapMedian, mean, median, ratio } from './sim/stats.ts';
import { runTask, type Task, type TaskResult } from './sim/worker.ts';
import type { ScenarioName, SimConfig } from './sim/world.ts';

const ROOT = path.resolve(path.dirname(new URL(import.meta.url).pathname), '..');
const POLICIES = ['finagle', 'linkerd', 'envoy', 'prequal', 'prequal-weighted', 'oracle', 'ours'];
const BASELINE_NAMES = new Set(['finagle', 'linkerd', 'envoy', 'prequal', 'prequal-weighted']);
/** The only baseline whose source ships backup requests (Finagle's BackupRequestFilter). */
const WITH_BACKUPS = ['finagle'];

interface Point {
  kind: 'steady' | ScenarioName;
  mix: string;
  load: number;
  /** Per policy, per seed. */
  runs: Map<string, SimResult[]>;
  offered: number[];
}

const fin = (v: number): number | null => (Number.isFinite(v) ? Math.round(v * 10) / 10 : null);
const r3 = (v: number): number | null => (Number.isFinite(v) ? Math.round(v * 1000) / 1000 : null);
const r4 = (v: number) => Math.round(v * 1e4) / 1e4;
type Triple = [number | null, number | null, number | null];
const triple = (t: [number, number, number]): Triple => [r3(t[0]), r3(t[1]), r3(t[2])];

async function runAll(tasks: Task[], workers: number, log: (s: string) => void): Promise<Map<number, TaskResult>> {
  const out = new Map<number, TaskResult>();
  if (workers <= 1) {
    for (const t of tasks) {
      out.set(t.id, runTask(t));
      log(`  ${out.size}/${tasks.length} runs of worlds done`);
    }
    return out;
  }
  const queue = [...tasks];
  const file = new URL('./sim/worker.mjs', import.meta.url);
  await Promise.all(
    Array.from({ length: workers }, async () => {
      const w = new Worker(file);
      try {
        for (let t = queue.shift(); t !== undefined; t = queue.shift()) {
          const task = t;
          const res = await new Promise<TaskResult>((resolve, reject) => {
            w.once('message', resolve);
            w.once('error', reject);
            w.postMessage(task);
          });
          w.removeAllListeners('error');
          out.set(task.id, res);
          if (out.size % 5 === 0 || out.size === tasks.length) log(`  ${out.size}/${tasks.length} worlds done`);
        }
      } finally {
        await w.terminate();
      }
    }),
  );
  return out;
}

/** Medians over seeds, the fail rate and extra load as means. */
function figures(rs: SimResult[]) {
  return {
    p50_ms: fin(median(rs.map((r) => r.p50_ms))),
    p95_ms: fin(median(rs.map((r) => r.p95_ms))),
    p99_ms: fin(median(rs.map((r) => r.p99_ms))),
    p999_ms: fin(median(rs.map((r) => r.p999_ms))),
    fail_rate: r4(mean(rs.map((r) => r.fail_rate))),
    extra_load: r4(mean(rs.map((r) => r.extra_load))),
    ...(rs.some((r) => r.probes_per_request > 0) ? { probes_per_request: r4(mean(rs.map((r) => r.probes_per_request))) } : {}),
  };
}

type Metric = 'p99_ms' | 'p999_ms' | 'fail_rate';

/** The baseline (among `names`) with the lowest median of `metric`, ties to the lower fail rate. */
function best(point: Point, names: readonly string[], metric: Metric): string | undefined {
  let bestName: string | undefined;
  let key: [number, number] = [Number.POSITIVE_INFINITY, Number.POSITIVE_INFINITY];
  for (const name of names) {
    const rs = point.runs.get(name);
    if (!rs) continue;
    const k: [number, number] = [
      metric === 'fail_rate' ? mean(rs.map((r) => r.fail_rate)) : median(rs.map((r) => r[metric])),
      mean(rs.map((r) => r.fail_rate)),
    ];
    if (bestName === undefined || k[0] < key[0] || (k[0] === key[0] && k[1] < key[1])) {
      bestName = name;
      key = k;
    }
  }
  return bestName;
}

/** Ours over `other`, paired per seed, bootstrapped over seeds. */
function pairedRatio(point: Point, other: string | undefined, metric: Metric): [number, number, number] {
  const ours = point.runs.get('ours');
  const them = other ? point.runs.get(other) : undefined;
  if (!ours || !them) return [Number.NaN, Number.NaN, Number.NaN];
  return bootstrapMedian(ours.map((r, s) => ratio(r[metric], them[s]![metric])));
}

function table(title: string, point: Point): string {
  const show = (v: number | null) => (v === null ? '∞' : v.toFixed(1));
  const rows = [...point.runs].map(([name, rs]) => {
    const f = figures(rs);
    return `| ${name} | ${show(f.p50_ms)} | ${show(f.p95_ms)} | ${show(f.p99_ms)} | ${show(f.p999_ms)} | ${(f.fail_rate * 100).toFixed(2)} % | ${(f.extra_load * 100).toFixed(1)} % |`;
  });
  return `### ${title}\n\n| policy | p50 ms | p95 ms | p99 ms | p99.9 ms | fail | extra load |\n|---|---:|---:|---:|---:|---:|---:|\n${rows.join('\n')}\n`;
}

export async function run(ctx: BenchContext): Promise<BenchResult> {
  const { quick, log, args } = ctx;
  const num = (k: string, d: number) => (typeof args[k] === 'string' ? Number(args[k]) : d);
  const list = (k: string, d: string[]) => (typeof args[k] === 'string' ? (args[k] as string).split(',') : d);
  const seedCount = num('seeds', 5);
  const seeds = Array.from({ length: seedCount }, (_, i) => i + 1);
  const nodes = num('nodes', quick ? 16 : 32);
  const routers = num('routers', 3);
  const durationMs = num('duration-s', quick ? 12 : 60) * 1000;
  const warmupMs = num('warmup-s', quick ? 3 : 10) * 1000;
  const policies = list('policies', POLICIES);
  const mixes = list('mixes', quick ? ['edge', 'homogeneous'] : ['edge', 'pi-heavy', 'homogeneous']);
  const loads = list('loads', ['0.7', '0.8', '0.9']).map(Number);
  const scenarios = list('scenarios', ['cold', 'churn', 'churn-stress', 'fail-fast']) as ScenarioName[];
  const workers = num('workers', Math.max(1, Math.min(2, os.availableParallelism())));
  const base: Partial<SimConfig> = { nodes, routers, durationMs, warmupMs };
  log(
    `router-sim: ${nodes} nodes, ${routers} routers, ${durationMs / 1000} s virtual (${warmupMs / 1000} s warm-up), seeds ${seeds.join(',')}, ${workers} workers`,
  );

  const points: Point[] = [];
  // The acceptance loads run on the edge mix and the homogeneous control; the Pi-heavy mix, a second
  // heterogeneous fleet, at 0.8 only unless --loads names them (it keeps the full run near 10 minutes).
  const loadsOf = (mix: string) =>
    typeof args.loads === 'string' ? loads : (quick && mix === 'homogeneous') || mix === 'pi-heavy' ? [0.8] : loads;
  for (const mix of mixes) for (const load of loadsOf(mix)) points.push({ kind: 'steady', mix, load, runs: new Map(), offered: [] });
  for (const scenario of scenarios) points.push({ kind: scenario, mix: 'edge', load: 0.8, runs: new Map(), offered: [] });

  const tasks: Task[] = [];
  points.forEach((p, pi) => {
    for (const seed of seeds)
      tasks.push({
        id: pi * 1000 + seed,
        cfg: { ...base, seed, mix: p.mix, load: p.load, scenario: p.kind === 'steady' ? 'steady' : p.kind },
        policies,
      });
  });
  const t0 = performance.now();
  const results = await runAll(tasks, workers, log);
  log(`simulated ${tasks.length} worlds × ${policies.length} policies in ${((performance.now() - t0) / 1000).toFixed(0)} s`);
  points.forEach((p, pi) => {
    for (const seed of seeds) {
      const res = results.get(pi * 1000 + seed)!;
      p.offered.push(res.offeredLoad);
      for (const r of res.results) p.runs.set(r.policy, [...(p.runs.get(r.policy) ?? []), r]);
    }
  });

  const baselines = policies.filter((p) => BASELINE_NAMES.has(p));
  const md: string[] = [
    `# router-sim (${quick ? 'quick' : 'full'}): ${nodes} nodes, ${routers} routers, ${durationMs / 1000} s virtual, seeds ${seeds.join(', ')}, info: wire\n`,
  ];
  const pointJson = (p: Point) => {
    const bestP99 = best(p, baselines, 'p99_ms');
    return {
      mix: p.mix,
      load: p.load,
      offered_load: r3(mean(p.offered)),
      policies: Object.fromEntries([...p.runs].map(([name, rs]) => [name, figures(rs)])),
      best_baseline: bestP99 ?? null,
      ratio_p99_vs_best: triple(pairedRatio(p, bestP99, 'p99_ms')),
      ratio_p99_vs_oracle: triple(pairedRatio(p, 'oracle', 'p99_ms')),
    };
  };

  const steady = points.filter((p) => p.kind === 'steady');
  const steadyJson = steady.map((p) => {
    const t = table(`${p.mix}, load ${p.load}`, p);
    log(t);
    md.push(t);
    return pointJson(p);
  });
  const scenarioJson: Record<string, unknown> = {};
  for (const p of points.filter((q) => q.kind !== 'steady')) {
    const t = table(`${p.kind} (edge mix, load ${p.load})`, p);
    log(t);
    md.push(t);
    const j: Record<string, unknown> = pointJson(p);
    const bestFail = best(p, baselines, 'fail_rate');
    j.best_baseline_fail = bestFail ?? null;
    j.ratio_fail_vs_best = triple(pairedRatio(p, bestFail, 'fail_rate'));
    const bestP999 = best(p, baselines, 'p999_ms');
    j.best_baseline_p999 = bestP999 ?? null;
    j.ratio_p999_vs_best = triple(pairedRatio(p, bestP999, 'p999_ms'));
    const withBackups = best(
      p,
      baselines.filter((b) => WITH_BACKUPS.includes(b)),
      'p999_ms',
    );
    if (withBackups) j.ratio_p999_vs_best_with_backups = triple(pairedRatio(p, withBackups, 'p999_ms'));
    scenarioJson[p.kind] = j;
  }

  // The acceptance goals of issue 12, read off the figures above.
  const at = (mix: string, load: number) => steadyJson.find((s) => s.mix === mix && s.load === load);
  const heterogeneous = steadyJson
    .filter((s) => s.mix !== 'homogeneous')
    .map((s) => {
      const [m, , hi] = s.ratio_p99_vs_best;
      const vsOracle = s.ratio_p99_vs_oracle[0];
      return {
        mix: s.mix,
        load: s.load,
        ratio_p99_vs_best: s.ratio_p99_vs_best,
        ratio_p99_vs_oracle: s.ratio_p99_vs_oracle,
        met: (m !== null && hi !== null && m <= 0.8 && hi <= 0.9) || (vsOracle !== null && vsOracle <= 1.1),
      };
    });
  const homog = steadyJson.filter((s) => s.mix === 'homogeneous');
  const cold = scenarioJson.cold as { ratio_fail_vs_best: Triple } | undefined;
  const churn = scenarioJson.churn as
    | { ratio_p999_vs_best_with_backups?: (number | null)[]; policies: Record<string, { extra_load: number }> }
    | undefined;
  const acceptance = {
    heterogeneous,
    homogeneous: homog.map((s) => ({
      load: s.load,
      ratio_p99_vs_best: s.ratio_p99_vs_best,
      met: s.ratio_p99_vs_best[0] !== null && s.ratio_p99_vs_best[0] <= 1.05,
    })),
    cold: cold
      ? { ratio_fail_vs_best: cold.ratio_fail_vs_best, met: cold.ratio_fail_vs_best[0] !== null && cold.ratio_fail_vs_best[0] <= 0.5 }
      : null,
    churn: churn
      ? {
          ratio_p999_vs_best_with_backups: churn.ratio_p999_vs_best_with_backups ?? null,
          ours_extra_load: churn.policies.ours?.extra_load ?? null,
          met:
            (churn.ratio_p999_vs_best_with_backups?.[0] ?? Number.POSITIVE_INFINITY) <= 0.6 &&
            (churn.policies.ours?.extra_load ?? 1) <= 0.05,
        }
      : null,
  };
  md.push(`## acceptance\n\n\`\`\`json\n${JSON.stringify(acceptance, null, 2)}\n\`\`\`\n`);
  if (!quick) {
    const dir = path.join(ROOT, 'bench', 'results');
    mkdirSync(dir, { recursive: true });
    writeFileSync(path.join(dir, 'router-sim.md'), md.join('\n'));
    log(`wrote ${path.join(dir, 'router-sim.md')}`);
  }
  return {
    bench: 'router-sim',
    quick,
    info: 'wire',
    seeds,
    nodes,
    routers,
    virtual_s: durationMs / 1000,
    warmup_s: warmupMs / 1000,
    infinite_as: null,
    headline: at('edge', 0.8) ? { mix: 'edge', load: 0.8, ratio_p99_vs_best: at('edge', 0.8)!.ratio_p99_vs_best } : null,
    points: steadyJson,
    scenarios: scenarioJson,
    acceptance,
  };
}
