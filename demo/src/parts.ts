/**
 * What the parts of `edge-mesh up` tell it (docs/operations.md, "The local mesh"). Each part is an
 * `edge-mesh` command run as a child process with an IPC channel; under a supervisor it sends one
 * `ready` message once it serves, and one `summary` message as it stops (only the parts whose figures
 * the summary needs send one). Without a supervisor the same commands print to stdout instead.
 */

export interface PartMessage<T = unknown> {
  type: 'ready' | 'summary';
  data: T;
}

export function isPartMessage(value: unknown): value is PartMessage {
  const m = value as PartMessage | undefined;
  return typeof m === 'object' && m !== null && (m.type === 'ready' || m.type === 'summary') && typeof m.data === 'object';
}

/** `edge-mesh broker`: where it listens. */
export interface BrokerReady {
  url: string;
}

/** `edge-mesh agent`: its id and models, once its signed status is published. */
export interface AgentReady {
  id: string;
  models: { name: string; latencyMs: number }[];
}

/** `edge-mesh agent` when it has drained (and, with `--settle-on-close`, settled). */
export interface AgentSummary {
  id: string;
  served: number;
  /** Its payer lanes: receipts signed and what they charge (empty when it takes no payment). */
  lanes: { payer: string; receipts: number; owedMicros: number }[];
  /** Settle transactions its relayer sent (0 without `--settle`). */
  settlementTxs: number;
}

/** `edge-mesh router`: its id and HTTP API. */
export interface RouterReady {
  id: string;
  httpUrl: string | null;
}

/** `edge-mesh bridge run`: its id, UDP address and the devices its registry holds. */
export interface BridgeReady {
  id: string;
  udp: { host: string; port: number } | null;
  devices: number;
}

/** `edge-mesh bridge run` as it stops: the requests it forwarded for devices. */
export interface BridgeStopSummary {
  requests: number;
  ok: number;
  errors: number;
  retransmits: number;
  /** Frames the bridge dropped without an answer (bad size, header, key, replay, unknown device: docs/bridge.md). */
  dropped: number;
  /** UDP datagrams read, and those the kernel dropped before the bridge read them (null: not known, or no UDP). */
  udp_datagrams: number | null;
  udp_kernel_drops: number | null;
  /** Bridge-side latency of a device request (frame in → reply out), ms. */
  p50_ms: number | null;
}

/** `edge-mesh bridge sim-device` as it stops: what the device itself counted. */
export interface DeviceSummary {
  sent: number;
  ok: number;
  errors: number;
  p50_ms: number | null;
}

/** `edge-mesh demo app`: it has seen every model served by the agents it waits for, and is sending. */
export interface AppReady {
  models: string[];
  agents: number;
  ratePerS: number;
}

/** `edge-mesh demo app` when every outstanding request has ended. */
export interface AppSummary {
  requests: number;
  ok: number;
  errors: number;
  models: Record<string, { requests: number; p50_ms: number | null; p99_ms: number | null }>;
  /** Keyed by agent id. */
  per_agent: Record<string, { requests: number; p50_ms: number | null; p99_ms: number | null }>;
  error_codes: Record<string, number>;
  /** Answered requests by the way they went: 'leased', 'local', or the thin client's name ('http'). */
  paths: Record<string, number>;
  /** The warm-up before the stream (SampleApp.warmUp): not counted in the figures above. */
  warmup: WarmupSummary;
}

/** One request of each model on each way the app sends, one at a time, before the stream starts. */
export interface WarmupSummary {
  requests: number;
  ok: number;
  error_codes: Record<string, number>;
  /** The slowest of them, ms (null when none was sent). */
  slowest_ms: number | null;
  /** Wall time the warm-up took, ms. */
  took_ms: number;
}
