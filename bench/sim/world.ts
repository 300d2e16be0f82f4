/**
 * Fleets, networks, workloads and failure schedules, all drawn from the seed before any policy runs, so
 * every policy sees the same world and the same request trace (common random numbers, paired comparisons).
 *
 * The workload is the project's own four models (docs/routing.md, "The simulator"): the wake-word
 * classifier and VAD from microphone streams, the OCR direction classifier and text detector from
 * camera streams, each with its payload, deadline and a service time per hardware class. Streams are
 * periodic while on, switch on and off, and camera streams burst together on scene changes. Every
 * message crosses the broker; a request's own slowness (its input) is shared by all its attempts,
 * while a node's hiccups are drawn per attempt.
 */
import { Rng } from './rng.ts';

export type HwClass = 'pi4' | 'pi5' | 'orin-nano' | 'orin-agx';
export const HW_CLASSES: readonly HwClass[] = ['pi4', 'pi5', 'orin-nano', 'orin-agx'];

export interface ModelSpec {
  name: string;
  /** Request payload (the input tensor as sent), bytes. */
  bytesUp: number;
  bytesDown: number;
  deadlineMs: number;
  /** Median service time per class, ms. */
  ms: Readonly<Record<HwClass, number>>;
}

/**
 * Service times. Raw CPU figures of these models on one x86 core are in shared FACTS (kws 0.013 ms, vad
 * 0.08, ocr-cls 0.52, ocr-det 13 at 320×320); what an agent measures adds its worker hand-off and
 * tensor decoding. Ratios between classes: a Pi 5 is 2–3× a Pi 4 on CPU work (Raspberry Pi Ltd's Pi 5
 * announcement), we take 2.5×; an Orin AGX runs vision networks about 4× faster than an Orin Nano
 * (NVIDIA's Jetson benchmark tables: 275 against 40 INT8 TOPS, 3–5× on the listed vision models); the
 * Orins run the tiny audio models on their Cortex-A78AE cores, about as fast as a Pi 5's A76. The
 * Orin Nano's GPU against a Pi 5's CPU on the convolutional detector (≈ 12×) is our assumption.
 */
export const MODELS: readonly ModelSpec[] = [
  { name: 'kws', bytesUp: 9_600, bytesDown: 100, deadlineMs: 500, ms: { pi4: 2, pi5: 0.8, 'orin-nano': 0.8, 'orin-agx': 0.6 } },
  { name: 'vad', bytesUp: 2_200, bytesDown: 1_100, deadlineMs: 500, ms: { pi4: 3, pi5: 1.2, 'orin-nano': 1.2, 'orin-agx': 0.9 } },
  { name: 'ocr-cls', bytesUp: 110_600, bytesDown: 100, deadlineMs: 1_000, ms: { pi4: 25, pi5: 10, 'orin-nano': 3, 'orin-agx': 1.2 } },
  {
    name: 'ocr-det',
    bytesUp: 1_228_800,
    bytesDown: 409_600,
    deadlineMs: 3_000,
    ms: { pi4: 900, pi5: 360, 'orin-nano': 30, 'orin-agx': 8 },
  },
];

/** Workers per node: one session per model on the Pis and the Nano, two concurrent runs on an AGX. */
export const WORKERS: Readonly<Record<HwClass, number>> = { pi4: 1, pi5: 1, 'orin-nano': 1, 'orin-agx': 2 };

/** Fleet mixes: shares of [pi4, pi5, orin-nano, orin-agx]. */
export const MIXES: Readonly<Record<string, readonly [number, number, number, number]>> = {
  edge: [0.4, 0.3, 0.2, 0.1],
  'pi-heavy': [0.5, 0.4, 0.075, 0.025],
  homogeneous: [0, 0, 1, 0],
};

export type ScenarioName = 'steady' | 'cold' | 'churn' | 'churn-stress' | 'fail-fast' | 'gray';

export interface SimConfig {
  seed: number;
  scenario: ScenarioName;
  mix: string;
  nodes: number;
  /** Routers sharing the fleet, each serving its own streams. */
  routers: number;
  /** Virtual duration of arrivals, ms. */
  durationMs: number;
  /** Requests arriving before this are not measured. */
  warmupMs: number;
  /** Offered load ρ: expected work over the fleet's capacity. */
  load: number;
}

export const DEFAULT_CONFIG: SimConfig = {
  seed: 1,
  scenario: 'steady',
  mix: 'edge',
  nodes: 40,
  routers: 3,
  durationMs: 60_000,
  warmupMs: 10_000,
  load: 0.8,
};

/** Input slowness, shared by every attempt of a request: lognormal σ and rare heavy inputs. */
export const INPUT_SIGMA = 0.25;
export const INPUT_HEAVY_P = 0.005;
/** Node noise, drawn per attempt: lognormal σ and rare hiccups (GC, thermal throttling, swap). */
export const NODE_SIGMA = 0.15;
export const HICCUP_P = 0.005;
/** One-way delays: the broker hop and the router's link to the broker. */
export const BROKER_HOP_MS = 0.3;
export const MSG_JITTER_SIGMA = 0.2;
export const FAIL_FAST_MS = 5;
export const LOAD_REPORT_MS = 1_000;
export const KEEPALIVE_MS = 3_000;
/** Attempt-specific random draws kept per request (original + hedge + retry). */
export const DRAWS = 3;
/** Registration time of the fleet: agents have been around long before the run starts. */
export const BORN_MS = -120_000;

export interface NodeTruth {
  id: number;
  agentId: string;
  cls: HwClass;
  workers: number;
  /** Per-node speed factor (same SKU, different thermals and firmware). */
  speed: number;
  /** True median service ms per model; the agent announces these (its start-up benchmark). */
  medianMs: number[];
  site: number;
  /** One-way ms from the broker to this node, before jitter (distance, access link, broker hop). */
  oneWayMs: number;
  /** Link rate, bytes per ms. */
  bytesPerMs: number;
  /** Per model: warm at start. */
  warm: boolean[];
  coldLoadMs: number;
  failFast: boolean;
  grayStart: number;
  grayEnd: number;
  grayMult: number;
  /** Churn: alternating [downAt, upAt, …] and the delay before each death is seen (LWT). */
  churn: number[];
  detectDelay: number[];
  reportPhase: number;
}

export interface Trace {
  n: number;
  t: Float64Array;
  model: Uint8Array;
  router: Uint8Array;
  /** Input factor: lognormal × heavy-input multiplier, shared by the request's attempts. */
  input: Float64Array;
  /** Per request × DRAWS: node noise factor (lognormal × hiccup) and message jitter up and down. */
  noise: Float64Array;
  jitUp: Float64Array;
  jitDown: Float64Array;
}

export interface World {
  cfg: SimConfig;
  nodes: NodeTruth[];
  trace: Trace;
  /** Capacity in work units per ms: Σ workers ÷ (the node's mean service time over the request mix). */
  capacityPerMs: number;
  /** ρ of the trace as generated (the arrival process is random; this is what was offered). */
  offeredLoad: number;
  modelShare: number[];
}

/** Shares of requests by model: microphone streams alternate kws and vad, camera streams ocr-det and ocr-cls. */
const MIC_SHARE = 0.6;
const MIC_PERIOD_MS = 100;
const CAM_PERIOD_MS = 250;
const ON_MEAN_MS = 8_000;
const OFF_MEAN_MS = 4_000;
/** Scene changes: a third of the camera streams at 3× rate for 1 s, every 10 s on average. */
const SCENE_MEAN_MS = 10_000;
const SCENE_MS = 1_000;
const SCENE_SHARE = 1 / 3;
const SCENE_MULT = 3;

function inputMean(): number {
  return Math.exp((INPUT_SIGMA * INPUT_SIGMA) / 2) * (1 - INPUT_HEAVY_P + INPUT_HEAVY_P * 6.5);
}
function noiseMean(): number {
  return Math.exp((NODE_SIGMA * NODE_SIGMA) / 2) * (1 - HICCUP_P + HICCUP_P * 12.5);
}

/**
 * Service time of attempt `k` of request `i` on `node`: the node's median for the model × the request's
 * own input factor (the same for every attempt: a hedge cannot escape a heavy input) × the node's noise
 * for this attempt (its own hiccups) × a gray-failure slowdown while one is on.
 */
export function serviceMs(world: World, node: NodeTruth, i: number, k: number, nowMs: number): number {
  const t = world.trace;
  const gray = nowMs >= node.grayStart && nowMs < node.grayEnd ? node.grayMult : 1;
  return node.medianMs[t.model[i]!]! * t.input[i]! * t.noise[i * DRAWS + (k % DRAWS)]! * gray;
}

export function buildWorld(partial: Partial<SimConfig> = {}): World {
  const cfg: SimConfig = { ...DEFAULT_CONFIG, ...partial };
  const { seed, scenario } = cfg;
  const mix = MIXES[cfg.mix];
  if (!mix) throw new Error(`unknown mix ${cfg.mix}`);
  const geo = new Rng(seed, 'sites');
  // Six device sites on a plane (ms of one-way delay); the broker and the routers sit at the centre.
  const sites = Array.from({ length: 6 }, () => ({ d: geo.uniform(1, 15) }));

  const fr = new Rng(seed, 'fleet');
  const counts = mix.map((s) => Math.round(s * cfg.nodes));
  let diff = cfg.nodes - counts.reduce((a, b) => a + b, 0);
  for (let c = counts.length - 1; diff !== 0; c = (c + counts.length - 1) % counts.length) {
    if (mix[c]! === 0) continue;
    counts[c]! += Math.sign(diff);
    diff -= Math.sign(diff);
  }
  const classes: number[] = [];
  counts.forEach((n, c) => {
    for (let i = 0; i < n; i++) classes.push(c);
  });
  for (let i = classes.length - 1; i > 0; i--) {
    const j = fr.int(i + 1);
    [classes[i], classes[j]] = [classes[j]!, classes[i]!];
  }
  const nodes: NodeTruth[] = classes.map((c, id) => {
    const cls = HW_CLASSES[c]!;
    const site = fr.int(sites.length);
    const speed = fr.lognormal(0.12);
    const ethernet = cls === 'orin-agx' || fr.next() < 0.5;
    // Ethernet 100–1000 Mb/s, 0.2–1 ms access; Wi-Fi 20–80 Mb/s, 2–8 ms access.
    const mbps = ethernet ? fr.uniform(100, 1000) : fr.uniform(20, 80);
    const access = ethernet ? fr.uniform(0.2, 1) : fr.uniform(2, 8);
    const gpu = cls === 'orin-nano' || cls === 'orin-agx';
    return {
      id,
      agentId: `sim-${cls}-${id}`,
      cls,
      workers: WORKERS[cls],
      speed,
      medianMs: MODELS.map((m) => m.ms[cls] * speed),
      site,
      oneWayMs: sites[site]!.d + access + BROKER_HOP_MS,
      bytesPerMs: (mbps * 1000) / 8,
      warm: MODELS.map(() => true),
      coldLoadMs: gpu ? fr.uniform(3_000, 10_000) : fr.uniform(1_000, 4_000),
      failFast: false,
      grayStart: Infinity,
      grayEnd: Infinity,
      grayMult: 1,
      churn: [],
      detectDelay: [],
      reportPhase: fr.uniform(0, LOAD_REPORT_MS),
    };
  });

  const sr = new Rng(seed, `scenario-${scenario}`);
  const end = cfg.durationMs + 5_000;
  const pickSome = <T>(pool: T[], count: number): T[] => {
    const copy = pool.slice();
    const out: T[] = [];
    while (out.length < count && copy.length > 0) out.push(copy.splice(sr.int(copy.length), 1)[0]!);
    return out;
  };
  let availability = 1;
  if (scenario === 'gray') {
    for (const n of pickSome(nodes, Math.max(1, Math.round(cfg.nodes * 0.1)))) {
      n.grayStart = cfg.durationMs * sr.uniform(0.2, 0.4);
      n.grayEnd = n.grayStart + cfg.durationMs * sr.uniform(0.3, 0.5);
      n.grayMult = sr.uniform(5, 10);
    }
  } else if (scenario === 'churn' || scenario === 'churn-stress') {
    // Realistic: up ~ Exp(10 min), down ~ Exp(60 s) (reboots, Wi-Fi drops). Stress: up ~ Exp(60 s), down ~ Exp(10 s).
    // A crash loses queue and work in flight; the LWT is seen after U(0, 1.5 × keep-alive).
    const [upMs, downMs] = scenario === 'churn' ? [600_000, 60_000] : [60_000, 10_000];
    for (const n of nodes) {
      let t = sr.exp(upMs);
      while (t < end) {
        const down = sr.exp(downMs);
        n.churn.push(t, t + down);
        n.detectDelay.push(sr.uniform(0, 1.5 * KEEPALIVE_MS));
        t += down + sr.exp(upMs);
      }
    }
    availability = upMs / (upMs + downMs);
  } else if (scenario === 'fail-fast') {
    // 5 % of nodes (from the GPU classes, where it hurts) answer errors in 5 ms while reporting an empty queue.
    const gpus = nodes.filter((n) => n.cls === 'orin-nano' || n.cls === 'orin-agx');
    for (const n of pickSome(gpus, Math.max(1, Math.round(cfg.nodes * 0.05)))) n.failFast = true;
  } else if (scenario === 'cold') {
    // 30 % of (node, model) pairs start cold: the first request there waits for the model to load.
    const pairs: [NodeTruth, number][] = [];
    for (const n of nodes) for (let m = 0; m < MODELS.length; m++) pairs.push([n, m]);
    for (const [n, m] of pickSome(pairs, Math.round(pairs.length * 0.3))) n.warm[m] = false;
  }

  // Request mix by count, and capacity: each node serving the mix in proportion.
  const modelShare = [MIC_SHARE * 0.6, MIC_SHARE * 0.4, (1 - MIC_SHARE) * 0.5, (1 - MIC_SHARE) * 0.5];
  const workMean = inputMean() * noiseMean();
  let capacityPerMs = 0;
  for (const n of nodes) {
    if (n.failFast) continue;
    const meanMs = n.medianMs.reduce((s, ms, m) => s + modelShare[m]! * ms, 0) * workMean;
    capacityPerMs += n.workers / meanMs;
  }
  capacityPerMs *= availability;

  // Streams: enough of them that the mean rate is ρ × capacity (requests per ms).
  const ratePerMs = cfg.load * capacityPerMs;
  const onShare = ON_MEAN_MS / (ON_MEAN_MS + OFF_MEAN_MS);
  const sceneBoost = 1 + (SCENE_SHARE * (SCENE_MULT - 1) * SCENE_MS) / SCENE_MEAN_MS;
  const micStreams = Math.max(1, Math.round((MIC_SHARE * ratePerMs * MIC_PERIOD_MS) / onShare));
  const camStreams = Math.max(1, Math.round(((1 - MIC_SHARE) * ratePerMs * CAM_PERIOD_MS) / (onShare * sceneBoost)));
  const tr = new Rng(seed, 'trace');
  const scenes: number[] = [];
  for (let t = tr.exp(SCENE_MEAN_MS); t < cfg.durationMs; t += tr.exp(SCENE_MEAN_MS)) scenes.push(t);
  const events: { t: number; model: number; router: number }[] = [];
  const stream = (s: number, cam: boolean) => {
    const period = cam ? CAM_PERIOD_MS : MIC_PERIOD_MS;
    const router = s % cfg.routers;
    const inScenes = cam && tr.next() < SCENE_SHARE;
    let on = tr.next() < onShare;
    let t = 0;
    let k = tr.int(2);
    while (t < cfg.durationMs) {
      const span = tr.exp(on ? ON_MEAN_MS : OFF_MEAN_MS);
      if (on) {
        let x = t + tr.uniform(0, period);
        while (x < Math.min(t + span, cfg.durationMs)) {
          events.push({ t: x, model: cam ? 2 + (k++ % 2 === 0 ? 1 : 0) : k++ % 5 < 3 ? 0 : 1, router });
          const burst = inScenes && scenes.some((sc) => x >= sc && x < sc + SCENE_MS);
          x += (period / (burst ? SCENE_MULT : 1)) * tr.uniform(0.95, 1.05);
        }
      }
      t += span;
      on = !on;
    }
  };
  for (let s = 0; s < micStreams; s++) stream(s, false);
  for (let s = 0; s < camStreams; s++) stream(micStreams + s, true);
  events.sort((a, b) => a.t - b.t);

  const n = events.length;
  const trace: Trace = {
    n,
    t: Float64Array.from(events, (e) => e.t),
    model: Uint8Array.from(events, (e) => e.model),
    router: Uint8Array.from(events, (e) => e.router),
    input: new Float64Array(n),
    noise: new Float64Array(n * DRAWS),
    jitUp: new Float64Array(n * DRAWS),
    jitDown: new Float64Array(n * DRAWS),
  };
  const rr = new Rng(seed, 'requests');
  for (let i = 0; i < n; i++) {
    trace.input[i] = rr.lognormal(INPUT_SIGMA) * (rr.next() < INPUT_HEAVY_P ? rr.uniform(3, 10) : 1);
    for (let k = 0; k < DRAWS; k++) {
      const j = i * DRAWS + k;
      trace.noise[j] = rr.lognormal(NODE_SIGMA) * (rr.next() < HICCUP_P ? rr.uniform(5, 20) : 1);
      trace.jitUp[j] = rr.lognormal(MSG_JITTER_SIGMA);
      trace.jitDown[j] = rr.lognormal(MSG_JITTER_SIGMA);
    }
  }
  const offeredLoad = n / cfg.durationMs / capacityPerMs;
  return { cfg, nodes, trace, capacityPerMs, offeredLoad, modelShare };
}
