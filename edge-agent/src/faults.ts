/**
 * Injected faults (AgentOptions.faults), for tests and benchmarks of routing only, never set in production. Read by
 * the parts they change: request intake and reply publishing (the link delay), execution times and the load report
 * (the extra execution time), what the load reports and replies claim (`claimIdle`, `claimServiceMs`), and request
 * intake again (`failRequests`).
 */
import { MeshError } from '@edge-mesh/protocol';
import type { AgentFaults } from './types.ts';

/** A reply's queue claim: requests held and that as work, ms. */
export interface QueueClaimed {
  rif: number;
  workMs: number;
}

export class Faults {
  linkDelayMs = 0;
  extraExecMs = 0;
  claimIdle = false;
  /** The service time claimed for every model (load reports) and execution time claimed (replies), ms; absent: the true one. */
  claimServiceMs: number | undefined;
  failRequests = false;

  constructor(initial: AgentFaults = {}) {
    this.set(initial);
  }

  /** Replaces all of them; an absent or negative value means none. */
  set(faults: AgentFaults): void {
    this.linkDelayMs = Math.max(0, faults.linkDelayMs ?? 0);
    this.extraExecMs = Math.max(0, faults.extraExecMs ?? 0);
    this.claimIdle = faults.claimIdle === true;
    this.claimServiceMs = faults.claimServiceMs !== undefined && faults.claimServiceMs >= 0 ? faults.claimServiceMs : undefined;
    this.failRequests = faults.failRequests === true;
  }

  /** The execution time a reply reports for a run that took `execMs`. */
  reportedExecMs(execMs: number): number {
    return this.claimServiceMs ?? execMs + this.reportedExtraMs;
  }

  /** The extra execution time the agent admits to in its load reports and replies: none while it claims to be idle. */
  get reportedExtraMs(): number {
    return this.claimIdle ? 0 : this.extraExecMs;
  }

  /** The queue a reply says the agent holds: the true one, or none while it claims to be idle. */
  claimed(queue: QueueClaimed): QueueClaimed {
    return this.claimIdle ? { rif: 0, workMs: 0 } : queue;
  }
}

const NUMBERS = ['linkDelayMs', 'extraExecMs', 'claimServiceMs'] as const;
const FLAGS = ['claimIdle', 'failRequests'] as const;

/**
 * Faults from JSON text, as `edge-mesh agent` reads them from MESH_AGENT_FAULTS (tests and benchmarks only), e.g.
 * `{"extraExecMs":20,"claimIdle":true}`. Anything else than an object of those keys with finite non-negative numbers
 * and booleans is refused with MESH_CONFIG.
 */
export function parseAgentFaults(text: string): AgentFaults {
  let value: unknown;
  try {
    value = JSON.parse(text);
  } catch (err) {
    throw new MeshError('MESH_CONFIG', `MESH_AGENT_FAULTS is not JSON: ${(err as Error).message}`);
  }
  if (typeof value !== 'object' || value === null || Array.isArray(value))
    throw new MeshError('MESH_CONFIG', 'MESH_AGENT_FAULTS must be a JSON object');
  const faults: AgentFaults = {};
  for (const [key, v] of Object.entries(value)) {
    if ((NUMBERS as readonly string[]).includes(key)) {
      if (typeof v !== 'number' || !Number.isFinite(v) || v < 0)
        throw new MeshError('MESH_CONFIG', `MESH_AGENT_FAULTS.${key} must be a number of ms, 0 or more`);
      faults[key as (typeof NUMBERS)[number]] = v;
    } else if ((FLAGS as readonly string[]).includes(key)) {
      if (typeof v !== 'boolean') throw new MeshError('MESH_CONFIG', `MESH_AGENT_FAULTS.${key} must be true or false`);
      faults[key as (typeof FLAGS)[number]] = v;
    } else {
      throw new MeshError(
        'MESH_CONFIG',
        `MESH_AGENT_FAULTS has an unknown key ${JSON.stringify(key)}; known: ${[...NUMBERS, ...FLAGS].join(', ')}`,
      );
    }
  }
  return faults;
}
