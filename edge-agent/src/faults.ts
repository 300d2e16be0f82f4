/**
 * Injected faults (AgentOptions.faults), read by the parts they slow down: request intake and reply
 * publishing (the link delay), execution times and the load report (the extra execution time).
 */
import type { AgentFaults } from './types.ts';

export class Faults {
  linkDelayMs = 0;
  extraExecMs = 0;

  constructor(initial: AgentFaults = {}) {
    this.set(initial);
  }

  /** Replaces both; an absent or negative value means none. */
  set(faults: AgentFaults): void {
    this.linkDelayMs = Math.max(0, faults.linkDelayMs ?? 0);
    this.extraExecMs = Math.max(0, faults.extraExecMs ?? 0);
  }
}
