/**
 * `ours`: the router's own policy (`createRouterPolicy` from @edge-mesh/router) on its own registry, fed
 * exactly as the live router feeds it (router/src/start.ts): statuses through `onStatus` (a returning
 * agent is up again), load reports through `onLoad` while the agent is online, and replies with their
 * queue and execution times. No coordinates, no site labels, no bandwidth prior, nothing piggybacked
 * on replies that the wire does not carry. The budget, the attempts, the hedge cut-off and the outlier
 * sweep are the live router's defaults.
 */
import { type AttemptBudget, type EnginePolicy, TailBudget } from '@edge-mesh/client';
import type { AgentLoad, AgentStatus } from '@edge-mesh/protocol';
import { createRegistry, createRouterPolicy, onLoad, onStatus, type Registry, type RouterOptions } from '@edge-mesh/router';
import type { PolicyEnv, PolicyFactory, SimAsk, SimPolicy, SimReply, SimRequest } from './types.ts';
import { BORN_MS } from './world.ts';

export interface OursOptions {
  name?: string;
  hedging?: boolean;
  /** Hedging off above this fleet utilisation (the live default is 0.8). */
  hedgeMaxUtil?: number;
  /** Warm cold agents ahead of demand (the live default is on). */
  warming?: boolean;
  router?: RouterOptions;
}

export class OursPolicy implements SimPolicy {
  readonly name: string;
  readonly maxAttempts = 3;
  private reg!: Registry;
  private engine!: EnginePolicy<SimAsk, SimReply>;
  private tail!: TailBudget;
  private readonly online = new Set<string>();

  constructor(private readonly opts: OursOptions = {}) {
    this.name = opts.name ?? 'ours';
  }

  init(env: PolicyEnv): void {
    // The operator tells each router how many routers share the fleet (C3's concurrency compensation).
    this.reg = createRegistry({ seed: 1, routers: env.routers, ...this.opts.router });
    this.engine = createRouterPolicy<SimReply>(this.reg, {
      hedging: this.opts.hedging ?? true,
      ...(this.opts.warming !== undefined ? { warming: this.opts.warming } : {}),
      ...(this.opts.hedgeMaxUtil !== undefined ? { hedgeMaxUtilization: this.opts.hedgeMaxUtil } : {}),
      random: () => env.rng.next(),
    });
    this.tail = new TailBudget({}, BORN_MS);
  }

  policy(): EnginePolicy<SimAsk, SimReply> {
    return this.engine;
  }

  /** The router's registry, for tests that look at what it learned (ejections, estimates). */
  get registry(): Registry {
    return this.reg;
  }

  budget(): AttemptBudget {
    return this.tail;
  }

  ask(req: SimRequest) {
    return { model: req.modelName, bytesUp: req.bytesUp, bytesDown: req.bytesDown };
  }

  onStatus(status: AgentStatus, now: number): void {
    const entry = onStatus(this.reg, status, now);
    if (status.state === 'online') {
      this.online.add(status.agent);
      if (entry) entry.up = true;
    } else this.online.delete(status.agent);
  }

  onLoad(load: AgentLoad, now: number): void {
    if (this.online.has(load.agent)) onLoad(this.reg, load, now);
  }
}

export const OURS: Record<string, PolicyFactory> = {
  ours: () => new OursPolicy(),
  'ours-no-hedge': () => new OursPolicy({ name: 'ours-no-hedge', hedging: false }),
  'ours-no-warming': () => new OursPolicy({ name: 'ours-no-warming', warming: false }),
};
