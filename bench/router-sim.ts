/**
 * `npm run bench -- router-sim [--quick]`: the router simulator (bench/sim/) over scenarios × policies.
 * Headline: the heterogeneous fleet (10 % gpu-fast, 30 % gpu-mid, 60 % cpu), steady, at loads 0.7–0.9;
 * then gray failure, churn, fail-fast, cold start, geo (two client sites) and a 0.5 → 1.2 load ramp at 0.8.
 * Every policy sees the same world and the same request trace (common random numbers). Failures count as
 * +∞ in percentiles; JSON cannot hold ∞, so an infinite percentile is written as null.
 * The full run also writes bench/results/router-sim.md and router-sim-p99.svg (p99 against load per policy).
 * Options: --nodes N --duration-s S --seed K --loads 0.7,0.8,0.9 --policies a,b --scenarios a,b
 */
import { mkdirSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import type { BenchContext, BenchResult } from './lib.ts';
import { runSim, type SimResult } from './sim/engine.ts';
import { OURS } from './sim/ours.ts';
import { BASELINES } from './sim/policies.ts';
import type { AnyPolicyFactory } from './sim/types.ts';
import { buildWorld, SCENARIOS, type ScenarioName } from './sim/world.ts';

const ROOT = path.resolve(path.dirname(new URL(import.meta.url).pathname), '..');
const FACTORIES: Record<string, AnyPolicyFactory> = { ...BASELINES, ...OURS };
/** Policies in the side scenarios (the goals need these). */
const SIDE_POLICIES = ['random', 'round-robin', 'p2c-peak-ewma', 'p2c-peak-ewma-weighted', 'prequal-lite', 'ours', 'ours-no-hedge'];

export interface PolicyFigures {
  p50_ms: number | null;
  p99_ms: number | null;
  p999_ms: number | null;
  fail_rate: number;
  extra_load: number;
}

const fin = (v: number): number | null => (Number.isFinite(v) ? Math.round(v * 10) / 10 : null);
const r4 = (v: number) => Math.round(v * 1e4) / 1e4;

export function figures(r: SimResult): PolicyFigures {
  return {
    p50_ms: fin(r.p50_ms),
    p99_ms: fin(r.p99_ms),
    p999_ms: fin(r.p999_ms),
    fail_rate: r4(r.fail_rate),
    extra_load: r4(r.extra_load),
  };
}

const show = (v: number) => (Number.isFinite(v) ? v.toFixed(1) : '∞');

function table(title: string, rows: SimResult[]): string {
  const head = `| policy | p50 ms | p99 ms | p99.9 ms | fail | extra load | gpu-fast/mid/cpu share |\n|---|---:|---:|---:|---:|---:|---|`;
  const body = rows
    .map(
      (r) =>
        `| ${r.policy} | ${show(r.p50_ms)} | ${show(r.p99_ms)} | ${show(r.p999_ms)} | ${(r.fail_rate * 100).toFixed(2)} % | ${(r.extra_load * 100).toFixed(1)} % | ${[
          'gpu-fast',
          'gpu-mid',
          'cpu',
        ]
          .map((c) => ((r.served[c] ?? 0) * 100).toFixed(0))
          .join('/')} |`,
    )
    .join('\n');
  return `### ${title}\n\n${head}\n${body}\n`;
}

/** ratio a/b with ∞ handled: finite/∞ = 0, ∞/x = ∞. */
function ratio(a: number, b: number): number {
  if (!Number.isFinite(a)) return Infinity;
  if (!Number.isFinite(b)) return 0;
  return b > 0 ? a / b : Infinity;
}

function svgPlot(byLoad: { load: number; results: SimResult[] }[], ramp: SimResult[] | undefined): string {
  const W = 760;
  const H = 460;
  const m = { l: 70, r: 200, t: 40, b: 50 };
  const series = new Map<string, { x: number; y: number }[]>();
  for (const { load, results } of byLoad)
    for (const r of results) series.set(r.policy, [...(series.get(r.policy) ?? []), { x: load, y: r.p99_ms }]);
  if (ramp)
    for (const r of ramp)
      for (const s of r.steps ?? [])
        series.set(`${r.policy} (ramp)`, [...(series.get(`${r.policy} (ramp)`) ?? []), { x: s.load, y: s.p99_ms }]);
  const xs = [...series.values()].flat().map((p) => p.x);
  const x0 = Math.min(...xs);
  const x1 = Math.max(...xs);
  const yMin = 10;
  const yMax = 1000; // the deadline: ∞ (failures) is drawn above it
  const px = (x: number) => m.l + ((x - x0) / Math.max(1e-9, x1 - x0)) * (W - m.l - m.r);
  const py = (y: number) => {
    const v = Number.isFinite(y) ? Math.min(Math.max(y, yMin), yMax) : yMax * 1.6;
    return m.t + (1 - (Math.log10(v) - Math.log10(yMin)) / (Math.log10(yMax * 1.6) - Math.log10(yMin))) * (H - m.t - m.b);
  };
  const colors = [
    '#1f77b4',
    '#ff7f0e',
    '#2ca02c',
    '#d62728',
    '#9467bd',
    '#8c564b',
    '#e377c2',
    '#7f7f7f',
    '#bcbd22',
    '#17becf',
    '#000000',
    '#aa3377',
    '#228833',
    '#ccbb44',
  ];
  let out = `<svg xmlns="http://www.w3.org/2000/svg" width="${W}" height="${H}" font-family="sans-serif" font-size="11">\n`;
  out += `<rect width="${W}" height="${H}" fill="white"/>\n<text x="${W / 2 - 100}" y="20" font-size="14">p99 latency against load (log ms; top band = ∞)</text>\n`;
  for (const y of [10, 30, 100, 300, 1000])
    out += `<line x1="${m.l}" x2="${W - m.r}" y1="${py(y)}" y2="${py(y)}" stroke="#ddd"/><text x="${m.l - 8}" y="${py(y) + 4}" text-anchor="end">${y}</text>\n`;
  out += `<text x="${m.l - 8}" y="${py(Infinity) + 4}" text-anchor="end">∞</text>\n`;
  const ticks = [...new Set(xs)].sort((a, b) => a - b);
  for (const x of ticks)
    out += `<line x1="${px(x)}" x2="${px(x)}" y1="${m.t}" y2="${H - m.b}" stroke="#eee"/><text x="${px(x)}" y="${H - m.b + 16}" text-anchor="middle">${x}</text>\n`;
  out += `<text x="${(m.l + W - m.r) / 2}" y="${H - 12}" text-anchor="middle">load ρ (fraction of effective capacity)</text>\n`;
  let i = 0;
  for (const [name, pts] of series) {
    const c = colors[i % colors.length]!;
    const d = pts
      .sort((a, b) => a.x - b.x)
      .map((p, k) => `${k ? 'L' : 'M'}${px(p.x).toFixed(1)},${py(p.y).toFixed(1)}`)
      .join(' ');
    out += `<path d="${d}" fill="none" stroke="${c}" stroke-width="2"${name.endsWith('(ramp)') ? ' stroke-dasharray="5,3"' : ''}/>\n`;
    out += `<text x="${W - m.r + 10}" y="${m.t + 14 * i}" fill="${c}">${name}</text>\n`;
    i++;
  }
  return `${out}</svg>\n`;
}

export async function run(ctx: BenchContext): Promise<BenchResult> {
  const { quick, log, args } = ctx;
  const num = (k: string, d: number) => (typeof args[k] === 'string' ? Number(args[k]) : d);
  const list = (k: string, d: string[]) => (typeof args[k] === 'string' ? (args[k] as string).split(',') : d);
  const nodes = num('nodes', quick ? 100 : 200);
  const durationMs = num('duration-s', quick ? 12 : 40) * 1000;
  const seed = num('seed', 1);
  const loads = list('loads', quick ? ['0.7', '0.8', '0.9'] : ['0.5', '0.6', '0.7', '0.8', '0.9']).map(Number);
  const headPolicies = list('policies', Object.keys(FACTORIES));
  const sidePolicies = list('policies', quick ? SIDE_POLICIES : Object.keys(FACTORIES));
  const scenarios = list(
    'scenarios',
    SCENARIOS.filter((s) => s !== 'steady'),
  ) as ScenarioName[];
  const base = { seed, nodes, durationMs, warmupMs: durationMs * 0.1 };
  const missing = [...headPolicies, ...sidePolicies].filter((p) => !FACTORIES[p]);
  if (missing.length) throw new Error(`unknown policies: ${missing.join(', ')}`);
  log(`router-sim: ${nodes} nodes, ${durationMs / 1000} s virtual per run, seed ${seed}, loads ${loads.join(', ')}`);

  const md: string[] = [`# router-sim (${quick ? 'quick' : 'full'}): ${nodes} nodes, ${durationMs / 1000} s virtual, seed ${seed}\n`];
  const byLoad: { load: number; results: SimResult[] }[] = [];
  for (const load of loads) {
    const world = buildWorld({ ...base, scenario: 'steady', load });
    const results = headPolicies.map((p) => runSim(world, FACTORIES[p]!()));
    byLoad.push({ load, results });
    const t = table(`steady, heterogeneous fleet, load ${load} (${world.trace.n} requests)`, results);
    log(t);
    md.push(t);
  }
  const side: { scenario: ScenarioName; load: number; results: SimResult[] }[] = [];
  const sideLoad = num('side-load', 0.8);
  for (const scenario of scenarios) {
    const world = buildWorld({ ...base, scenario, load: sideLoad });
    const results = sidePolicies.map((p) => runSim(world, FACTORIES[p]!()));
    side.push({ scenario, load: sideLoad, results });
    const t = table(`${scenario}${scenario === 'ramp' ? ' (0.5 → 1.2)' : `, load ${sideLoad}`} (${world.trace.n} requests)`, results);
    log(t);
    md.push(t);
    if (scenario === 'ramp') {
      const rt = `p99 per ramp step (ms):\n\n| policy | ${world.steps.join(' | ')} |\n|---|${world.steps.map(() => '---:').join('|')}|\n${results
        .map((r) => `| ${r.policy} | ${(r.steps ?? []).map((s) => show(s.p99_ms)).join(' | ')} |`)
        .join('\n')}\n`;
      log(rt);
      md.push(rt);
    }
  }

  const pols = (rs: SimResult[]) => Object.fromEntries(rs.map((r) => [r.policy, figures(r)]));
  const get = (rs: SimResult[], name: string) => rs.find((r) => r.policy === name);

  // Goals: the comparisons reported under `goals` (docs/benchmarks.md, "router-sim").
  const goals: Record<string, unknown> = {};
  if (headPolicies.includes('ours')) {
    const perLoad = byLoad
      .filter(({ load }) => load >= 0.7 && load <= 0.9)
      .map(({ load, results }) => {
        const ours = get(results, 'ours')!;
        const best = Math.min(get(results, 'p2c-peak-ewma-weighted')?.p99_ms ?? Infinity, get(results, 'prequal-lite')?.p99_ms ?? Infinity);
        return {
          load,
          p99_ratio_vs_best: fin(ratio(ours.p99_ms, best) * 1000) === null ? null : Math.round(ratio(ours.p99_ms, best) * 1000) / 1000,
          ours_fail_rate: r4(ours.fail_rate),
          random_fail_rate: r4(get(results, 'random')?.fail_rate ?? NaN),
          round_robin_fail_rate: r4(get(results, 'round-robin')?.fail_rate ?? NaN),
        };
      });
    goals.heterogeneous = {
      goal: 'ours p99 ≤ 0.70 × min(p2c-peak-ewma-weighted, prequal-lite); fail_rate ≤ 0.1 %',
      per_load: perLoad,
      met:
        perLoad.length > 0 && perLoad.every((x) => x.p99_ratio_vs_best !== null && x.p99_ratio_vs_best <= 0.7 && x.ours_fail_rate <= 0.001),
    };
  }
  const ff = side.find((s) => s.scenario === 'fail-fast');
  if (ff && get(ff.results, 'ours') && get(ff.results, 'p2c-peak-ewma')) {
    const o = get(ff.results, 'ours')!.fail_rate;
    const p = get(ff.results, 'p2c-peak-ewma')!.fail_rate;
    // Uniform P2C fails most requests on this fleet even without fail-fast nodes, so the weighted variant is shown too.
    const pw = get(ff.results, 'p2c-peak-ewma-weighted')?.fail_rate;
    goals.fail_fast = {
      goal: '≥ 80 % fewer failures than p2c-peak-ewma',
      ours_fail_rate: r4(o),
      p2c_peak_ewma_fail_rate: r4(p),
      reduction: p > 0 ? r4(1 - o / p) : null,
      ...(pw !== undefined ? { p2c_peak_ewma_weighted_fail_rate: r4(pw), reduction_vs_weighted: pw > 0 ? r4(1 - o / pw) : null } : {}),
      met: p > 0 && o <= 0.2 * p,
    };
  }
  const ch = side.find((s) => s.scenario === 'churn');
  if (ch && get(ch.results, 'ours') && get(ch.results, 'ours-no-hedge')) {
    const o = get(ch.results, 'ours')!;
    const nh = get(ch.results, 'ours-no-hedge')!;
    const rr = ratio(o.p999_ms, nh.p999_ms);
    goals.churn = {
      goal: 'p99.9 ≤ 0.5 × ours-no-hedge at ≤ 5 % extra load',
      ours_p999_ms: fin(o.p999_ms),
      no_hedge_p999_ms: fin(nh.p999_ms),
      ratio: Number.isFinite(rr) ? Math.round(rr * 1000) / 1000 : null,
      extra_load: r4(o.extra_load),
      met: rr <= 0.5 && o.extra_load <= 0.05,
    };
  }

  const headline = byLoad.find((b) => b.load === 0.8) ?? byLoad[byLoad.length - 1]!;
  if (!quick) {
    const dir = path.join(ROOT, 'bench', 'results');
    mkdirSync(dir, { recursive: true });
    writeFileSync(path.join(dir, 'router-sim.md'), `${md.join('\n')}\n## goals\n\n\`\`\`json\n${JSON.stringify(goals, null, 2)}\n\`\`\`\n`);
    writeFileSync(path.join(dir, 'router-sim-p99.svg'), svgPlot(byLoad, side.find((s) => s.scenario === 'ramp')?.results));
    log(`wrote ${path.join(dir, 'router-sim.md')} and router-sim-p99.svg`);
  }
  return {
    bench: 'router-sim',
    quick,
    scenario: 'steady',
    fleet: 'heterogeneous 10/30/60',
    load: headline.load,
    nodes,
    virtual_s: durationMs / 1000,
    seed,
    infinite_as: null,
    policies: pols(headline.results),
    by_load: byLoad.map(({ load, results }) => ({ load, policies: pols(results) })),
    scenarios: side.map(({ scenario, load, results }) => ({
      scenario,
      load: scenario === 'ramp' ? '0.5-1.2' : load,
      policies: pols(results),
      ...(scenario === 'ramp'
        ? { ramp_p99_ms: Object.fromEntries(results.map((r) => [r.policy, (r.steps ?? []).map((s) => fin(s.p99_ms))])) }
        : {}),
    })),
    goals,
  };
}
