/**
 * The policy interface of the simulator. A policy sees only what a real router would: the static fleet
 * description that agents announce (class, slots, self-benchmark, site), its own sends, replies with
 * queue/exec times, periodic load reports (delayed), status changes (delayed), and the clock.
 */
import type { EnginePolicy, TailBudgetOptions } from '@edge-mesh/client';
import type { MeshErrorCode } from '@edge-mesh/protocol';
import type { RouterAsk } from '@edge-mesh/router';
import type { Rng } from './rng.ts';

export type ClassName = 'gpu-fast' | 'gpu-mid' | 'cpu';

/** What an agent announces about itself (birth / retained status). */
export interface NodeInfo {
  id: number;
  agentId: string;
  cls: ClassName;
  slots: number;
  /** Agent self-benchmark: median execution ms of the model at start-up. */
  benchMs: number;
  site: number;
  /** Position on the plane (ms of one-way delay per unit distance). */
  x: number;
  y: number;
  /** Access-link latency (one way, ms). */
  heightMs: number;
  /** Link bandwidth, Mb/s. */
  bwMbps: number;
  /** Model warm at start (announced in the birth message). */
  warm: boolean;
}

export interface SimRequest {
  id: number;
  /** Arrival time (virtual ms). */
  t: number;
  clientSite: number;
  cx: number;
  cy: number;
  upBytes: number;
  downBytes: number;
  model: string;
  /** Absolute deadline (virtual ms). */
  deadline: number;
}

export interface ReplyInfo {
  ok: boolean;
  /** Agent-reported wait in queue (including any cold-load wait), ms. */
  queueMs: number;
  execMs: number;
  /** Cold-load time this request caused, ms (0 when warm). */
  loadMs: number;
  /** Agent's requests-in-flight (queued + executing) when it replied. */
  rif: number;
  /** When the router sent this attempt. */
  sentAt: number;
  upBytes: number;
  /** True when the agent's model is warm after this request. */
  warm: boolean;
}

export type FailureKind = 'error' | 'timeout' | 'cancel';

export interface ProbeReply {
  rif: number;
  /** The agent's own estimate of latency for a request arriving now (ms). */
  latencyMs: number;
}

export interface PolicyEnv {
  nodes: readonly NodeInfo[];
  /** The policy's own random stream (identical for every policy in a run). */
  rng: Rng;
  now(): number;
  /** Prequal-style probe: the reply arrives after a network round trip. */
  probe(node: number, cb: (node: number, reply: ProbeReply, now: number) => void): void;
  /** Deadline default of the workload, ms. */
  deadlineMs: number;
}

/** Retry and hedge budget: the same buckets the live router and the SDK use (the client layer's TailBudget). */
export type TailBudget = TailBudgetOptions;

/** Hedging, timeouts and retries; the engine enforces them on the policy's behalf. */
export interface TailPolicy {
  perTryTimeoutMs(req: SimRequest, node: number, now: number): number;
  /** Delay after which to hedge this attempt, or null for no hedge. */
  hedgeDelayMs?(req: SimRequest, node: number, now: number): number | null;
  retryOnError: boolean;
  retryOnTimeout: boolean;
  maxAttempts: number;
  budget: TailBudget;
}

export interface Policy {
  readonly name: string;
  init(env: PolicyEnv): void;
  /** Node to send to, or -1 if none (the request fails at once). `exclude` holds nodes already tried. */
  pick(req: SimRequest, exclude: ReadonlySet<number> | null, now: number, purpose: 'primary' | 'hedge' | 'retry'): number;
  onSend(node: number, req: SimRequest, now: number): void;
  onReply(node: number, req: SimRequest, reply: ReplyInfo, now: number): void;
  /** An attempt ended without a reply the router uses: error reply, per-try timeout, or cancelled loser. */
  onFailure(node: number, req: SimRequest, kind: FailureKind, elapsedMs: number, now: number): void;
  onLoadReport?(node: number, rif: number, warm: boolean, now: number): void;
  onStatus?(node: number, up: boolean, now: number): void;
  tail?: TailPolicy;
}

export type PolicyFactory = () => Policy;

/** What the request engine carries for one simulated request: what the router's policy reads, and the request. */
export interface SimAsk extends RouterAsk {
  req: SimRequest;
}

/**
 * A policy that plugs into the request engine as it is (the router's own policy, for `ours`): the
 * simulator feeds it the same events a live router gets from MQTT (load reports, statuses).
 */
export interface EngineSimPolicy {
  readonly name: string;
  readonly kind: 'engine';
  init(env: PolicyEnv): void;
  /** The engine policy (built in `init`). */
  policy(): EnginePolicy<SimAsk, ReplyInfo>;
  /** What the policy may know of a request (the same fields the live router fills in). */
  ask(req: SimRequest): RouterAsk;
  maxAttempts: number;
  budget: TailBudgetOptions | undefined;
  /** Whether another agent may succeed after this code (default: the error table's rule). */
  retryable?(code: MeshErrorCode): boolean;
  onLoadReport?(node: number, rif: number, warm: boolean, now: number): void;
  onStatus?(node: number, up: boolean, now: number): void;
}

export type AnyPolicy = Policy | EngineSimPolicy;
export type AnyPolicyFactory = () => AnyPolicy;
