/**
 * The baselines in the simulator: each is the router package's baseline policy (router/src/baselines/,
 * every one naming the source file it follows), one instance per router, fed the same wire messages as
 * `ours`; and the oracle, which reads the simulator's true state.
 */
import type { AttemptBudget, EnginePolicy, EngineRequest } from '@edge-mesh/client';
import type { MeshErrorCode } from '@edge-mesh/protocol';
import {
  type BaselinePolicy,
  createEnvoyPolicy,
  createFinaglePolicy,
  createLinkerdPolicy,
  createPrequalPolicy,
  LOST,
} from '@edge-mesh/router';
import type { PolicyEnv, PolicyFactory, SimAsk, SimPolicy, SimReply, SimRequest, Truth } from './types.ts';
import { BORN_MS } from './world.ts';

const askOf = (req: SimRequest) => ({ model: req.modelName, bytesUp: req.bytesUp, bytesDown: req.bytesDown });

/** A router-package baseline as a simulator policy. */
function baseline(name: string, make: (env: PolicyEnv) => BaselinePolicy<SimReply>): PolicyFactory {
  return () => {
    let b!: BaselinePolicy<SimReply>;
    return {
      name,
      init(env) {
        b = make(env);
      },
      policy: () => b as EnginePolicy<SimAsk, SimReply>,
      ask: askOf,
      get maxAttempts() {
        return b.maxAttempts;
      },
      budget: () => b.budget,
      retryable: (code: MeshErrorCode) => b.retryable(code),
      onStatus: (status, now) => b.onStatus(status, now),
      onLoad: (load, now) => b.onLoad(load, now),
    };
  };
}

/**
 * The upper bound: shortest expected delay on the true state. For every live agent it knows when this
 * very request would answer (queue ahead in true service times, cold loads, the network, the request's
 * own service time there) and picks the earliest; it sees a death the moment it happens and fails the
 * lost work over at once. No retries or hedges beyond that: it never needs to guess.
 */
class OraclePolicy implements SimPolicy {
  readonly name = 'oracle';
  readonly maxAttempts = 3;
  readonly seesDeaths = true;
  private truth!: Truth;

  init(env: PolicyEnv): void {
    this.truth = env.truth;
  }

  policy(): EnginePolicy<SimAsk, SimReply> {
    return {
      pick: (request: EngineRequest<SimAsk>, tried) => {
        let best = -1;
        let bestMs = Number.POSITIVE_INFINITY;
        const ids = this.truth.agentIds;
        for (let i = 0; i < ids.length; i++) {
          if (tried.has(ids[i]!)) continue;
          const ms = this.truth.completionMs(i, request.data.req, tried.size);
          if (ms < bestMs) {
            bestMs = ms;
            best = i;
          }
        }
        return best < 0 ? undefined : { agentId: ids[best]! };
      },
    };
  }

  ask = askOf;
  budget(): AttemptBudget | undefined {
    return undefined;
  }
  retryable(code: MeshErrorCode): boolean {
    return LOST.has(code);
  }
}

export const BASELINES: Record<string, PolicyFactory> = {
  finagle: baseline('finagle', (env) => createFinaglePolicy<SimReply>({ random: () => env.rng.next(), nowMs: BORN_MS })),
  linkerd: baseline('linkerd', (env) => createLinkerdPolicy<SimReply>({ random: () => env.rng.next(), nowMs: BORN_MS })),
  envoy: baseline('envoy', (env) => createEnvoyPolicy<SimReply>({ random: () => env.rng.next(), nowMs: BORN_MS })),
  prequal: baseline('prequal', (env) => createPrequalPolicy<SimReply>({ random: () => env.rng.next(), probe: env.probe })),
  'prequal-weighted': baseline('prequal-weighted', (env) =>
    createPrequalPolicy<SimReply>({ random: () => env.rng.next(), probe: env.probe, weighted: true }),
  ),
  oracle: () => new OraclePolicy(),
};
