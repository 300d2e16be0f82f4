/**
 * Baseline policies (docs/routing.md, "The simulator"), all through the one `Policy` interface. None of them hedges or
 * retries (their defaults: Finagle's P2C peak-EWMA does not retry application errors); the request's
 * deadline is their only timeout. They do honour status (a dead agent's LWT), as their real counterparts
 * honour a closed connection.
 */
import type { Rng } from './rng.ts';
import type { FailureKind, NodeInfo, Policy, PolicyEnv, ProbeReply, ReplyInfo, SimRequest } from './types.ts';

/** State every baseline keeps: status as announced, own outstanding requests. */
abstract class BasePolicy implements Policy {
  abstract readonly name: string;
  protected nodes: readonly NodeInfo[] = [];
  protected rng!: Rng;
  protected up = new Uint8Array(0);
  protected outstanding = new Int32Array(0);

  init(env: PolicyEnv): void {
    this.nodes = env.nodes;
    this.rng = env.rng;
    this.up = new Uint8Array(env.nodes.length).fill(1);
    this.outstanding = new Int32Array(env.nodes.length);
  }
  abstract pick(req: SimRequest, exclude: ReadonlySet<number> | null, now: number, purpose: 'primary' | 'hedge' | 'retry'): number;
  onSend(node: number, _req: SimRequest, _now: number): void {
    this.outstanding[node]!++;
  }
  onReply(node: number, _req: SimRequest, _reply: ReplyInfo, _now: number): void {
    this.outstanding[node]!--;
  }
  onFailure(node: number, _req: SimRequest, _kind: FailureKind, _elapsedMs: number, _now: number): void {
    this.outstanding[node]!--;
  }
  onStatus(node: number, up: boolean, _now: number): void {
    this.up[node] = up ? 1 : 0;
  }
  protected eligible(i: number, exclude: ReadonlySet<number> | null): boolean {
    return this.up[i] === 1 && !(exclude?.has(i) ?? false);
  }
  /** Uniform among eligible nodes (up to 64 draws, then a scan). */
  protected uniformEligible(exclude: ReadonlySet<number> | null): number {
    const n = this.nodes.length;
    for (let t = 0; t < 64; t++) {
      const i = this.rng.int(n);
      if (this.eligible(i, exclude)) return i;
    }
    const off = this.rng.int(n);
    for (let k = 0; k < n; k++) if (this.eligible((off + k) % n, exclude)) return (off + k) % n;
    return -1;
  }
}

export class RandomPolicy extends BasePolicy {
  readonly name = 'random';
  pick(_req: SimRequest, exclude: ReadonlySet<number> | null): number {
    return this.uniformEligible(exclude);
  }
}

export class RoundRobinPolicy extends BasePolicy {
  readonly name = 'round-robin';
  private next = 0;
  pick(_req: SimRequest, exclude: ReadonlySet<number> | null): number {
    const n = this.nodes.length;
    for (let k = 0; k < n; k++) {
      const i = this.next;
      this.next = (this.next + 1) % n;
      if (this.eligible(i, exclude)) return i;
    }
    return -1;
  }
}

/** Join-the-shortest-queue on the router's own outstanding count, full scan, random tie-break. */
export class LeastOutstandingPolicy extends BasePolicy {
  readonly name = 'least-outstanding';
  pick(_req: SimRequest, exclude: ReadonlySet<number> | null): number {
    const n = this.nodes.length;
    const off = this.rng.int(n);
    let best = -1;
    let bestV = Infinity;
    for (let k = 0; k < n; k++) {
      const i = (off + k) % n;
      if (!this.eligible(i, exclude)) continue;
      const v = this.outstanding[i]!;
      if (v < bestV) {
        bestV = v;
        best = i;
      }
    }
    return best;
  }
}

/** Capacity weights (slots / self-benchmark ms) with a cumulative table for O(log n) draws. */
class WeightedSampler {
  private cum: Float64Array;
  constructor(nodes: readonly NodeInfo[]) {
    this.cum = new Float64Array(nodes.length);
    let s = 0;
    nodes.forEach((n, i) => {
      s += n.slots / n.benchMs;
      this.cum[i] = s;
    });
  }
  draw(rng: Rng): number {
    const c = this.cum;
    const x = rng.next() * c[c.length - 1]!;
    let lo = 0;
    let hi = c.length - 1;
    while (lo < hi) {
      const mid = (lo + hi) >> 1;
      if (c[mid]! > x) hi = mid;
      else lo = mid + 1;
    }
    return lo;
  }
}

/**
 * Power of two choices (Finagle's P2C distributor): two distinct nodes, uniform or capacity-weighted;
 * a node with better status wins, else the lower load (ties to the first). The balancer repeats the
 * pick up to `maxEffort` = 5 times while the chosen node is not Open, then takes the last pick.
 */
abstract class P2CPolicy extends BasePolicy {
  protected abstract weighted: boolean;
  protected maxEffort = 5;
  private sampler: WeightedSampler | null = null;

  override init(env: PolicyEnv): void {
    super.init(env);
    this.sampler = new WeightedSampler(env.nodes);
  }
  protected abstract load(i: number, now: number): number;

  private draw(): number {
    return this.weighted ? this.sampler!.draw(this.rng) : this.rng.int(this.nodes.length);
  }

  protected pickPair(exclude: ReadonlySet<number> | null, now: number): number {
    const n = this.nodes.length;
    if (n === 1) return this.eligible(0, exclude) ? 0 : -1;
    let chosen = -1;
    for (let effort = 0; effort < this.maxEffort; effort++) {
      const a = this.draw();
      let b = this.draw();
      for (let t = 0; t < 16 && b === a; t++) b = this.draw();
      if (b === a) b = (a + 1) % n;
      const ea = this.eligible(a, exclude);
      const eb = this.eligible(b, exclude);
      if (ea !== eb) chosen = ea ? a : b;
      else chosen = this.load(a, now) <= this.load(b, now) ? a : b;
      if (this.eligible(chosen, exclude)) return chosen;
    }
    return chosen;
  }

  pick(_req: SimRequest, exclude: ReadonlySet<number> | null, now: number): number {
    return this.pickPair(exclude, now);
  }
}

export class P2CLeastOutstandingPolicy extends P2CPolicy {
  readonly name: string;
  protected weighted: boolean;
  constructor(weighted = false) {
    super();
    this.weighted = weighted;
    this.name = weighted ? 'p2c-lor-weighted' : 'p2c-lor';
  }
  protected load(i: number): number {
    return this.outstanding[i]!;
  }
}

/** Finagle's `Long.MaxValue >> 16`: the load of a node with pending requests and no latency history. */
export const FINAGLE_PENALTY = Number(BigInt('9223372036854775807') >> 16n);

/**
 * Finagle's PeakEwma load metric, exactly (com.twitter.finagle.loadbalancer.PeakEwma):
 * observe(rtt): w = exp(−Δt/τ); cost = rtt > cost ? rtt : cost·w + rtt·(1 − w); stamp = now.
 * load(): observe(0); cost == 0 && pending != 0 ? Penalty + pending : cost · (pending + 1).
 * Every response, success or failure, ends the request and is observed (so fast failures look fast).
 */
export class PeakEwma {
  stamp: number;
  pending = 0;
  cost = 0;
  constructor(
    readonly decayMs = 10_000,
    epoch = 0,
  ) {
    this.stamp = epoch;
  }
  observe(rtt: number, now: number): void {
    const td = Math.max(now - this.stamp, 0);
    const w = Math.exp(-td / this.decayMs);
    if (rtt > this.cost) this.cost = rtt;
    else this.cost = this.cost * w + rtt * (1 - w);
    this.stamp = now;
  }
  start(now: number): number {
    this.pending++;
    return now;
  }
  end(ts: number, now: number): void {
    const rtt = Math.max(now - ts, 0);
    this.pending--;
    this.observe(rtt, now);
  }
  load(now: number): number {
    this.observe(0, now);
    if (this.cost === 0 && this.pending !== 0) return FINAGLE_PENALTY + this.pending;
    return this.cost * (this.pending + 1);
  }
}

export class P2CPeakEwmaPolicy extends P2CPolicy {
  readonly name: string;
  protected weighted: boolean;
  private ewma: PeakEwma[] = [];
  constructor(weighted = false) {
    super();
    this.weighted = weighted;
    this.name = weighted ? 'p2c-peak-ewma-weighted' : 'p2c-peak-ewma';
  }
  override init(env: PolicyEnv): void {
    super.init(env);
    this.ewma = env.nodes.map(() => new PeakEwma(10_000, 0));
  }
  protected load(i: number, now: number): number {
    return this.ewma[i]!.load(now);
  }
  override onSend(node: number, req: SimRequest, now: number): void {
    super.onSend(node, req, now);
    this.ewma[node]!.start(now);
  }
  override onReply(node: number, req: SimRequest, reply: ReplyInfo, now: number): void {
    super.onReply(node, req, reply, now);
    this.ewma[node]!.end(reply.sentAt, now);
  }
  override onFailure(node: number, req: SimRequest, kind: FailureKind, elapsedMs: number, now: number): void {
    super.onFailure(node, req, kind, elapsedMs, now);
    this.ewma[node]!.end(now - elapsedMs, now);
  }
}

interface ProbeEntry {
  node: number;
  rif: number;
  latencyMs: number;
  t: number;
  uses: number;
}

/**
 * Prequal-lite (Wydrowski et al., NSDI'24): asynchronous probes (r = 3 per request, uniform targets)
 * fill a pool of ≤ 16 (rif, latency) entries that age out after 1 s; selection is hot-cold
 * lexicographic: hot ⇔ rif per slot above the Q_RIF = 0.84 quantile of the pool; among cold entries the
 * lowest latency wins, if all are hot the lowest rif. Each use "consumes" the entry (rif + 1, latency
 * scaled up). A reuse cap of 3 starved the fast tier (it caps the fast share at the probe share) and
 * failed 23 % at ρ 0.8; unlimited reuse within the age limit is the strongest variant, so it is the one used.
 */
export class PrequalLitePolicy extends BasePolicy {
  readonly name = 'prequal-lite';
  private pool: ProbeEntry[] = [];
  private env!: PolicyEnv;
  constructor(
    private readonly qRif = 0.84,
    private readonly probesPerRequest = 3,
    private readonly maxPool = 16,
    private readonly maxAgeMs = 1000,
    private readonly maxUses = Infinity,
    /** Compare rif / slots rather than raw rif (multi-slot agents; raw rif marks every GPU node hot). */
    private readonly perSlot = true,
  ) {
    super();
  }
  override init(env: PolicyEnv): void {
    super.init(env);
    this.env = env;
    this.pool = [];
  }
  private onProbe = (node: number, r: ProbeReply, now: number): void => {
    const existing = this.pool.findIndex((e) => e.node === node);
    if (existing >= 0) this.pool.splice(existing, 1);
    this.pool.push({ node, rif: r.rif, latencyMs: r.latencyMs, t: now, uses: 0 });
    if (this.pool.length > this.maxPool) this.pool.shift(); // oldest out
  };
  pick(_req: SimRequest, exclude: ReadonlySet<number> | null, now: number): number {
    for (let p = 0; p < this.probesPerRequest; p++) {
      const target = this.uniformEligible(null);
      if (target >= 0) this.env.probe(target, this.onProbe);
    }
    this.pool = this.pool.filter((e) => now - e.t <= this.maxAgeMs && e.uses < this.maxUses && this.up[e.node] === 1);
    const cands = this.pool.filter((e) => !(exclude?.has(e.node) ?? false));
    if (cands.length === 0) return this.uniformEligible(exclude);
    const r = (e: ProbeEntry) => (this.perSlot ? e.rif / this.nodes[e.node]!.slots : e.rif);
    const rifs = this.pool.map(r).sort((a, b) => a - b);
    const thr = rifs[Math.min(rifs.length - 1, Math.max(0, Math.ceil(this.qRif * rifs.length) - 1))]!;
    let best: ProbeEntry | null = null;
    for (const e of cands) if (r(e) <= thr && (best === null || e.latencyMs < best.latencyMs)) best = e;
    if (best === null) for (const e of cands) if (best === null || r(e) < r(best)) best = e;
    const chosen = best!;
    chosen.latencyMs *= (chosen.rif + 2) / (chosen.rif + 1);
    chosen.rif++;
    chosen.uses++;
    return chosen.node;
  }
}

export const BASELINES: Record<string, () => Policy> = {
  random: () => new RandomPolicy(),
  'round-robin': () => new RoundRobinPolicy(),
  'least-outstanding': () => new LeastOutstandingPolicy(),
  'p2c-lor': () => new P2CLeastOutstandingPolicy(false),
  'p2c-lor-weighted': () => new P2CLeastOutstandingPolicy(true),
  'p2c-peak-ewma': () => new P2CPeakEwmaPolicy(false),
  'p2c-peak-ewma-weighted': () => new P2CPeakEwmaPolicy(true),
  'prequal-lite': () => new PrequalLitePolicy(),
};
