/**
 * Which balancer the live router runs for forwarded requests (docs/routing.md, "Choosing the policy"):
 * its own (`ours`, policy.ts) or another request-engine policy, such as the baselines the simulator
 * measures it against, so the live fleet can be compared with the simulator on the same rules.
 *
 * A live policy sees only what the wire carries: the verified statuses (including the offline one a
 * last will publishes), the load reports, and its own attempts. It may bring its own retry rule,
 * attempt limit and budget, as its source ships them. While it routes, the router's own estimates
 * still learn from every attempt (they answer route leases and /v1/routing), but only `ours` gets
 * the router's tail control: its per-try timeouts, hedges, budget and heartbeat-silence failover.
 */
import type { AttemptBudget, EnginePolicy } from '@edge-mesh/client';
import { type AgentLoad, type AgentStatus, type InferReply, MeshError, type MeshErrorCode } from '@edge-mesh/protocol';
import { createFinaglePolicy } from './baselines/index.ts';
import type { ReplyTimes, RouterAsk } from './policy.ts';

/** A request-engine policy the live router can run in place of its own (the baselines implement it). */
export interface LivePolicy<Rep extends ReplyTimes = InferReply> extends EnginePolicy<RouterAsk, Rep> {
  readonly name: string;
  /** A verified status, `online`, `draining` or `offline` (a last will), as the fleet view applies it. */
  onStatus?(status: AgentStatus, nowMs: number): void;
  /** A periodic load report of an online agent. */
  onLoad?(load: AgentLoad, nowMs: number): void;
  /** Agents per request, first attempt included (default: the router's `maxAttempts`). */
  readonly maxAttempts?: number;
  /** Which failures move to another agent (default: the error table's `retryable`). */
  retryable?(code: MeshErrorCode): boolean;
  /** What pays for its retries and backups; undefined: none beyond `maxAttempts`. */
  readonly budget?: AttemptBudget | undefined;
}

/** What the router gives a policy when it builds one. */
export interface LivePolicyContext {
  /** A random stream for the policy's sampling. */
  random: () => number;
  /** The engine clock's now, ms (epoch-aligned). */
  nowMs: number;
  /** The router's `maxAttempts`. */
  maxAttempts: number;
  /** The router's `hedging` option: a policy with backup requests may turn them off with it. */
  hedging: boolean;
}

export type LivePolicyFactory<Rep extends ReplyTimes = InferReply> = (context: LivePolicyContext) => LivePolicy<Rep>;

/**
 * The policies `--policy NAME` can select besides `ours`. The baselines (router/src/baselines) join
 * this table where they are built into the router: `finagle` is the one the 20-agent fleet test runs.
 */
export const ROUTER_POLICIES: Readonly<Record<string, LivePolicyFactory>> = {
  // Finagle's balancer as router/src/baselines/finagle.ts implements it; `--no-hedging` turns its
  // backup requests off.
  finagle: ({ random, nowMs, maxAttempts, hedging }) =>
    createFinaglePolicy<InferReply>({ random, nowMs, maxAttempts, ...(hedging ? {} : { maxExtraLoad: 0 }) }),
};

/** The names the router's options document: `ours`, and the baselines meant to be selectable live. */
export const ROUTER_POLICY_NAMES = ['ours', 'finagle'] as const;

/**
 * The factory for `choice`: undefined for the router's own policy (`ours`, the default), the table's
 * entry for a name, or the factory given; MESH_CONFIG for a name this router was not built with.
 */
export function resolveRouterPolicy(choice: string | LivePolicyFactory | undefined): LivePolicyFactory | undefined {
  if (choice === undefined || choice === 'ours') return undefined;
  if (typeof choice === 'function') return choice;
  const factory = Object.hasOwn(ROUTER_POLICIES, choice) ? ROUTER_POLICIES[choice] : undefined;
  if (!factory) {
    const known = ['ours', ...Object.keys(ROUTER_POLICIES)].join(', ');
    throw new MeshError('MESH_CONFIG', `router policy ${JSON.stringify(choice)} is not built into this router (it has: ${known})`);
  }
  return factory;
}

/**
 * The engine policy that lets `active` decide (which agent, when to time out and back up) while
 * `observer` (the router's own policy) sees every send, timeout and end too, to keep its estimates
 * current. The active policy is told first.
 */
export function observedBy<Rep extends ReplyTimes>(
  active: LivePolicy<Rep>,
  observer: EnginePolicy<RouterAsk, Rep>,
): EnginePolicy<RouterAsk, Rep> {
  return {
    pick: (request, tried, kind, now) => active.pick(request, tried, kind, now),
    ...(active.mayHedge ? { mayHedge: (request, now) => active.mayHedge!(request, now) } : {}),
    onSend(attempt, now) {
      active.onSend?.(attempt, now);
      observer.onSend?.(attempt, now);
    },
    onTimeout(attempt, now) {
      active.onTimeout?.(attempt, now);
      observer.onTimeout?.(attempt, now);
    },
    onAttemptEnd(attempt, end, now) {
      active.onAttemptEnd?.(attempt, end, now);
      observer.onAttemptEnd?.(attempt, end, now);
    },
    ...(active.retrySameAfter ? { retrySameAfter: (attempt, error) => active.retrySameAfter!(attempt, error) } : {}),
  };
}
