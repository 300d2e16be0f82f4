/**
 * `ours`: the router's own policy (`createRouterPolicy` from @edge-mesh/router), plugged into the request
 * engine as the live router plugs it. The simulator feeds its registry what a live router learns from
 * MQTT: statuses (born, down, back up) and load reports; the policy learns the rest from its own sends
 * and replies. The hedge cut-off, the per-try timeout, the outlier sweep and the budget are the router's
 * defaults; the sweep runs every 10 s of virtual time.
 *
 * What this adapter still gives the registry that the wire does not carry yet (docs/routing.md,
 * "The simulator"): converged Vivaldi coordinates for agents and clients (ground truth, ×2 because the
 * simulator's figures are one-way), a link-class bandwidth prior per agent, and the agent's requests in
 * flight and cold-load time on every reply.
 */

import type { EnginePolicy } from '@edge-mesh/client';
import {
  type AgentEntry,
  createRegistry,
  createRouterPolicy,
  markDown,
  onModelState,
  onQueueReport,
  type Registry,
  type RouterAsk,
  type RouterOptions,
  upsertAgent,
} from '@edge-mesh/router';
import type { EngineSimPolicy, NodeInfo, PolicyEnv, ReplyInfo, SimAsk, SimRequest } from './types.ts';
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

export class OursPolicy implements EngineSimPolicy {
  readonly name: string;
  readonly kind = 'engine' as const;
  readonly maxAttempts: number;
  readonly budget = { ratio: 0.2, cap: 50, minPerS: 10, hedgeRatio: 0.05, hedgeCap: 10, concurrentFrac: 0.2 };
  private reg!: Registry;
  private engine!: EnginePolicy<SimAsk, ReplyInfo>;
  private nodes: readonly NodeInfo[] = [];
  private agents: AgentEntry[] = [];
  private warm = new Uint8Array(0);
  private epoch = new Int32Array(0);

  constructor(private readonly opts: OursOptions = {}) {
    this.name = opts.name ?? 'ours';
    this.maxAttempts = (opts.retries ?? true) ? 3 : 1;
  }

  init(env: PolicyEnv): void {
    this.nodes = env.nodes;
    this.reg = createRegistry({
      site: '0',
      seed: 1,
      ...(this.opts.choices ? { choices: this.opts.choices } : {}),
      ...this.opts.router,
    });
    this.engine = createRouterPolicy<ReplyInfo>(this.reg, {
      hedging: this.opts.hedging ?? true,
      hedgeMaxUtilization: this.opts.hedgeMaxUtil ?? 0.8,
      outlierIntervalMs: 10_000,
      random: () => env.rng.next(),
      select: { ...(this.opts.uniform ? { uniform: true } : {}), ...(this.opts.choices ? { choices: this.opts.choices } : {}) },
    });
    const N = env.nodes.length;
    this.warm = new Uint8Array(N);
    this.epoch = new Int32Array(N);
    // Agents have been around for a while: register them before t = 0 so no slow-start ramp is running.
    const born = -120_000;
    this.agents = env.nodes.map((n) => {
      const a = upsertAgent(this.reg, this.descriptor(n, n.warm, 0), born);
      a.bytesPerMs = (n.bwMbps * 1000) / 8; // link-class prior (Ethernet / Wi-Fi), bytes per ms
      this.warm[n.id] = n.warm ? 1 : 0;
      return a;
    });
    for (const n of env.nodes) onQueueReport(this.reg, n.agentId, 0, 0);
  }

  policy(): EnginePolicy<SimAsk, ReplyInfo> {
    return this.engine;
  }

  ask(req: SimRequest): RouterAsk {
    return {
      model: MODEL,
      bytesUp: req.upBytes,
      bytesDown: req.downBytes,
      clientSite: String(req.clientSite),
      ...(this.opts.coords === false ? {} : { clientCoord: { x: 2 * req.cx, y: 2 * req.cy, h: 2 * CLIENT_HEIGHT_MS, error: 0.1 } }),
    };
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

  onLoadReport(node: number, rif: number, warm: boolean, now: number): void {
    const id = this.nodes[node]!.agentId;
    onQueueReport(this.reg, id, rif, now);
    if ((this.warm[node] === 1) !== warm) {
      this.warm[node] = warm ? 1 : 0;
      onModelState(this.reg, id, MODEL, { warm }, now);
    }
  }

  onStatus(node: number, up: boolean, now: number): void {
    const n = this.nodes[node]!;
    if (!up) {
      markDown(this.agents[node]!, now);
      return;
    }
    this.epoch[node]!++;
    upsertAgent(this.reg, this.descriptor(n, this.warm[node] === 1, this.epoch[node]!), now);
  }
}

export const OURS: Record<string, () => EngineSimPolicy> = {
  ours: () => new OursPolicy(),
  'ours-no-hedge': () => new OursPolicy({ name: 'ours-no-hedge', hedging: false }),
  'ours-no-tail': () => new OursPolicy({ name: 'ours-no-tail', hedging: false, retries: false }),
  'ours-uniform': () => new OursPolicy({ name: 'ours-uniform', uniform: true }),
};
