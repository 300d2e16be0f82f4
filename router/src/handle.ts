/**
 * The router's handle and the shapes around it, in a module of their own so the HTTP API and the
 * settlement routes depend on what the router offers, not on how it is built.
 */
import type { PipelineResult } from '@edge-mesh/client';
import type { AgentStatus, MeshErrorCode, ModelInfo, Tensor } from '@edge-mesh/protocol';
import type { ethers } from 'ethers';
import type { FastifyInstance } from 'fastify';
import type { Registry as PromRegistry } from 'prom-client';
import type { ConcurrencySnapshot } from './concurrency.ts';
import type { RouterConsoleOptions } from './console-admissions.ts';
import type { Registry } from './estimates.ts';
import type { RouterHttpAuthOptions } from './http-auth.ts';
import type { RelayOptions } from './relay.ts';
import type { RouterRollouts } from './rollout.ts';

/** The few pino methods the router uses; any pino logger fits. */
export interface RouterLogger {
  debug(obj: object, msg?: string): void;
  info(obj: object, msg?: string): void;
  warn(obj: object, msg?: string): void;
  error(obj: object, msg?: string): void;
}

export interface RouteOptions {
  deadlineMs?: number;
  bytesUp?: number;
  exclude?: ReadonlySet<string>;
}

export interface RouteResult {
  agentId: string;
  predictedMs: number;
}

export interface RouterInferOptions {
  deadlineMs?: number;
  /**
   * Count the request against the router's adaptive concurrency limit (concurrency.ts): beyond it, refused at once
   * with MESH_OVERLOADED. The HTTP and gRPC APIs set it; a library caller may.
   */
  limited?: boolean;
  /**
   * Who is asking, for the limit's shares (concurrency.ts): a caller at the limit is refused only once it holds its
   * share. The HTTP and gRPC APIs give the credential's id, or the address when the router takes no credentials.
   */
  caller?: string;
  /** Agents never to try (a pipeline stage whose answer from them was refused). */
  excludeAgents?: ReadonlySet<string>;
}

export interface RouterInferResult {
  requestId: string;
  model: string;
  agentId: string;
  outputs: Record<string, Tensor>;
  /** Agents tried, in order (hedges included). */
  tried: string[];
  attempts: number;
  hedged: boolean;
  timings: { totalMs: number; queueMs: number; execMs: number; predictedMs: number };
  /** A pipeline's model stages in order: which agent answered each, with which request. */
  stages?: { stage: string; model: string; agentId: string; requestId: string }[];
}

/** Pipelines served as models (pipelines.ts). */
export interface RouterPipelines {
  has(name: string): boolean;
  /** A pipeline as model metadata (inputs and outputs its own; price and latency the sum of its models'). */
  info(name: string): ModelInfo | undefined;
  /** Whether a live agent serves every model of the pipeline. */
  ready(name: string): boolean;
  names(): string[];
  /** Checks `inputs` against the pipeline's inputs (MESH_BAD_TENSOR), as `run` does first. */
  check(name: string, inputs: Record<string, Tensor>): void;
  run(name: string, inputs: Record<string, Tensor>, deadlineMs: number): Promise<RouterInferResult & { pipeline: PipelineResult }>;
}

/** One finished attempt, for metrics (HTTP layer) and tests. */
export interface AttemptRecord {
  model: string;
  agentId: string;
  ok: boolean;
  code?: MeshErrorCode;
  e2eMs: number;
}

/**
 * One piece of routed traffic, for metrics (HTTP layer): a forwarded request that ended (HTTP, gRPC or a
 * library `infer`), or a route question answered with a lease (granted, or refused with a code). Leased
 * requests themselves go straight to agents; the router sees only the grant.
 */
export interface RoutedRecord {
  via: 'forward' | 'lease';
  model: string;
  ok: boolean;
  code?: MeshErrorCode;
  /** The agent that answered (forward) or the lease's first agent; absent when there was none. */
  agentId?: string;
  /** Forwarded requests: from start to answer or failure, ms. */
  totalMs?: number;
}

export interface RouterCounters {
  /** Statuses ignored: unsigned, mis-signed, or signed by a key their id does not derive from. */
  statusRejected: number;
  /** Statuses ignored: they did not decode as a status, or named another agent than their topic. */
  statusMalformed: number;
  /** Statuses held back (then replaced by the agent's next) because it sent more status bytes than its budget. */
  statusDeferred: number;
  /** Offline statuses ignored because they name an older session than the agent's live one (a late last will). */
  staleOffline: number;
  /** Retained statuses ignored because a status of the same session had already come live on this connection. */
  staleRetained: number;
  requests: number;
  ok: number;
  failed: number;
  retries: number;
  hedges: number;
  cancels: number;
  /** Attempts given up because their agent went silent (no heartbeat for a few periods, no last will yet). */
  silenced: number;
  /** Retries and hedges the budget or the utilisation cut-off refused. */
  budgetRefused: number;
  /** Route leases given to SDK clients (direct mode), and route requests answered with an error. */
  leases: number;
  leasesRefused: number;
  /** Route questions dropped unanswered because their client asked more than `routeQuestionsPerSecond`. */
  questionsDropped: number;
  /** Attempts sent per agent id. */
  sentTo: Record<string, number>;
}

export interface RouterHandle {
  readonly id: string;
  /** The balancer forwarding requests: `ours`, or the name of the live policy selected (StartRouterOptions.policy). */
  readonly policy: string;
  readonly registry: Registry;
  readonly counters: RouterCounters;
  /** Picks an agent for `model` now; throws a coded MeshError (MESH_NO_AGENT, MESH_DEADLINE_EXCEEDED). */
  route(model: string, options?: RouteOptions): RouteResult;
  /** The adaptive concurrency limit on forwarded requests as it stands (undefined when turned off). */
  concurrency(): ConcurrencySnapshot | undefined;
  /** Pipelines served as models (docs/pipelines.md); `infer` with a pipeline's name runs it. */
  readonly pipelines: RouterPipelines;
  /** Forwards one request over MQTT as the router and resolves with the first result. */
  infer(model: string, inputs: Record<string, Tensor>, options?: RouterInferOptions): Promise<RouterInferResult>;
  /** Live agents and their latest verified status. */
  agents(): { id: string; up: boolean; status: AgentStatus }[];
  /** Models served by at least one live agent (first status wins for the metadata). */
  models(): ModelInfo[];
  /** Resolves once `count` live agents serve `model`. */
  waitForModel(model: string, timeoutMs?: number, count?: number): Promise<void>;
  /** Called after every finished attempt. */
  onAttempt(listener: (a: AttemptRecord) => void): () => void;
  /** Every forwarded request that ended and every route question answered; returns the unsubscribe. */
  onRouted(listener: (r: RoutedRecord) => void): () => void;
  readonly connected: boolean;
  /** Staged model rollouts (rollout.ts) when started with the `rollouts` option. */
  readonly rollouts: RouterRollouts | undefined;
  /** The HTTP API when started with the `http` option. */
  readonly http: RouterHttpHandle | undefined;
  /** The KServe v2 gRPC service when started with the `grpcPort` option. */
  readonly grpc: RouterGrpcHandle | undefined;
  close(): Promise<void>;
}

export interface RouterChainOptions {
  provider: ethers.Provider;
  escrow: string;
  /** First block to read events from (the escrow's deployment block; default 0). */
  fromBlock?: number;
}

export interface RouterHttpOptions {
  /**
   * Serve HTTPS with this certificate and key (docs/operations.md, "TLS"); with `ca` and `requireClientCert`, only
   * clients presenting a certificate signed by `ca` get through the handshake (mutual TLS).
   */
  tls?: { cert: string | Buffer; key: string | Buffer; ca?: string | Buffer; requireClientCert?: boolean };
  /** Who may call which endpoint (./http-auth.ts, docs/security.md "The router's HTTP API"). Unset: no authentication. */
  auth?: RouterHttpAuthOptions;
  /**
   * Addresses (or CIDR ranges) of reverse proxies whose `X-Forwarded-For` is believed: a request from one of them counts
   * as coming from the client it names, for the per-address limit on failed credentials and for the console's join
   * requests (docs/operations.md, "Running behind a load balancer"). Unset: the socket's address, and the header is
   * ignored, so a client cannot name its own address.
   */
  trustProxy?: string[];
  /** 0 picks a free port (default). */
  port?: number;
  host?: string;
  /** Deadline for an infer request without `parameters.deadline_ms`; the router's default when unset. */
  defaultDeadlineMs?: number;
  /** Largest accepted request body, bytes (default 64 MiB). */
  bodyLimit?: number;
  /** Also export the Node process metrics (default true). */
  processMetrics?: boolean;
  /** Serve /v1/lanes and /v1/settlements from this escrow on chain (see settlements.ts). */
  chain?: RouterChainOptions;
  /** Also relay vouchers (POST /v1/relay/vouchers) from this account, which pays the gas and earns the fees (see relay.ts). */
  relay?: RelayOptions;
  /** The operator console (console.ts, docs/console.md): served unless false; `admin` lets it admit and revoke. */
  console?: RouterConsoleOptions | false;
}

export interface RouterHttpHandle {
  readonly app: FastifyInstance;
  readonly port: number;
  readonly url: string;
  readonly metrics: PromRegistry;
  /** Closes the HTTP server (not the router). */
  close(): Promise<void>;
}

export interface RouterGrpcOptions {
  /** 0 picks a free port (default). */
  port?: number;
  host?: string;
  /** Largest request message accepted, bytes (default: the mesh's message cap plus 64 KiB); larger ones get RESOURCE_EXHAUSTED. */
  maxMessageBytes?: number;
  /**
   * The HTTP API's credentials, sent as `authorization: Bearer …` metadata: every method but ServerLive and ServerReady
   * needs one with the method's scope (infer; read for statistics and the repository index). Unset: open.
   */
  auth?: RouterHttpAuthOptions;
  /** Serve over TLS with this certificate and key; with `ca` and `requireClientCert`, mutual TLS. */
  tls?: { cert: string | Buffer; key: string | Buffer; ca?: string | Buffer; requireClientCert?: boolean };
}

export interface RouterGrpcHandle {
  readonly port: number;
  /** host:port, as a gRPC client takes it. */
  readonly address: string;
  /** Closes the gRPC server (not the router); calls still running get a second to finish. */
  close(): Promise<void>;
}
