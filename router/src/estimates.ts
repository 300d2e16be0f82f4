/**
 * The router's registry: per agent and per (agent, model), the estimates that expected completion time is
 * built from (docs/routing.md, "How the router decides"). Pure: no sockets, no timers; every update takes `nowMs`
 * (any monotonic ms clock, the same one selection uses) and randomness comes from the registry's seeded PRNG.
 */

import { boundQueueClaim, fitTimesToAttempt, LatencyQuantiles, maxHeldRequests, mulberry32, type Rng } from '@edge-mesh/client';
import type { AgentLoad, AgentStatus } from '@edge-mesh/protocol';
import { addNetSample, MIN_RTT_MS, type NetFit, newNetFit } from './netfit.ts';
import type { StallSource } from './stalls.ts';
import { applyVivaldiSample, isCoordKnown, newCoord, type VivaldiCoord, vivaldiDistanceMs } from './vivaldi.ts';

export { mulberry32, type Rng };

export interface RouterConfig {
  /** d: candidates compared per pick (default 4: on a mixed fleet two draws often miss the fast nodes; docs/routing.md). */
  choices: number;
  /** K: size of the nearby pool sampled from (it grows while the pool lacks free slots). */
  poolSize: number;
  /** ε: probability that one candidate is a random eligible node outside the pool. */
  exploreRate: number;
  /** W: active routers sharing the fleet (C3 concurrency compensation). */
  routers: number;
  serviceTauMs: number;
  rttTauMs: number;
  kappaTauMs: number;
  /** Estimates with no fresh samples drift back to the agent's own figure with this time constant. */
  priorDecayTauMs: number;
  pFailAlpha: number;
  /** p_fail decays to 0 with this time constant while no attempts report, so a recovered node is retried. */
  pFailTauMs: number;
  kappaAlpha: number;
  poolRefreshMs: number;
  /** An agent not heard from (status, load or reply) for this long counts as down. */
  heartbeatTimeoutMs: number;
  /** Nodes whose stats are older than this are explored first. */
  staleStatsMs: number;
  consecutiveFailuresToEject: number;
  ejectBaseMs: number;
  ejectMaxMs: number;
  ejectJitter: number;
  maxEjectedFraction: number;
  /** Below this eligible fraction of live nodes, ignore ejection and probation (Envoy panic mode). */
  panicThreshold: number;
  slowStartWindowMs: number;
  slowStartAggression: number;
  slowStartMinWeight: number;
  /** b in T_wait · ((ahead + 1)/c)^(b − 1); 1 = shortest expected delay. */
  queueExponent: number;
  probationKappa: number;
  probationAfterMs: number;
  srMinHosts: number;
  srMinRequests: number;
  srStdevFactor: number;
  /** Per-try timeout with no latency history for the node: clamp(factor × predicted, min, time left). */
  perTryTimeoutFactor: number;
  minPerTryTimeoutMs: number;
  /** With a history: max(quantile factor × the node's p99, 2 × predicted), at least this floor (ms). */
  perTryQuantileFactor: number;
  minQuantileTimeoutMs: number;
  /** A load report or reply claim older than this no longer counts toward fleet utilisation (ms). */
  claimStaleMs: number;
  /** No agent weighs more than this many worker slots in fleet utilisation. */
  maxUtilizationSlots: number;
  defaultRttMs: number;
  sameSiteRttMs: number;
  crossSiteRttMs: number;
  /** Transfer rate prior, bytes/ms (1,250 = 10 Mb/s). */
  defaultBytesPerMs: number;
  /** Payload size at which the prior rate weighs as much as one reply in the RTT and rate fit (netfit.ts). */
  netRefBytes: number;
  defaultColdLoadMs: number;
  /** The router's own site label, for the site-label RTT fallback. */
  site: string | undefined;
  seed: number;
}

export type RouterOptions = Partial<RouterConfig>;

export function resolveConfig({
  choices = 4,
  poolSize = 16,
  exploreRate = 0.03,
  routers = 1,
  serviceTauMs = 10_000,
  rttTauMs = 30_000,
  kappaTauMs = 30_000,
  priorDecayTauMs = 30_000,
  pFailAlpha = 0.1,
  pFailTauMs = 30_000,
  kappaAlpha = 0.2,
  poolRefreshMs = 1_000,
  heartbeatTimeoutMs = 2_000,
  staleStatsMs = 30_000,
  consecutiveFailuresToEject = 5,
  ejectBaseMs = 30_000,
  ejectMaxMs = 300_000,
  ejectJitter = 0.1,
  maxEjectedFraction = 0.5,
  panicThreshold = 0.5,
  slowStartWindowMs = 30_000,
  slowStartAggression = 1,
  slowStartMinWeight = 0.1,
  queueExponent = 1,
  probationKappa = 3,
  probationAfterMs = 10_000,
  srMinHosts = 5,
  srMinRequests = 100,
  srStdevFactor = 1.9,
  perTryTimeoutFactor = 5,
  minPerTryTimeoutMs = 250,
  perTryQuantileFactor = 1.5,
  minQuantileTimeoutMs = 50,
  claimStaleMs = 5_000,
  maxUtilizationSlots = 16,
  defaultRttMs = 20,
  sameSiteRttMs = 4,
  crossSiteRttMs = 40,
  defaultBytesPerMs = 1_250,
  netRefBytes = 8_192,
  defaultColdLoadMs = 5_000,
  site = undefined,
  seed = 1,
}: RouterOptions = {}): Readonly<RouterConfig> {
  return Object.freeze({
    choices,
    poolSize,
    exploreRate,
    routers,
    serviceTauMs,
    rttTauMs,
    kappaTauMs,
    priorDecayTauMs,
    pFailAlpha,
    pFailTauMs,
    kappaAlpha,
    poolRefreshMs,
    heartbeatTimeoutMs,
    staleStatsMs,
    consecutiveFailuresToEject,
    ejectBaseMs,
    ejectMaxMs,
    ejectJitter,
    maxEjectedFraction,
    panicThreshold,
    slowStartWindowMs,
    slowStartAggression,
    slowStartMinWeight,
    queueExponent,
    probationKappa,
    probationAfterMs,
    srMinHosts,
    srMinRequests,
    srStdevFactor,
    perTryTimeoutFactor,
    minPerTryTimeoutMs,
    perTryQuantileFactor,
    minQuantileTimeoutMs,
    claimStaleMs,
    maxUtilizationSlots,
    defaultRttMs,
    sameSiteRttMs,
    crossSiteRttMs,
    defaultBytesPerMs,
    netRefBytes,
    defaultColdLoadMs,
    site,
    seed,
  });
}

const E2E_RING = 256;

/** Shared per (hardware class, model): cold-load cost and the e2e latencies the hedge delay's p95 comes from. */
export interface ClassModelStats {
  readonly hardwareClass: string;
  readonly model: string;
  /** EWMA of reported load_ms; NaN until one is seen. */
  coldLoadMs: number;
  e2e: Float64Array;
  e2eCount: number;
  p95Cache: number;
  p95Dirty: boolean;
}

export interface AgentEntry {
  readonly agentId: string;
  readonly registry: Registry;
  hardwareClass: string;
  site: string | undefined;
  coord: VivaldiCoord;
  slots: number;
  /** Queued requests per model before MESH_BUSY, from the status; bounds what a queue claim may say. */
  queueLimit: number | undefined;
  up: boolean;
  session: string | undefined;
  lastSeenMs: number;
  firstSeenMs: number;
  /** Last reported requests in flight (queued + executing): a load report's or a reply's, bounded (claims.ts). */
  reportedRif: number;
  /**
   * The same queue as work, ms: Σ over models of (queued + in flight) × service time, from a load
   * report that breaks the queue down per model; NaN when only a count is known (then rif × S is used).
   * A 40 ms detection job ahead delays a 0.2 ms keyword request by 40 ms, not by 0.2.
   */
  reportedWorkMs: number;
  reportedAtMs: number;
  /** This router's outstanding attempts to the agent. */
  outstanding: number;
  /** Measured network RTT (the fit's intercept); NaN until measured. */
  rttMs: number;
  rttAtMs: number;
  /** Transfer rate, bytes/ms: the fit's, or the prior until measured. */
  bytesPerMs: number;
  bwAtMs: number;
  /** The joint RTT and rate fit (netfit.ts); undefined until the first reply. */
  net: NetFit | undefined;
  pFail: number;
  pFailAtMs: number;
  kappa: number;
  kappaAtMs: number;
  kappaHighSinceMs: number;
  consecutiveFailures: number;
  ejectedUntilMs: number;
  ejectionCount: number;
  lastEjectedAtMs: number;
  /** Start of the current slow-start ramp (first sighting or return from ejection). */
  slowStartFromMs: number;
  /** Attempts in the current success-rate window. */
  windowOk: number;
  windowFailed: number;
  readonly models: Map<string, ModelEntry>;
}

export interface ModelEntry {
  readonly agent: AgentEntry;
  readonly model: string;
  /** Time-decayed EWMA of exec_ms. */
  serviceMs: number;
  serviceAtMs: number;
  /** The agent's own figure (status latencyMs, then load serviceMs): seed and decay target. */
  priorServiceMs: number;
  /** Parallel slots for this model; undefined = the agent's. */
  slots: number | undefined;
  warm: boolean;
  /** While loading, other picks treat it as warm with this remaining ETA. */
  loadingUntilMs: number;
  /** When the current load began, as reported (0: not loading). */
  loadingSinceMs: number;
  /** Known cold-load cost of this (agent, model); NaN = use the class figure. */
  coldLoadMs: number;
  /** The load time its replies last reported (fitted to the attempt); NaN until one did. */
  measuredLoadMs: number;
  priceMicros: number;
  readonly stats: ClassModelStats;
  /** This node's own attempt latencies for the model (e2e): per-try timeout, hedge delay, the cap on claimed queues. */
  readonly latency: LatencyQuantiles;
}

/** The nearby pool for one requester site, with cumulative capacity weights for O(log K) sampling (select.ts). */
export interface PoolCache {
  builtVersion: number;
  builtAtMs: number;
  pool: ModelEntry[];
  cumulativeWeight: Float64Array;
  totalWeight: number;
  inPool: Set<ModelEntry>;
  /** Unloaded ECT of the best pool node and the pool median (ECT_alt of the failure term). */
  minEct0Ms: number;
  medianEct0Ms: number;
  eligibleCount: number;
  panic: boolean;
}

/** Every (agent, model) entry serving one model, and the pools built from them per requester site. */
export interface ModelPool {
  readonly model: string;
  readonly entries: ModelEntry[];
  /** Bumped whenever membership or eligibility of an entry changes; pools rebuild on the next pick. */
  version: number;
  readonly caches: Map<string, PoolCache>;
}

export interface Registry {
  readonly config: Readonly<RouterConfig>;
  readonly agents: Map<string, AgentEntry>;
  readonly pools: Map<string, ModelPool>;
  readonly classStats: Map<string, ClassModelStats>;
  readonly classMembers: Map<string, Set<AgentEntry>>;
  /** The router's own Vivaldi coordinate. */
  readonly selfCoord: VivaldiCoord;
  readonly rng: Rng;
  /**
   * The router's own event-loop stalls (./stalls.ts), taken out of each reply's round trip before it is learnt from.
   * The live router sets it; the simulator, on a virtual clock, does not.
   */
  stalls?: StallSource;
}

export function createRegistry(options: RouterOptions = {}): Registry {
  const config = resolveConfig(options);
  return {
    config,
    agents: new Map(),
    pools: new Map(),
    classStats: new Map(),
    classMembers: new Map(),
    selfCoord: newCoord(),
    rng: mulberry32(config.seed),
  };
}

/** w = e^(−Δt/τ): the weight the old value keeps after Δt (Finagle's time-decayed EWMA). */
export function decayWeight(elapsedMs: number, tauMs: number): number {
  return elapsedMs <= 0 ? 1 : Math.exp(-elapsedMs / tauMs);
}

/** new = w · old + (1 − w) · sample, w = e^(−Δt/τ). */
export function decayedEwma(old: number, oldAtMs: number, sample: number, nowMs: number, tauMs: number): number {
  const w = decayWeight(nowMs - oldAtMs, tauMs);
  return w * old + (1 - w) * sample;
}

// ---------------------------------------------------------------------------------------------------------
// Reading estimates

/** Service time now: the EWMA, drifting back to the agent's own figure while no samples arrive. */
export function serviceMsAt(entry: ModelEntry, nowMs: number): number {
  const w = decayWeight(nowMs - entry.serviceAtMs, entry.agent.registry.config.priorDecayTauMs);
  return entry.priorServiceMs + (entry.serviceMs - entry.priorServiceMs) * w;
}

/** p_fail now: the attempt-failure EWMA (α = 0.1), decaying to 0 with τ = pFailTauMs between attempts. */
export function pFailAt(agent: AgentEntry, nowMs: number): number {
  return agent.pFail * decayWeight(nowMs - agent.pFailAtMs, agent.registry.config.pFailTauMs);
}

/** κ now: decays to 1 with τ_κ. */
export function kappaAt(agent: AgentEntry, nowMs: number): number {
  return 1 + (agent.kappa - 1) * decayWeight(nowMs - agent.kappaAtMs, agent.registry.config.kappaTauMs);
}

/**
 * A model reported loading: when it will be ready. The agent's ETA is a claim; where the load time of
 * the model there (or on its hardware class) was measured from replies, the ETA cannot promise it
 * sooner than that measured time counted from when the loading began: claiming `loading, ready in
 * 0 ms` over and over earns what claiming warm does, and no more than the agent's measured load allows.
 * Without a claim, the known cold-load cost from now.
 */
export function loadingReadyAt(entry: ModelEntry, claimedEtaMs: number | undefined, nowMs: number): number {
  if (entry.loadingSinceMs === 0) entry.loadingSinceMs = nowMs;
  if (claimedEtaMs === undefined) return nowMs + coldLoadMsOf(entry);
  const measured = !Number.isNaN(entry.measuredLoadMs) ? entry.measuredLoadMs : entry.stats.coldLoadMs;
  const floor = Number.isNaN(measured) ? nowMs : entry.loadingSinceMs + measured;
  return Math.max(nowMs + claimedEtaMs, floor);
}

function setModelState(entry: ModelEntry, state: 'warm' | 'loading' | 'cold', etaMs: number | undefined, nowMs: number): void {
  entry.warm = state === 'warm';
  if (state === 'loading') entry.loadingUntilMs = loadingReadyAt(entry, etaMs, nowMs);
  else {
    entry.loadingUntilMs = 0;
    entry.loadingSinceMs = 0;
  }
}

export function coldLoadMsOf(entry: ModelEntry): number {
  if (!Number.isNaN(entry.coldLoadMs)) return entry.coldLoadMs;
  if (!Number.isNaN(entry.stats.coldLoadMs)) return entry.stats.coldLoadMs;
  return entry.agent.registry.config.defaultColdLoadMs;
}

/** Slow-start multiplier on the sampling weight (Envoy): max(min, (t/window)^(1/aggression)). */
export function slowStartFactor(agent: AgentEntry, nowMs: number): number {
  const { slowStartWindowMs, slowStartAggression, slowStartMinWeight } = agent.registry.config;
  const t = nowMs - agent.slowStartFromMs;
  if (t >= slowStartWindowMs) return 1;
  if (t <= 0) return slowStartMinWeight;
  return Math.max(slowStartMinWeight, (t / slowStartWindowMs) ** (1 / slowStartAggression));
}

export function isEjected(agent: AgentEntry, nowMs: number): boolean {
  return agent.ejectedUntilMs > nowMs;
}

/** Latency probation (Dean): κ above its limit for longer than probationAfterMs. */
export function isOnProbation(agent: AgentEntry, nowMs: number): boolean {
  const c = agent.registry.config;
  return (
    !Number.isNaN(agent.kappaHighSinceMs) && nowMs - agent.kappaHighSinceMs > c.probationAfterMs && kappaAt(agent, nowMs) > c.probationKappa
  );
}

export function isAlive(agent: AgentEntry, nowMs: number): boolean {
  return agent.up && nowMs - agent.lastSeenMs <= agent.registry.config.heartbeatTimeoutMs;
}

/**
 * RTT to an agent from what is known without measuring it: Vivaldi coordinates, else site labels, else the
 * default. The prior of the measured RTT, and what selection uses until there is one.
 */
export function priorRttMs(agent: AgentEntry): number {
  const c = agent.registry.config;
  const self = agent.registry.selfCoord;
  if (isCoordKnown(agent.coord) && isCoordKnown(self)) return vivaldiDistanceMs(self, agent.coord);
  if (c.site !== undefined && agent.site !== undefined) return c.site === agent.site ? c.sameSiteRttMs : c.crossSiteRttMs;
  return c.defaultRttMs;
}

/** 95th percentile of recent e2e latency for the entry's (class, model); NaN with fewer than 20 samples. */
export function p95E2eMs(stats: ClassModelStats): number {
  const n = Math.min(stats.e2eCount, E2E_RING);
  if (n < 20) return Number.NaN;
  if (stats.p95Dirty) {
    const sorted = stats.e2e.slice(0, n).sort();
    stats.p95Cache = sorted[Math.min(n - 1, Math.ceil(0.95 * n) - 1)]!;
    stats.p95Dirty = false;
  }
  return stats.p95Cache;
}

// ---------------------------------------------------------------------------------------------------------
// Updates

export interface AgentModelDescriptor {
  model: string;
  /** The agent's measured latency for the model, ms (status latencyMs, self-benchmark or class table). */
  serviceMs: number;
  /** Loaded now; default true. */
  warm?: boolean;
  coldLoadMs?: number;
  slots?: number;
  priceMicros?: number;
}

/** What a router knows of an agent without the wire message (the simulator registers agents this way). */
export interface AgentDescriptor {
  agentId: string;
  hardwareClass: string;
  site?: string;
  /** Agent-reported or ground-truth coordinate, when one exists. */
  coord?: VivaldiCoord;
  slots?: number;
  /** Queued requests per model the agent accepts (its status); bounds its queue claims. */
  queueLimit?: number;
  models: AgentModelDescriptor[];
  session?: string;
}

/**
 * Distinct model names the registry tracks per agent: a status lists at most 256 models (protocol/src/schemas.ts,
 * AgentStatusSchema), and a descriptor built another way (the simulator's, a library caller's) is held to the same
 * bound, so one agent accounts for at most this many pools and class stats however its names change.
 */
export const MAX_MODELS_PER_AGENT = 256;

const classStatsKey = (hardwareClass: string, model: string) => `${hardwareClass}\u0000${model}`;

function classStatsFor(reg: Registry, hardwareClass: string, model: string): ClassModelStats {
  const key = classStatsKey(hardwareClass, model);
  let s = reg.classStats.get(key);
  if (!s) {
    s = {
      hardwareClass,
      model,
      coldLoadMs: Number.NaN,
      e2e: new Float64Array(E2E_RING),
      e2eCount: 0,
      p95Cache: Number.NaN,
      p95Dirty: true,
    };
    reg.classStats.set(key, s);
  }
  return s;
}

function poolFor(reg: Registry, model: string): ModelPool {
  let p = reg.pools.get(model);
  if (!p) {
    p = { model, entries: [], version: 1, caches: new Map() };
    reg.pools.set(model, p);
  }
  return p;
}

/**
 * Forgets class stats no entry of `pool` uses any more. Only entries of the stats' own model can hold them, and
 * those are all in its pool; without this, an agent that renames its models or its hardware class on every status
 * would leave a (class, model) behind each time.
 */
function releaseClassStats(reg: Registry, pool: ModelPool | undefined, stats: ClassModelStats): void {
  if (pool?.entries.some((e) => e.stats === stats)) return;
  const key = classStatsKey(stats.hardwareClass, stats.model);
  if (reg.classStats.get(key) === stats) reg.classStats.delete(key);
}

/** Takes an entry out of its model's pool; a pool left empty goes, with the class stats nothing else uses. */
function dropEntry(reg: Registry, e: ModelEntry): void {
  const p = reg.pools.get(e.model);
  if (p) {
    const i = p.entries.indexOf(e);
    if (i >= 0) p.entries.splice(i, 1);
    p.version++;
    if (p.entries.length === 0) reg.pools.delete(e.model);
  }
  releaseClassStats(reg, p, e.stats);
}

/** Marks every pool the agent belongs to for a rebuild (membership, health or ejection changed). */
export function invalidateAgent(agent: AgentEntry): void {
  for (const m of agent.models.keys()) {
    const p = agent.registry.pools.get(m);
    if (p) p.version++;
  }
}

function setClass(reg: Registry, agent: AgentEntry, hardwareClass: string): void {
  const old = reg.classMembers.get(agent.hardwareClass);
  old?.delete(agent);
  // The class comes from the agent's status (its arch): an empty set would stay behind for every name it tried.
  if (old?.size === 0) reg.classMembers.delete(agent.hardwareClass);
  agent.hardwareClass = hardwareClass;
  let members = reg.classMembers.get(hardwareClass);
  if (!members) {
    members = new Set();
    reg.classMembers.set(hardwareClass, members);
  }
  members.add(agent);
}

/** Adds or refreshes an agent and its models. New agents start a slow-start ramp. */
export function upsertAgent(reg: Registry, d: AgentDescriptor, nowMs: number): AgentEntry {
  let agent = reg.agents.get(d.agentId);
  const restarted = agent !== undefined && d.session !== undefined && agent.session !== undefined && agent.session !== d.session;
  if (!agent) {
    agent = {
      agentId: d.agentId,
      registry: reg,
      hardwareClass: '',
      site: d.site,
      coord: d.coord ? { ...d.coord } : newCoord(),
      slots: Math.max(1, d.slots ?? 1),
      queueLimit: d.queueLimit,
      up: true,
      session: d.session,
      lastSeenMs: nowMs,
      firstSeenMs: nowMs,
      reportedRif: 0,
      reportedWorkMs: Number.NaN,
      reportedAtMs: nowMs,
      outstanding: 0,
      rttMs: Number.NaN,
      rttAtMs: nowMs,
      bytesPerMs: reg.config.defaultBytesPerMs,
      bwAtMs: nowMs,
      net: undefined,
      pFail: 0,
      pFailAtMs: nowMs,
      kappa: 1,
      kappaAtMs: nowMs,
      kappaHighSinceMs: Number.NaN,
      consecutiveFailures: 0,
      ejectedUntilMs: 0,
      ejectionCount: 0,
      lastEjectedAtMs: Number.NEGATIVE_INFINITY,
      slowStartFromMs: nowMs,
      windowOk: 0,
      windowFailed: 0,
      models: new Map(),
    };
    reg.agents.set(d.agentId, agent);
  }
  if (agent.hardwareClass !== d.hardwareClass) setClass(reg, agent, d.hardwareClass);
  if (d.site !== undefined) agent.site = d.site;
  if (d.coord) agent.coord = { ...d.coord };
  if (d.slots !== undefined) agent.slots = Math.max(1, d.slots);
  if (d.queueLimit !== undefined) agent.queueLimit = d.queueLimit;
  if (restarted) {
    // A new process: its queue and our outstanding attempts to the old one are gone.
    agent.reportedRif = 0;
    agent.reportedWorkMs = Number.NaN;
    agent.outstanding = 0;
    agent.slowStartFromMs = nowMs;
  }
  if (d.session !== undefined) agent.session = d.session;
  if (!agent.up) agent.slowStartFromMs = nowMs;
  agent.up = true;
  agent.lastSeenMs = nowMs;

  // The models tracked for the agent: the first MAX_MODELS_PER_AGENT distinct names (a name given twice counts once,
  // its last descriptor wins). Models it no longer names leave first, with any pool or class stats only they used.
  const wanted = new Map<string, AgentModelDescriptor>();
  for (const m of d.models) if (wanted.has(m.model) || wanted.size < MAX_MODELS_PER_AGENT) wanted.set(m.model, m);
  for (const [name, e] of agent.models) {
    if (wanted.has(name)) continue;
    agent.models.delete(name);
    dropEntry(reg, e);
  }
  for (const m of wanted.values()) {
    let e = agent.models.get(m.model);
    if (!e) {
      e = {
        agent,
        model: m.model,
        serviceMs: m.serviceMs,
        serviceAtMs: nowMs,
        priorServiceMs: m.serviceMs,
        slots: m.slots,
        warm: m.warm ?? true,
        loadingUntilMs: 0,
        loadingSinceMs: 0,
        coldLoadMs: m.coldLoadMs ?? Number.NaN,
        measuredLoadMs: Number.NaN,
        priceMicros: m.priceMicros ?? 0,
        stats: classStatsFor(reg, agent.hardwareClass, m.model),
        latency: new LatencyQuantiles(),
      };
      agent.models.set(m.model, e);
      poolFor(reg, m.model).entries.push(e);
    } else {
      e.priorServiceMs = m.serviceMs;
      if (m.warm !== undefined) e.warm = m.warm;
      if (m.coldLoadMs !== undefined) e.coldLoadMs = m.coldLoadMs;
      if (m.slots !== undefined) e.slots = m.slots;
      if (m.priceMicros !== undefined) e.priceMicros = m.priceMicros;
      if (e.stats.hardwareClass !== agent.hardwareClass) {
        const old = e.stats;
        (e as { stats: ClassModelStats }).stats = classStatsFor(reg, agent.hardwareClass, m.model);
        releaseClassStats(reg, reg.pools.get(m.model), old);
      }
    }
  }
  invalidateAgent(agent);
  return agent;
}

/** Hardware class from the status: an explicit label wins, then the best execution provider, then CPU arch. */
export function hardwareClassOf(status: AgentStatus): string {
  const p = (status.providers ?? []).map((x) => x.toLowerCase());
  if (p.some((x) => x.includes('tensorrt'))) return 'gpu-trt';
  if (p.some((x) => x.includes('cuda'))) return 'gpu-cuda';
  return `cpu-${status.hardware?.arch ?? 'unknown'}`;
}

export interface StatusExtras {
  hardwareClass?: string;
  site?: string;
  coord?: VivaldiCoord;
}

/** Retained status: birth, capabilities and measured latency per model; `offline` (LWT) marks the agent down. */
export function onStatus(reg: Registry, status: AgentStatus, nowMs: number, extras: StatusExtras = {}): AgentEntry | undefined {
  if (status.state !== 'online') {
    const agent = reg.agents.get(status.agent);
    if (agent) markDown(agent, nowMs);
    return agent;
  }
  return upsertAgent(
    reg,
    {
      agentId: status.agent,
      hardwareClass: extras.hardwareClass ?? hardwareClassOf(status),
      site: extras.site,
      coord: extras.coord,
      slots: status.workers,
      ...(status.queueLimit !== undefined ? { queueLimit: status.queueLimit } : {}),
      session: status.session,
      models: (status.models ?? []).map((m) => ({ model: m.name, serviceMs: m.latencyMs, warm: true, priceMicros: m.priceMicros })),
    },
    nowMs,
  );
}

/** Marks an agent down (LWT, missed heartbeats, connection failure); it is skipped until it is heard from again. */
export function markDown(agent: AgentEntry, _nowMs: number): void {
  if (!agent.up) return;
  agent.up = false;
  agent.outstanding = 0;
  invalidateAgent(agent);
}

/**
 * An agent's queue as it claims it: requests held and, when given, that as work in ms. Bounded first
 * (client/src/claims.ts): the count by what its status says it can hold, the work by the service times
 * the router measured there. Used for the queue a reply or an error reply carries, and by the simulator.
 */
export function onQueueClaim(reg: Registry, agentId: string, rif: number, workMs: number | undefined, nowMs: number): void {
  const agent = reg.agents.get(agentId);
  if (!agent) return;
  applyQueueClaim(agent, rif, workMs, nowMs);
  touch(agent, nowMs);
}

/** A queue depth with no breakdown (a simulator's heartbeat): onQueueClaim without work. */
export function onQueueReport(reg: Registry, agentId: string, rif: number, nowMs: number): void {
  onQueueClaim(reg, agentId, rif, undefined, nowMs);
}

function applyQueueClaim(agent: AgentEntry, rif: number, workMs: number | undefined, nowMs: number): void {
  let minServiceMs = Number.POSITIVE_INFINITY;
  let maxServiceMs = 0;
  for (const e of agent.models.values()) {
    const s = serviceMsAt(e, nowMs);
    if (s < minServiceMs) minServiceMs = s;
    if (s > maxServiceMs) maxServiceMs = s;
  }
  const known = agent.models.size > 0;
  const bounded = boundQueueClaim(rif, workMs, {
    maxRif: maxHeldRequests(agent.slots, agent.queueLimit, agent.models.size),
    ...(known ? { minServiceMs, maxServiceMs } : {}),
  });
  agent.reportedRif = bounded.rif;
  agent.reportedWorkMs = bounded.workMs;
  agent.reportedAtMs = nowMs;
}

function touch(agent: AgentEntry, nowMs: number): void {
  const wasAlive = isAlive(agent, nowMs);
  agent.lastSeenMs = Math.max(agent.lastSeenMs, nowMs);
  if (!wasAlive) invalidateAgent(agent);
}

/**
 * Load heartbeat: queue = queued + inFlight, as work Σ (queued + inFlight) × that model's service time,
 * bounded like a reply's claim; slots = workers; per-model serviceMs refreshes the prior, and a model
 * reported loading or cold is no longer counted as warm.
 */
export function onLoad(reg: Registry, load: AgentLoad, nowMs: number): void {
  const agent = reg.agents.get(load.agent);
  if (!agent?.up) return;
  if (load.workers > 0) agent.slots = load.workers;
  let workMs = 0;
  for (const [model, ml] of Object.entries(load.models)) {
    const e = agent.models.get(model);
    if (e && ml.serviceMs > 0) e.priorServiceMs = ml.serviceMs;
    workMs += (ml.queued + ml.inFlight) * (ml.serviceMs > 0 ? ml.serviceMs : e ? serviceMsAt(e, nowMs) : 0);
    if (e && ml.state !== undefined) setModelState(e, ml.state, ml.etaMs, nowMs);
  }
  applyQueueClaim(agent, load.queued + load.inFlight, workMs, nowMs);
  touch(agent, nowMs);
}

/** A request was sent to the agent: this router's outstanding count goes up at once (Prequal "consume"). */
export function onSend(reg: Registry, agentId: string, _model: string, _nowMs: number): void {
  const agent = reg.agents.get(agentId);
  if (agent) agent.outstanding++;
}

/** An attempt ended without a reply we will wait for (we cancelled the hedge loser). */
export function onCancel(reg: Registry, agentId: string, _nowMs: number): void {
  const agent = reg.agents.get(agentId);
  if (agent && agent.outstanding > 0) agent.outstanding--;
}

export interface ReplySample {
  /** Time the request waited in the agent's queue. */
  queueMs: number;
  /** Time the runtime computed. */
  execMs: number;
  /**
   * Network part: (reply arrival − send) − (queue + exec + load). If absent it is derived from e2eMs.
   * It contains the transfer of `bytes`.
   */
  rttMs?: number;
  /** Payload bytes moved (request + reply). */
  bytes?: number;
  /** Reported when this request made the agent load the model. */
  loadMs?: number;
  /** App-visible time of this attempt, for the hedge p95 and κ. */
  e2eMs?: number;
  /** The ECT selection predicted for this attempt (Selection.predictedMs). */
  predictedMs?: number;
  /** Piggybacked requests in flight at the agent after this one. */
  rif?: number;
  /** The same queue as work, ms (the reply's `workMs`). */
  workMs?: number;
}

/** A successful reply: learns service time, network RTT and rate, Vivaldi coordinates, cold cost, κ. */
export function onReply(reg: Registry, agentId: string, model: string, reported: ReplySample, nowMs: number): void {
  const agent = reg.agents.get(agentId);
  if (!agent) return;
  const c = reg.config;
  if (agent.outstanding > 0) agent.outstanding--;
  const e = agent.models.get(model);
  // The router's own stall during the attempt is not the agent's latency (docs/routing.md, "The router's own stalls").
  const stalled = reported.e2eMs !== undefined && reg.stalls !== undefined ? reg.stalls.stalledMs(nowMs - reported.e2eMs, nowMs) : 0;
  const sample = stalled > 0 ? { ...reported, e2eMs: Math.max(0, (reported.e2eMs ?? 0) - stalled) } : reported;
  // The agent's times are claims: together they cannot exceed the attempt the router timed (claims.ts).
  const { queueMs, execMs, loadMs } = fitTimesToAttempt(sample, sample.e2eMs);
  if (e) {
    e.serviceMs = decayedEwma(serviceMsAt(e, nowMs), e.serviceAtMs, execMs, nowMs, c.serviceTauMs);
    e.serviceAtMs = nowMs;
    if (loadMs > 0) {
      const s = e.stats;
      s.coldLoadMs = Number.isNaN(s.coldLoadMs) ? loadMs : 0.7 * s.coldLoadMs + 0.3 * loadMs;
      e.coldLoadMs = loadMs;
      e.measuredLoadMs = loadMs;
    }
    setModelState(e, 'warm', undefined, nowMs);
    if (sample.e2eMs !== undefined && sample.e2eMs >= 0) {
      const s = e.stats;
      s.e2e[s.e2eCount % E2E_RING] = sample.e2eMs;
      s.e2eCount++;
      s.p95Dirty = true;
      e.latency.add(sample.e2eMs);
    }
  }

  const networkMs = sample.rttMs ?? (sample.e2eMs !== undefined ? sample.e2eMs - queueMs - execMs - loadMs : Number.NaN);
  if (networkMs >= 0 && Number.isFinite(networkMs)) {
    const bytes = sample.bytes ?? 0;
    // RTT and rate are fitted together from every reply (netfit.ts): neither is ever held fixed to learn the other.
    agent.net ??= newNetFit(priorRttMs(agent), agent.bytesPerMs, nowMs);
    const added = addNetSample(agent.net, bytes, networkMs, nowMs, { tauMs: c.rttTauMs, refBytes: c.netRefBytes });
    agent.rttMs = agent.net.rttMs;
    agent.bytesPerMs = 1 / agent.net.msPerByte;
    agent.rttAtMs = nowMs;
    agent.bwAtMs = nowMs;
    // This sample's own RTT (its transfer at the fitted rate taken off) moves both Vivaldi coordinates, so
    // agents never contacted by a client still get a place.
    const base = Math.max(MIN_RTT_MS, added - bytes * agent.net.msPerByte);
    const routerCoord = { ...reg.selfCoord };
    applyVivaldiSample(reg.selfCoord, agent.coord, base, reg.rng);
    applyVivaldiSample(agent.coord, routerCoord, base, reg.rng);
  }

  agent.pFail = pFailAt(agent, nowMs) * (1 - c.pFailAlpha);
  agent.pFailAtMs = nowMs;
  agent.consecutiveFailures = 0;
  agent.windowOk++;
  if (agent.ejectionCount > 0 && nowMs - agent.lastEjectedAtMs > c.ejectMaxMs) agent.ejectionCount = 0;
  if (sample.e2eMs !== undefined && sample.predictedMs !== undefined && sample.predictedMs > 0) {
    updateKappa(agent, sample.e2eMs / sample.predictedMs, nowMs);
  }
  if (sample.rif !== undefined) applyQueueClaim(agent, sample.rif, sample.workMs, nowMs);
  touch(agent, nowMs);
}

/** κ ← EWMA toward clip(κ · observed/predicted, 1, 10); predicted already contains κ. */
function updateKappa(agent: AgentEntry, ratio: number, nowMs: number): void {
  const c = agent.registry.config;
  const k = kappaAt(agent, nowMs);
  const target = Math.min(10, Math.max(1, k * ratio));
  agent.kappa = k + c.kappaAlpha * (target - k);
  agent.kappaAtMs = nowMs;
  if (agent.kappa > c.probationKappa) {
    if (Number.isNaN(agent.kappaHighSinceMs)) agent.kappaHighSinceMs = nowMs;
    else if (nowMs - agent.kappaHighSinceMs > c.probationAfterMs) invalidateAgent(agent);
  } else if (!Number.isNaN(agent.kappaHighSinceMs)) {
    agent.kappaHighSinceMs = Number.NaN;
    invalidateAgent(agent);
  }
}

export interface FailureInfo {
  /** The ECT predicted for the attempt; with timeoutMs it feeds κ "as if it took the full per-try timeout". */
  predictedMs?: number;
  timeoutMs?: number;
  /**
   * The agent vanished (LWT, disconnect, a new session): mark it down too. Not counted toward the
   * consecutive failures that eject: every attempt a dead agent held fails at once, so one crash read as
   * five failures and kept the restarted agent out for 30 s × n; markDown keeps it out while it is gone,
   * and it returns through the slow-start ramp.
   */
  lost?: boolean;
  /**
   * The failure says the agent is slow or full, not broken: a per-try timeout, or a MESH_BUSY refusal.
   * It raises p_fail and κ (which price the agent down, and κ held high puts it on probation) but does
   * not count toward the consecutive failures that eject it: under a burst every agent runs over its
   * timer at once, and ejecting them for it removed the capacity the burst needed (docs/routing.md).
   */
  load?: boolean;
}

/**
 * A failed attempt (timeout, error, disconnect): p_fail up; an error the agent answered (not MESH_BUSY)
 * also counts toward consecutive failures, and 5 in a row eject the agent for 30 s × k (k = its
 * ejection count, ≤ 300 s, ±10 % jitter) unless half its hardware class is out.
 * Returns true when this failure ejected it.
 */
export function onFailure(reg: Registry, agentId: string, _model: string, nowMs: number, info: FailureInfo = {}): boolean {
  const agent = reg.agents.get(agentId);
  if (!agent) return false;
  const c = reg.config;
  if (agent.outstanding > 0) agent.outstanding--;
  agent.pFail = pFailAt(agent, nowMs) * (1 - c.pFailAlpha) + c.pFailAlpha;
  agent.pFailAtMs = nowMs;
  if (!info.load && !info.lost) agent.consecutiveFailures++;
  agent.windowFailed++;
  if (info.predictedMs !== undefined && info.timeoutMs !== undefined && info.predictedMs > 0) {
    updateKappa(agent, info.timeoutMs / info.predictedMs, nowMs);
  }
  if (info.lost) markDown(agent, nowMs);
  if (agent.consecutiveFailures >= c.consecutiveFailuresToEject && !isEjected(agent, nowMs)) return eject(agent, nowMs);
  return false;
}

function ejectedShare(agent: AgentEntry, nowMs: number): number {
  const members = agent.registry.classMembers.get(agent.hardwareClass);
  if (!members || members.size === 0) return 0;
  let out = 0;
  for (const m of members) if (isEjected(m, nowMs)) out++;
  return out / members.size;
}

/** Ejects unless that would put more than maxEjectedFraction of the agent's class out. */
export function eject(agent: AgentEntry, nowMs: number): boolean {
  const reg = agent.registry;
  const c = reg.config;
  const members = reg.classMembers.get(agent.hardwareClass)?.size ?? 1;
  if (ejectedShare(agent, nowMs) + 1 / members > c.maxEjectedFraction + 1e-9) return false;
  agent.ejectionCount++;
  const base = Math.min(c.ejectMaxMs, c.ejectBaseMs * agent.ejectionCount);
  const durationMs = base * (1 + c.ejectJitter * (2 * reg.rng() - 1));
  agent.ejectedUntilMs = nowMs + durationMs;
  agent.lastEjectedAtMs = nowMs;
  agent.consecutiveFailures = 0;
  // The ejection has priced the failures in; on return the slow-start ramp, not a stale p_fail or κ, limits exposure.
  agent.pFail = 0;
  agent.kappa = 1;
  agent.kappaHighSinceMs = Number.NaN;
  // Come back slowly: the slow-start ramp begins when the ejection ends.
  agent.slowStartFromMs = agent.ejectedUntilMs;
  invalidateAgent(agent);
  return true;
}

/**
 * Success-rate outlier sweep (Envoy), meant to run every 10 s: within each hardware class, among agents with at
 * least srMinRequests attempts in the window (and at least srMinHosts such agents), eject those whose success
 * rate is below mean − 1.9 σ. Resets the window. Returns the ejected agent ids.
 */
export function evaluateOutliers(reg: Registry, nowMs: number): string[] {
  const c = reg.config;
  const ejected: string[] = [];
  for (const members of reg.classMembers.values()) {
    const rated: { agent: AgentEntry; sr: number }[] = [];
    for (const a of members) {
      const n = a.windowOk + a.windowFailed;
      if (n >= c.srMinRequests) rated.push({ agent: a, sr: a.windowOk / n });
    }
    if (rated.length >= c.srMinHosts) {
      const mean = rated.reduce((s, r) => s + r.sr, 0) / rated.length;
      const sd = Math.sqrt(rated.reduce((s, r) => s + (r.sr - mean) ** 2, 0) / rated.length);
      const limit = mean - c.srStdevFactor * sd;
      for (const r of rated) if (r.sr < limit && !isEjected(r.agent, nowMs) && eject(r.agent, nowMs)) ejected.push(r.agent.agentId);
    }
    for (const a of members) {
      a.windowOk = 0;
      a.windowFailed = 0;
    }
  }
  return ejected;
}

/** Cold-model bookkeeping: the agent started loading (others then see it warm after the ETA) or evicted it. */
export function onModelState(
  reg: Registry,
  agentId: string,
  model: string,
  state: { warm: boolean; loadEtaMs?: number },
  nowMs: number,
): void {
  const e = reg.agents.get(agentId)?.models.get(model);
  if (!e) return;
  setModelState(e, state.warm ? 'warm' : state.loadEtaMs !== undefined ? 'loading' : 'cold', state.loadEtaMs, nowMs);
}
