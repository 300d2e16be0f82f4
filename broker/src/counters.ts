/**
 * What the broker counts for its metrics (./metrics.ts, docs/operations.md "Metrics"): plain numbers kept always
 * (cheap), read only when the metrics port is on.
 */
import type { MeshErrorCode } from '@edge-mesh/protocol';

export interface BrokerCounters {
  /** Refused CONNECTs by `reason|code`; a reason outside [a-z0-9-] (a hook's message) counts as `hook` or `other`. */
  connectRefused: Map<string, number>;
  /** Refused PUBLISHes and SUBSCRIBEs by MESH_* code. */
  publishRefused: Map<string, number>;
  subscribeRefused: Map<string, number>;
  /** Bans started: (admitted id, address) pairs after a burst of failed tokens, and addresses limited after a storm. */
  clientBans: number;
  addressLimits: number;
  /** PUBLISH packets clients sent that the broker accepted. */
  messagesIn: number;
  /** Messages the broker forwarded to subscribers (aedes' authorizeForward sees each one). */
  messagesOut: number;
  /** QoS 0 messages not forwarded to a subscriber whose socket was not draining (a slow or stopped reader). */
  messagesDroppedSlow: number;
  /** Clients disconnected because their socket did not drain within drainTimeoutMs. */
  slowConsumers: number;
  /** TCP bytes read and written on sockets that have closed (live ones are added at scrape time). */
  bytesInClosed: number;
  bytesOutClosed: number;
}

export function newBrokerCounters(): BrokerCounters {
  return {
    connectRefused: new Map(),
    publishRefused: new Map(),
    subscribeRefused: new Map(),
    clientBans: 0,
    addressLimits: 0,
    messagesIn: 0,
    messagesOut: 0,
    messagesDroppedSlow: 0,
    slowConsumers: 0,
    bytesInClosed: 0,
    bytesOutClosed: 0,
  };
}

/** A refusal reason as a bounded label value. */
export function reasonLabel(reason: string): string {
  if (reason.startsWith('hook')) return 'hook';
  return /^[a-z0-9-]{1,40}$/.test(reason) ? reason : 'other';
}

export function countInto(map: Map<string, number>, key: string): void {
  // Bounded already by the label rules; a cap keeps a bug from growing it without end.
  if (map.size >= 256 && !map.has(key)) key = 'other';
  map.set(key, (map.get(key) ?? 0) + 1);
}

export function countConnectRefused(counters: BrokerCounters, reason: string, code: MeshErrorCode): void {
  countInto(counters.connectRefused, `${reasonLabel(reason)}|${code}`);
}
