/**
 * `ours`: an adapter that drives the router's own pure selection core (../../router/index.ts) through the
 * simulator's policy interface: registry updates on status, load reports, sends, replies and failures;
 * `selectAgent` for primaries, hedges (warm only) and retries (excluding nodes already tried); the per-try
 * timeout and hedge delay from `perTryTimeoutMs` / `hedgeDelayMs` on the selection's predicted ECT.
 *
 * What the adapter adds (router runtime behaviour the pure core leaves to its caller, routing.md §3.6–3.7):
 * hedging is switched off while fleet utilisation Σ rif / Σ slots (from the reports) exceeds 0.8, the
 * success-rate outlier sweep runs every 10 s, and the engine enforces the budgets (retry ratio 0.2 cap 50,
 * ≥ 10/s, hedges 5 % cap 10, concurrent extras ≤ max(3, 20 % of active)).
 * Agents announce converged Vivaldi coordinates (ground truth, ×2 because the simulator's figures are
 * one-way) and a link-class bandwidth prior; everything else the registry learns from replies.
 */
import {
  type AgentEntry,
  createRegistry,
  evaluateOutliers,
  hedgeDelayMs,
  type ModelEntry,
  markDown,
  onCancel,
  onFailure,
  onModelState,
  onQueueReport,
  onReply,
  onSend,
  perTryTimeoutMs,
  type Registry,
  type RouterOptions,
  selectAgent,
  upsertAgent,
} from '@edge-mesh/router';
import type { FailureKind, NodeInfo, Policy, PolicyEnv, ReplyInfo, SimRequest, TailPolicy } from './types.ts';
import { BROKER_HOP_MS, CLIENT_HEIGHT_MS } from './world.ts';

const MODEL = 'm';

export interface OursOptions {
  name?: string;
  hedging?: boolean;
  retries?: boolean;
  /** Uniform sampling over the pool instead of capacity-weighted (ablation). */
  uniform?: boolean;
  /** d candidates. */
  choices?: number;
  /** Give the registry ground-truth coordinates (else it only has site labels and learned RTTs). */
  coords?: boolean;
  router?: RouterOptions;
  /** Hedging off above this fleet utilisation. */
  hedgeMaxUtil?: number;
}

export class OursPolicy implements Policy {
  readonly name: string;
  readonly tail: TailPolicy;
  private reg!: Registry;
  private nodes: readonly NodeInfo[] = [];
  private agents: AgentEntry[] = [];
  private rng: () => number = () => 0;
  /** Predicted ECT and entry of each live attempt, by request id × nodes + node. */
  private predicted = new Map<number, { ms: number; entry: ModelEntry }>();
  private rif = new Float64Array(0);
  private warm = new Uint8Array(0);
  private sumRif = 0;
  private sumSlots = 0;
  private lastSweep = 0;
  private epoch = new Int32Array(0);

  constructor(private readonly opts: OursOptions = {}) {
    this.name = opts.name ?? 'ours';
    const self = this;
    const hedging = opts.hedging ?? true;
    const retries = opts.retries ?? true;
    this.tail = {
      perTryTimeoutMs(req, node, now) {
        const p = self.predicted.get(self.key(req, node));
        return p ? perTryTimeoutMs(self.reg, p.ms, req.deadline - now) : req.deadline - now;
      },
      hedgeDelayMs: hedging
        ? (req, node) => {
            if (self.sumSlots > 0 && self.sumRif / self.sumSlots > (opts.hedgeMaxUtil ?? 0.8)) return null;
            const p = self.predicted.get(self.key(req, node));
            return p ? hedgeDelayMs(p.entry, p.ms) : null;
          }
        : undefined,
      retryOnError: retries,
      retryOnTimeout: retries,
      maxAttempts: 3,
      budget: { ratio: 0.2, cap: 50, minPerS: 10, hedgeRatio: 0.05, hedgeCap: 10, concurrentFrac: 0.2 },
    };
  }

  private key(req: SimRequest, node: number): number {
    return req.id * this.nodes.length + node;
  }

  init(env: PolicyEnv): void {
    this.nodes = env.nodes;
    this.rng = () => env.rng.next();
    this.reg = createRegistry({ site: '0', seed: 1, ...(this.opts.choices ? { choices: this.opts.choices } : {}), ...this.opts.router });
    const N = env.nodes.length;
    this.rif = new Float64Array(N);
    this.warm = new Uint8Array(N);
    this.epoch = new Int32Array(N);
    this.sumRif = 0;
    this.sumSlots = 0;
    // Agents have been around for a while: register them before t = 0 so no slow-start ramp is running.
    const born = -120_000;
    this.agents = env.nodes.map((n) => {
      const a = upsertAgent(this.reg, this.descriptor(n, n.warm, 0), born);
      a.bytesPerMs = (n.bwMbps * 1000) / 8; // link-class prior (Ethernet / Wi-Fi), bytes per ms
      this.warm[n.id] = n.warm ? 1 : 0;
      this.sumSlots += n.slots;
      return a;
    });
    for (const n of env.nodes) onQueueReport(this.reg, n.agentId, 0, 0);
  }

  private descriptor(n: NodeInfo, warm: boolean, epoch: number) {
    return {
      agentId: n.agentId,
      hardwareClass: n.cls,
      site: String(n.site),
      ...(this.opts.coords === false ? {} : { coord: { x: 2 * n.x, y: 2 * n.y, h: 2 * (n.heightMs + BROKER_HOP_MS), error: 0.1 } }),
      slots: n.slots,
      session: `s${epoch}`,
      models: [{ model: MODEL, serviceMs: n.benchMs, warm, slots: n.slots }],
    };
  }

  pick(req: SimRequest, exclude: ReadonlySet<number> | null, now: number, purpose: 'primary' | 'hedge' | 'retry'): number {
    if (now - this.lastSweep >= 10_000) {
      this.lastSweep = now;
      evaluateOutliers(this.reg, now);
    }
    const sel = selectAgent(
      this.reg,
      {
        model: MODEL,
        bytesUp: req.upBytes,
        bytesDown: req.downBytes,
        deadlineMs: req.deadline,
        clientSite: String(req.clientSite),
        ...(this.opts.coords === false ? {} : { clientCoord: { x: 2 * req.cx, y: 2 * req.cy, h: 2 * CLIENT_HEIGHT_MS, error: 0.1 } }),
        ...(exclude ? { exclude: new Set([...exclude].map((i) => this.nodes[i]!.agentId)) } : {}),
        warmOnly: purpose === 'hedge',
      },
      now,
      this.rng,
      { ...(this.opts.uniform ? { uniform: true } : {}), ...(this.opts.choices ? { choices: this.opts.choices } : {}) },
    );
    if (!sel.ok) return -1;
    const node = this.indexOf(sel.agentId);
    this.predicted.set(this.key(req, node), { ms: sel.predictedMs, entry: sel.entry });
    return node;
  }

  private index = new Map<string, number>();
  private indexOf(agentId: string): number {
    if (this.index.size === 0) for (const n of this.nodes) this.index.set(n.agentId, n.id);
    return this.index.get(agentId)!;
  }

  onSend(node: number, _req: SimRequest, now: number): void {
    onSend(this.reg, this.nodes[node]!.agentId, MODEL, now);
  }

  onReply(node: number, req: SimRequest, reply: ReplyInfo, now: number): void {
    const k = this.key(req, node);
    const p = this.predicted.get(k);
    this.predicted.delete(k);
    onReply(
      this.reg,
      this.nodes[node]!.agentId,
      MODEL,
      {
        queueMs: reply.queueMs,
        execMs: reply.execMs,
        loadMs: reply.loadMs,
        bytes: reply.upBytes + req.downBytes,
        e2eMs: now - reply.sentAt,
        ...(p ? { predictedMs: p.ms } : {}),
        rif: reply.rif,
      },
      now,
    );
    this.setRif(node, reply.rif);
  }

  onFailure(node: number, req: SimRequest, kind: FailureKind, elapsedMs: number, now: number): void {
    const k = this.key(req, node);
    const p = this.predicted.get(k);
    this.predicted.delete(k);
    const id = this.nodes[node]!.agentId;
    if (kind === 'cancel') onCancel(this.reg, id, now);
    else {
      // Errors count as latency: as if the attempt took its full per-try timeout (routing.md §3.7).
      const timeoutMs = p ? perTryTimeoutMs(this.reg, p.ms, Math.max(elapsedMs, req.deadline - (now - elapsedMs))) : elapsedMs;
      onFailure(this.reg, id, MODEL, now, p ? { predictedMs: p.ms, timeoutMs } : {});
    }
  }

  onLoadReport(node: number, rif: number, warm: boolean, now: number): void {
    const id = this.nodes[node]!.agentId;
    onQueueReport(this.reg, id, rif, now);
    this.setRif(node, rif);
    if ((this.warm[node] === 1) !== warm) {
      this.warm[node] = warm ? 1 : 0;
      onModelState(this.reg, id, MODEL, { warm }, now);
    }
  }

  onStatus(node: number, up: boolean, now: number): void {
    const n = this.nodes[node]!;
    if (!up) {
      markDown(this.agents[node]!, now);
      this.setRif(node, 0);
      return;
    }
    this.epoch[node]!++;
    upsertAgent(this.reg, this.descriptor(n, this.warm[node] === 1, this.epoch[node]!), now);
  }

  private setRif(node: number, rif: number): void {
    this.sumRif += rif - this.rif[node]!;
    this.rif[node] = rif;
  }
}

export const OURS: Record<string, () => Policy> = {
  ours: () => new OursPolicy(),
  'ours-no-hedge': () => new OursPolicy({ name: 'ours-no-hedge', hedging: false }),
  'ours-no-tail': () => new OursPolicy({ name: 'ours-no-tail', hedging: false, retries: false }),
  'ours-uniform': () => new OursPolicy({ name: 'ours-uniform', uniform: true }),
};
