/**
 * What the agent says about itself: the signed status (retained on its status topic), the offline
 * status the broker publishes as its will, and the load report of each heartbeat.
 */
import { randomBytes } from 'node:crypto';
import {
  type AgentLoad,
  type AgentStatus,
  encodeMessage,
  type Hardware,
  type Identity,
  type ModelInfo,
  type ModelLoad,
  PROTOCOL_VERSION,
  type SignedQuote,
  signStatus,
} from '@edge-mesh/protocol';

export const AGENT_VERSION = '0.1.0';

export interface StatusBoardOptions {
  identity: Identity;
  models: ModelInfo[];
  hardware: Hardware;
  /** Execution providers the sessions were created with. */
  providers: string[];
  /**
   * Jobs the agent runs at once (the status's `workers`): one per worker thread, plus one for the main
   * thread when models run inline there.
   */
  workers: number;
  queueLimit: number;
  /** A paying agent's current signed quote. */
  quote?: () => SignedQuote;
  /** Versions served beside `models` during a rollout (deploy.ts). */
  canaries?: () => NonNullable<AgentStatus['canaries']>;
}

/** The scheduler's side of a load report. */
export interface QueueReport {
  queued: number;
  inFlight: number;
  models: Record<string, ModelLoad>;
}

export class StatusBoard {
  /** Fresh each run: a router tells a restarted agent from a reconnected one by it. */
  readonly session = randomBytes(8).toString('hex');
  state: AgentStatus['state'] = 'online';
  /**
   * The offline status, signed once at start: the broker publishes it as the will when the agent dies,
   * so it cannot be signed then.
   */
  readonly offlinePayload: Buffer;

  constructor(private readonly options: StatusBoardOptions) {
    const { identity } = options;
    this.offlinePayload = encodeMessage(
      signStatus(identity, {
        v: PROTOCOL_VERSION,
        kind: 'status',
        agent: identity.id,
        state: 'offline',
        ts: Date.now(),
        session: this.session,
      }),
    );
  }

  /** The status as of now, signed. */
  status(): AgentStatus {
    const { identity, models, hardware, providers, workers, queueLimit, quote } = this.options;
    return signStatus(identity, {
      v: PROTOCOL_VERSION,
      kind: 'status',
      agent: identity.id,
      state: this.state,
      ts: Date.now(),
      session: this.session,
      version: AGENT_VERSION,
      models,
      hardware,
      providers,
      workers,
      queueLimit,
      ...(quote ? { quote: quote() } : {}),
      ...(this.options.canaries && this.options.canaries().length > 0 ? { canaries: this.options.canaries() } : {}),
    });
  }
}

/**
 * One heartbeat's load report. Injected slowness (`extraExecMs`) is part of the service time the agent
 * reports, as a really slow device's would be; an agent told to claim it is idle (`claimIdle`, a fault for
 * tests and benchmarks) reports nothing queued or running and leaves the slowness out, and one told to claim a
 * service time (`claimServiceMs`) reports that for every model.
 */
export function loadReport(
  agentId: string,
  seq: number,
  workers: number,
  queues: QueueReport,
  faults: { extraExecMs?: number; claimIdle?: boolean; claimServiceMs?: number | undefined } = {},
): AgentLoad {
  const extraExecMs = faults.claimIdle ? 0 : (faults.extraExecMs ?? 0);
  for (const m of Object.values(queues.models)) {
    if (extraExecMs > 0) m.serviceMs += extraExecMs;
    if (faults.claimServiceMs !== undefined) m.serviceMs = faults.claimServiceMs;
    if (faults.claimIdle) {
      m.queued = 0;
      m.inFlight = 0;
    }
  }
  if (faults.claimIdle) {
    queues.queued = 0;
    queues.inFlight = 0;
  }
  return { v: PROTOCOL_VERSION, kind: 'load', agent: agentId, ts: Date.now(), seq, workers, ...queues };
}

/** The heartbeat: every `periodMs`, housekeeping and then the next load report; `seq` counts beats. */
export class Heartbeat {
  seq = 0;
  private readonly timer: NodeJS.Timeout;

  constructor(periodMs: number, beat: (seq: number) => void) {
    this.timer = setInterval(() => beat(++this.seq), periodMs);
  }

  stop(): void {
    clearInterval(this.timer);
  }
}
