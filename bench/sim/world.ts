/**
 * Fleets, networks, workloads and failure schedules, all drawn from the seed before any policy runs, so
 * every policy sees the same world and the same request trace (common random numbers, paired comparisons).
 *
 * Fleet (docs/routing.md, "The simulator"): gpu-fast 10 % (median 10 ms, 2–4 slots, 100 Mb/s), gpu-mid 30 % (4×, 1–2 slots,
 * 50 Mb/s Wi-Fi), cpu 60 % (40×, 1 slot, 10–20 Mb/s Wi-Fi); per-node speed lognormal(σ 0.2); per-request
 * service lognormal(σ 0.3) × a straggler multiplier U(5, 20) with p = 1 %. Network: 10 sites on a
 * 30 × 30 ms plane, one-way delay = distance + access heights + broker hop, × lognormal(σ 0.3) jitter;
 * transfer = bytes × 8 / bandwidth. Payloads 20 KB / 100 KB / 1 MB (50 / 35 / 15 %). Load ρ is against
 * effective capacity Σ slots / E[service] × availability, with E[service] including the straggler and
 * lognormal inflation (× 1.166).
 */
import { Rng } from './rng.ts';
import type { ClassName, NodeInfo } from './types.ts';

export type ScenarioName = 'steady' | 'gray' | 'churn' | 'fail-fast' | 'cold' | 'geo' | 'ramp';
export const SCENARIOS: readonly ScenarioName[] = ['steady', 'gray', 'churn', 'fail-fast', 'cold', 'geo', 'ramp'];

export interface SimConfig {
  seed: number;
  scenario: ScenarioName;
  nodes: number;
  /** Virtual duration of arrivals, ms. */
  durationMs: number;
  /** Requests arriving before this are not measured. */
  warmupMs: number;
  /** Load factor ρ (ignored by `ramp`, which steps 0.5 → 1.2). */
  load: number;
  deadlineMs: number;
  /** Class shares [gpu-fast, gpu-mid, cpu]. */
  mix: readonly [number, number, number];
}

export const DEFAULT_CONFIG: SimConfig = {
  seed: 1,
  scenario: 'steady',
  nodes: 100,
  durationMs: 30_000,
  warmupMs: 3_000,
  load: 0.8,
  deadlineMs: 1_000,
  mix: [0.1, 0.3, 0.6],
};

interface ClassSpec {
  name: ClassName;
  medianMs: number;
  slots: readonly number[];
  bw: readonly [number, number];
  height: readonly [number, number];
  coldMs: readonly [number, number];
}

export const CLASSES: readonly ClassSpec[] = [
  { name: 'gpu-fast', medianMs: 10, slots: [2, 3, 4], bw: [100, 100], height: [1, 4], coldMs: [2000, 10000] },
  { name: 'gpu-mid', medianMs: 40, slots: [1, 2], bw: [40, 60], height: [2, 10], coldMs: [2000, 8000] },
  { name: 'cpu', medianMs: 400, slots: [1], bw: [10, 20], height: [2, 20], coldMs: [1000, 5000] },
];

export const SERVICE_SIGMA = 0.3;
export const STRAGGLER_P = 0.01;
/** E[lognormal(σ 0.3)] × E[straggler multiplier] = e^0.045 × (0.99 + 0.01 × 12.5). */
export const SERVICE_INFLATION = Math.exp((SERVICE_SIGMA * SERVICE_SIGMA) / 2) * (1 - STRAGGLER_P + STRAGGLER_P * 12.5);
export const JITTER_SIGMA = 0.3;
export const BROKER_HOP_MS = 0.5;
export const CLIENT_HEIGHT_MS = 2;
export const FAIL_FAST_MS = 5;
export const LOAD_REPORT_MS = 1000;
export const KEEPALIVE_MS = 3000;
/** Attempt-specific random draws kept per request (original + hedge + retry). */
export const DRAWS = 3;

export interface NodeTruth extends NodeInfo {
  /** True median service ms of this node (the self-benchmark is this, measured once). */
  medianMs: number;
  failFast: boolean;
  coldLoadMs: number;
  /** Gray-failure window and slowdown. */
  grayStart: number;
  grayEnd: number;
  grayMult: number;
  /** Churn: alternating [downAt, upAt, downAt, upAt, ...] and the detection delay of each death. */
  churn: number[];
  detectDelay: number[];
  reportPhase: number;
}

export interface Trace {
  n: number;
  t: Float64Array;
  site: Int32Array;
  cx: Float64Array;
  cy: Float64Array;
  upBytes: Int32Array;
  /** Per request × DRAWS attempt: service quantile z, straggler multiplier, up and down jitter. */
  z: Float64Array;
  strag: Float64Array;
  jitUp: Float64Array;
  jitDown: Float64Array;
  /** Ramp: index of the load step of each request (0 otherwise). */
  step: Int32Array;
}

export interface World {
  cfg: SimConfig;
  nodes: NodeTruth[];
  sites: { x: number; y: number }[];
  routerX: number;
  routerY: number;
  /** Effective capacity, requests per ms. */
  capacityPerMs: number;
  availability: number;
  trace: Trace;
  /** Ramp steps (load per step) or a single step. */
  steps: number[];
  stepMs: number;
}

const SIZES = [20_000, 100_000, 1_000_000] as const;
const SIZE_P = [0.5, 0.35, 0.15] as const;
export const RAMP = [0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.1, 1.2];
export const CHURN_UP_MS = 60_000;
export const CHURN_DOWN_MS = 10_000;

export function buildWorld(partial: Partial<SimConfig> = {}): World {
  const cfg: SimConfig = { ...DEFAULT_CONFIG, ...partial };
  const { seed, scenario } = cfg;
  const geo = new Rng(seed, 'sites');
  const sites = Array.from({ length: 10 }, () => ({ x: geo.uniform(0, 30), y: geo.uniform(0, 30) }));

  // Fleet: exact class counts from the mix, shuffled over ids.
  const fr = new Rng(seed, 'fleet');
  const nFast = Math.max(1, Math.round(cfg.nodes * cfg.mix[0]));
  const nMid = Math.round(cfg.nodes * cfg.mix[1]);
  const classes: number[] = [];
  for (let i = 0; i < cfg.nodes; i++) classes.push(i < nFast ? 0 : i < nFast + nMid ? 1 : 2);
  for (let i = classes.length - 1; i > 0; i--) {
    const j = fr.int(i + 1);
    [classes[i], classes[j]] = [classes[j]!, classes[i]!];
  }
  const nodes: NodeTruth[] = classes.map((c, id) => {
    const spec = CLASSES[c]!;
    const site = fr.int(sites.length);
    const s = sites[site]!;
    const medianMs = spec.medianMs * fr.lognormal(0.2);
    return {
      id,
      agentId: `sim-${spec.name}-${id}`,
      cls: spec.name,
      slots: spec.slots[fr.int(spec.slots.length)]!,
      benchMs: medianMs,
      medianMs,
      site,
      x: s.x + fr.normal(),
      y: s.y + fr.normal(),
      heightMs: fr.uniform(spec.height[0], spec.height[1]),
      bwMbps: fr.uniform(spec.bw[0], spec.bw[1]),
      warm: true,
      failFast: false,
      coldLoadMs: fr.uniform(spec.coldMs[0], spec.coldMs[1]),
      grayStart: Infinity,
      grayEnd: Infinity,
      grayMult: 1,
      churn: [],
      detectDelay: [],
      reportPhase: fr.uniform(0, LOAD_REPORT_MS),
    };
  });

  const sr = new Rng(seed, `scenario-${scenario}`);
  const end = cfg.durationMs + cfg.deadlineMs;
  const pickSome = (pool: NodeTruth[], count: number): NodeTruth[] => {
    const copy = pool.slice();
    const out: NodeTruth[] = [];
    while (out.length < count && copy.length > 0) out.push(copy.splice(sr.int(copy.length), 1)[0]!);
    return out;
  };
  let availability = 1;
  if (scenario === 'gray') {
    // 10 % of nodes 5–10× slower for a while (30–120 s, scaled to the run).
    for (const n of pickSome(nodes, Math.max(1, Math.round(cfg.nodes * 0.1)))) {
      n.grayStart = cfg.durationMs * sr.uniform(0.15, 0.35);
      n.grayEnd = n.grayStart + cfg.durationMs * sr.uniform(0.3, 0.5);
      n.grayMult = sr.uniform(5, 10);
    }
  } else if (scenario === 'churn') {
    // up ~ Exp(60 s), down ~ Exp(10 s); a crash loses queue and in-flight work; death seen after U(0, 1.5 × keep-alive).
    for (const n of nodes) {
      let t = sr.exp(CHURN_UP_MS);
      while (t < end) {
        const down = sr.exp(CHURN_DOWN_MS);
        n.churn.push(t, t + down);
        n.detectDelay.push(sr.uniform(0, 1.5 * KEEPALIVE_MS));
        t += down + sr.exp(CHURN_UP_MS);
      }
    }
    availability = CHURN_UP_MS / (CHURN_UP_MS + CHURN_DOWN_MS);
  } else if (scenario === 'fail-fast') {
    // 4 % of nodes (from the GPU classes, where it hurts) answer errors in 5 ms while reporting low RIF.
    const gpus = nodes.filter((n) => n.cls !== 'cpu');
    for (const n of pickSome(gpus, Math.max(2, Math.round(cfg.nodes * 0.04)))) n.failFast = true;
  } else if (scenario === 'cold') {
    for (const n of pickSome(nodes, Math.round(cfg.nodes * 0.3))) n.warm = false;
  }

  let capacityPerMs = 0;
  for (const n of nodes) if (!n.failFast) capacityPerMs += n.slots / (n.medianMs * SERVICE_INFLATION);
  capacityPerMs *= availability;

  // Clients: uniform over sites, or two hot sites for `geo`.
  const hot = [0, 1];
  const steps = scenario === 'ramp' ? RAMP : [cfg.load];
  const stepMs = cfg.durationMs / steps.length;
  const tr = new Rng(seed, 'trace');
  const t: number[] = [];
  const stepOf: number[] = [];
  for (let s = 0; s < steps.length; s++) {
    const rate = steps[s]! * capacityPerMs;
    let x = s * stepMs + tr.exp(1 / rate);
    while (x < (s + 1) * stepMs) {
      t.push(x);
      stepOf.push(s);
      x += tr.exp(1 / rate);
    }
  }
  const n = t.length;
  const trace: Trace = {
    n,
    t: Float64Array.from(t),
    site: new Int32Array(n),
    cx: new Float64Array(n),
    cy: new Float64Array(n),
    upBytes: new Int32Array(n),
    z: new Float64Array(n * DRAWS),
    strag: new Float64Array(n * DRAWS),
    jitUp: new Float64Array(n * DRAWS),
    jitDown: new Float64Array(n * DRAWS),
    step: Int32Array.from(stepOf),
  };
  const rr = new Rng(seed, 'requests');
  for (let i = 0; i < n; i++) {
    const site = scenario === 'geo' ? hot[rr.int(hot.length)]! : rr.int(sites.length);
    trace.site[i] = site;
    trace.cx[i] = sites[site]!.x + rr.normal();
    trace.cy[i] = sites[site]!.y + rr.normal();
    const u = rr.next();
    trace.upBytes[i] = u < SIZE_P[0] ? SIZES[0] : u < SIZE_P[0] + SIZE_P[1] ? SIZES[1] : SIZES[2];
    for (let k = 0; k < DRAWS; k++) {
      const j = i * DRAWS + k;
      trace.z[j] = rr.normal();
      trace.strag[j] = rr.next() < STRAGGLER_P ? rr.uniform(5, 20) : 1;
      trace.jitUp[j] = rr.lognormal(JITTER_SIGMA);
      trace.jitDown[j] = rr.lognormal(JITTER_SIGMA);
    }
  }
  const router = sites[0]!;
  return { cfg, nodes, sites, routerX: router.x, routerY: router.y, capacityPerMs, availability, trace, steps, stepMs };
}
