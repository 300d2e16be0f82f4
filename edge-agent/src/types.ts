/**
 * The agent's public types: what `startAgent` takes (AgentOptions) and what it gives back
 * (AgentHandle). Re-exported by index.ts; the modules of the agent share them from here.
 */
import type { BackoffOptions, MeshTlsOptions } from '@edge-mesh/client';
import type { AgentLoad, AgentStatus, Identity, ModelInfo, SignedReceipt } from '@edge-mesh/protocol';
import type { Logger } from 'pino';
import type { AgentDeployments, AgentDeployOptions, DeployEvent } from './deploy.ts';
import { newStackingCounters, type StackingCounters } from './executor.ts';
import type { FundsCheckpoint, LaneFunds } from './lane-funds.ts';
import type { AgentPaymentOptions, AgentPayments, LaneSummary } from './payments.ts';
import type { ReloadResult } from './reload.ts';
import type { SettlementRecord, SettlerCounters } from './settler.ts';

/** Injected faults (see AgentOptions.faults). */
export interface AgentFaults {
  linkDelayMs?: number;
  extraExecMs?: number;
  /** Lie: load reports and replies claim nothing queued or running, and leave `extraExecMs` out of their times. */
  claimIdle?: boolean;
  /** Lie: load reports claim this service time for every model, and replies this execution time, ms. */
  claimServiceMs?: number;
  /** Answer every request `MESH_INFERENCE_FAILED` at once, without running it. */
  failRequests?: boolean;
}

export interface AgentOptions {
  brokerUrl: string;
  /** CA, and for mutual TLS the agent's certificate and key, for an `mqtts://` broker (docs/operations.md, "TLS"). */
  tls?: MeshTlsOptions;
  /** Username and password for an external broker that checks passwords; sent on every (re)connect instead of the key's token. */
  username?: string;
  password?: string | Buffer;
  /**
   * QoS of this client's subscriptions (default 1). 0 on a NATS cluster (docs/operations.md, "Running on a NATS
   * cluster"): there a QoS 1 subscription is a JetStream consumer, slower and refused while the cluster elects
   * leaders after losing a node, while a QoS 0 one is plain NATS routing. With clean sessions a QoS 1 subscription
   * keeps nothing across a reconnect either, so the mesh loses nothing by it.
   */
  subscriptionQos?: 0 | 1;
  /** QoS of requests, cancels, replies, leases and vouchers (default 1; 0 on NATS): MeshConnectionOptions.publishQos. */
  publishQos?: 0 | 1;
  modelsDir: string;
  /**
   * The agent's key (role `agent`); its id is the agent id, and it signs the status and proves the
   * agent to the broker on CONNECT. When absent, an ephemeral key is made for this run (its id is
   * logged), which only an open broker accepts.
   */
  identity?: Identity;
  /**
   * Inference worker threads (default 1) for the models that do not run inline (none are started when
   * every model does); each holds a session per such model. Each worker costs its own
   * V8 isolate (about 10 MB) plus a copy of every session (the four demo models: about 55 MB), so the
   * default is one; more pay off when runs are long or many arrive at once (docs/agent.md).
   */
  workers?: number;
  /**
   * Run a model on the agent's main thread ("inline") when its inputs have fixed shapes and the p99 of
   * its warm-up runs there is at most this many milliseconds (default 0.5); 0 turns it off. Inline runs
   * skip the hop to a worker and back, and an agent whose models all run inline starts no worker thread.
   * They block the event loop while they run, so the agent runs at most about this much inline work per
   * event-loop turn (docs/agent.md, "Inline models").
   */
  inlineMaxMs?: number;
  /**
   * Most requests for one inline model run together, stacked in one onnxruntime run, when the model passed the batching
   * probe at load (docs/agent.md, "Batching inline runs"). Default 16; 1 turns batching off.
   */
  inlineBatchMax?: number;
  /**
   * Serve Prometheus metrics on this port at GET /metrics (docs/operations.md, "Metrics"); off by default. The
   * metrics library is loaded only when this is set (docs/agent.md, "Memory").
   */
  metricsPort?: number;
  /** Address the metrics port listens on (default 127.0.0.1). */
  metricsHost?: string;
  /** Threads onnxruntime may use inside one run. */
  intraOpThreads?: number;
  /** Bound of each model's queue; a request beyond it gets MESH_BUSY at once. */
  queueLimit?: number;
  /**
   * Refuse at once (MESH_OVERLOADED) a request the queue cannot serve before its deadline (default true; docs/operations.md,
   * "Overload"). Off, such a request is queued and dropped when its deadline passes, as before admission existed.
   */
  admission?: boolean;
  /**
   * Publish the status retained (default true). Off on a NATS cluster (docs/operations.md, "Running on a NATS
   * cluster"): there a retained PUBLISH is stored in JetStream before the node reads the agent's next packet, so
   * while the cluster elects leaders after losing a node, the replies the agent sends after announcing wait too (up
   * to 8 s in the chaos runs here). Off, the status goes at `publishQos`. Receivers ask agents to announce
   * (`discover`) and do not need the retained copy; the last will stays retained.
   */
  retainStatus?: boolean;
  /**
   * Keep a second connection, to the next broker of the list, subscribed and idle, and serve on it at once when the
   * first drops (default false; docs/operations.md, "Running on a NATS cluster"). For a cluster whose nodes make a
   * reconnecting client wait (NATS 2.9: 4 to 9 s after a node's death). Needs a broker password and two or more broker
   * URLs; the standby has no last will.
   */
  standbyConnection?: boolean;
  /** Jobs handed to one worker at once, so it never idles through a hand-off (1 disables). */
  pipelineDepth?: number;
  heartbeatMs?: number;
  warmupRuns?: number;
  /**
   * Nice value (0–19) added to each inference worker thread while it loads and warms its models, so a restarting
   * agent leaves the CPU to its neighbours first; default 10, 0 turns it off.
   */
  loadNice?: number;
  /** 'auto' tries TensorRT, then CUDA when this onnxruntime build ships them, then CPU. */
  providers?: 'auto' | string[];
  maxMessageBytes?: number;
  maxElements?: number;
  keepaliveS?: number;
  backoff?: BackoffOptions;
  logger?: Logger;
  /**
   * Resolve only once the first status is published (default true). Then a first CONNECT the broker
   * refuses as unauthorized rejects `startAgent` with MESH_UNAUTHORIZED; without it, `announced` rejects.
   */
  awaitAnnounce?: boolean;
  /**
   * Request ids are remembered until their deadline, so a replayed (or redelivered) request is refused and
   * never run twice. When this many are remembered, a sender holding at least two fewer than the sender holding
   * the most takes a place from it; others get MESH_BUSY until some expire (ReplayGuard).
   */
  maxRememberedRequests?: number;
  /**
   * How far ahead of the agent's clock a request's deadline may be (default 660,000 ms: 10 minutes and 1 for clocks); a request with a
   * later one is refused MESH_BAD_REQUEST before its id is remembered.
   */
  maxDeadlineMs?: number;
  /**
   * Fault injection for tests and demos of routing: `linkDelayMs` holds each request and each reply
   * for that long (a far-away link: round trip + 2 × linkDelayMs, outside the reported queue and
   * execution times); `extraExecMs` adds that much to every execution (slow hardware: the reply waits
   * and reports the longer execMs; the wait holds no worker). `claimIdle` makes the agent lie about itself: its
   * load reports and replies say nothing is queued or running and leave `extraExecMs` out of the service and
   * execution times (a slow agent passing itself off as idle and fast; its status' latency is the one measured at
   * load, so it claims the fast time there too). `claimServiceMs` claims that service time in load reports and that
   * execution time in replies, whatever the truth (faster than an honest agent, say). `failRequests` answers every well-formed request
   * `MESH_INFERENCE_FAILED` at once (a broken runtime); its reports stay true. Never set in production.
   */
  faults?: AgentFaults;
  /**
   * Take payment: sign a quote into the status and a receipt for every request on a payer lane granted
   * to its sender, keep the receipt journal and best vouchers in `dataDir`, and give credit only against
   * money on the lane (read from the escrow through `payment.provider`). Requests naming no payer get
   * MESH_PAYMENT_REQUIRED unless `payment.serveUnpaid`. Without `payment` the agent serves every request
   * free, with no receipt.
   */
  payment?: AgentPaymentOptions;
  /** Take signed model deployments for these groups (docs/deployment.md); absent: the models folder is all. */
  deploy?: AgentDeployOptions;
}

export interface AgentCounters {
  received: number;
  served: number;
  errors: Record<string, number>;
  /** Reconnects of the agent's (first) connection. */
  reconnects: number;
  /** Switches to the other connection when the serving one dropped (AgentOptions.standbyConnection). */
  failovers: number;
  announcements: number;
  /** Requests refused because their id was seen before (also counted in `errors.MESH_BAD_REQUEST`). */
  replays: number;
  /** Inline runs that stacked the requests of one turn (docs/agent.md, "Batching inline runs"). */
  stacked: StackingCounters;
}

/** One more error of `code` in `counters.errors`. */
export function countError(counters: AgentCounters, code: string): void {
  counters.errors[code] = (counters.errors[code] ?? 0) + 1;
}

/** Counters at zero, as an agent starts; `stacked` is the object the agent's inline executors count in. */
export function newAgentCounters(stacked: StackingCounters = newStackingCounters()): AgentCounters {
  return { received: 0, served: 0, errors: {}, reconnects: 0, failovers: 0, announcements: 0, replays: 0, stacked };
}

export interface AgentHandle {
  readonly id: string;
  readonly models: readonly ModelInfo[];
  readonly counters: AgentCounters;
  status(): AgentStatus;
  loadReport(): AgentLoad;
  /** Resolves when the first status has been published; rejects if the broker refuses the first CONNECT as unauthorized. */
  readonly announced: Promise<void>;
  /** Refuses new work, finishes what is queued or running (up to `timeoutMs`), then closes. */
  drain(timeoutMs?: number): Promise<void>;
  /** Publishes the offline status and stops at once; queued work is dropped. */
  close(): Promise<void>;
  /**
   * Re-reads the models folder and serves what it lists now (docs/agent.md, "Reloading the models folder"):
   * `edge-mesh agent` calls it on SIGHUP. Never rejects: a refusal is in the result and the log.
   */
  reloadModels(): Promise<ReloadResult>;
  /** Changes the injected faults (see AgentOptions.faults) while running: a gray failure on demand. */
  setFaults(faults: AgentFaults): void;
  /** `http://host:port/metrics` when `metricsPort` was given. */
  readonly metricsUrl?: string;
  /** Present when the agent takes payment. */
  /** Deployment steps applied and refused, newest last (with the `deploy` option). */
  readonly deployments?: {
    readonly events: readonly DeployEvent[];
    settled(): Promise<void>;
    /** The loaded models' memory estimates against the budget (AgentDeployOptions.memoryBudgetMb). */
    memory(): ReturnType<AgentDeployments['memory']>;
  };
  readonly payments?: {
    lanes(): LaneSummary[];
    /** Reads the escrow's events up to the latest block now (the follower otherwise polls on its own). */
    catchUpFunds(): Promise<void>;
    /**
     * Where the escrow follower stands: the next block it reads and the hash it recorded for the last one read,
     * with its counters (`reorgs`: replaced blocks found and the lanes read again; `behind`: polls that found
     * the node behind the last block followed and waited).
     */
    funds(): { checkpoint: FundsCheckpoint; counters: LaneFunds['counters'] };
    receipts(payer: string): Promise<SignedReceipt[]>;
    readonly counters: AgentPayments['counters'];
    /** Voucher signatures checked so far (on the agent's signature worker): what vouchers have cost it to check. */
    readonly voucherSignaturesChecked: number;
    /** Lane grant signatures checked so far (on the same worker). */
    readonly grantSignaturesChecked: number;
    /** Present when `payment.settle` is set: the settlement relayer. */
    readonly settler?: {
      readonly counters: SettlerCounters;
      settlements(): Promise<SettlementRecord[]>;
      /** What the chain has settled per payer lane, as the settler last saw it. */
      settledByLane(): Record<string, number>;
      /** Settles every lane owing anything now, whatever the policy. */
      settleNow(): Promise<void>;
    };
  };
}
