/**
 * The policy interface of the simulator. Every policy, ours and the baselines alike, is a request-engine
 * policy fed only what the protocol carries: the agents' statuses (with their LWT delay), their load
 * reports every second (with the network delay), its own sends, and replies with queue and execution
 * times. The oracle alone reads the simulator's true state, as the upper bound.
 */
import type { AttemptBudget, EnginePolicy } from '@edge-mesh/client';
import type { AgentLoad, AgentStatus, MeshErrorCode } from '@edge-mesh/protocol';
import type { ProbeChannel, RouterAsk } from '@edge-mesh/router';
import type { Rng } from './rng.ts';

/** What a reply carries on the wire that a router learns from. */
export interface SimReply {
  queueMs: number;
  execMs: number;
  /** Filled only when the protocol's reply defines them (engine.ts, WIRE). */
  rif?: number;
  workMs?: number;
  loadMs?: number;
}

export interface SimRequest {
  id: number;
  /** Arrival time (virtual ms). */
  t: number;
  model: number;
  modelName: string;
  bytesUp: number;
  bytesDown: number;
  /** Absolute deadline (virtual ms). */
  deadline: number;
}

/** The simulator's true state, for the oracle only. */
export interface Truth {
  /** Node index of an agent id. */
  nodeOf(agentId: string): number;
  agentIds: readonly string[];
  /** When the request's attempt `k` sent now to `node` would answer, or Infinity (down, failing). */
  completionMs(node: number, req: SimRequest, k: number): number;
}

export interface PolicyEnv {
  /** The policy's own random stream (identical for every policy of the same router in a run). */
  rng: Rng;
  /** Routers sharing the fleet: configuration an operator knows (the router's `routers` option). */
  routers: number;
  now(): number;
  /** A probe to an agent, answered after a network round trip (Prequal; the protocol has no such message). */
  probe: ProbeChannel;
  truth: Truth;
}

/** What the request engine carries for one simulated request. */
export interface SimAsk extends RouterAsk {
  req: SimRequest;
}

export interface SimPolicy {
  readonly name: string;
  init(env: PolicyEnv): void;
  /** The engine policy (built in `init`). */
  policy(): EnginePolicy<SimAsk, SimReply>;
  ask(req: SimRequest): RouterAsk;
  readonly maxAttempts: number;
  /** The budget for retries and backups (built in `init`), or undefined for none. */
  budget(): AttemptBudget | undefined;
  /** Whether another agent may succeed after this code (default: the error table's rule). */
  retryable?(code: MeshErrorCode): boolean;
  onStatus?(status: AgentStatus, now: number): void;
  onLoad?(load: AgentLoad, now: number): void;
  /** The oracle sees deaths as they happen, not when the LWT arrives. */
  readonly seesDeaths?: boolean;
}

/** One instance per router. */
export type PolicyFactory = () => SimPolicy;
