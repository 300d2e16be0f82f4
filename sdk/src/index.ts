/**
 * What an IoT app imports (docs/sdk.md).
 *
 *   const identity = parseKeyFile(await readFile('app.key', 'utf8'));   // admitted by the operator
 *   const mesh = await connect({ brokerUrl: 'mqtt://127.0.0.1:1883', identity });
 *   const { outputs, agentId, timings } = await mesh.infer('kws', { x: tensor }, { deadlineMs: 50 });
 *
 * With `router` set to a router's id, the SDK asks that router for a route lease per model (a few
 * ranked agents, valid for a short while) and sends straight to the agents, one hop fewer than
 * forwarding through the router. Without a router, or when the router does not answer in time, it
 * picks among live agents itself from their retained status and load heartbeats (lowest expected
 * latency). Either way the request engine of @edge-mesh/client retries on another agent within the
 * deadline when one is busy, silent or dies, and hedges an attempt that runs far over its prediction,
 * by the same rules as the router.
 *
 * This file wires the parts: the connection, the fleet view, the policy (policy.ts), leases
 * (leases.ts), the request engine and, when paying, the payer's lanes (payments.ts, loaded on demand).
 */
import {
  type BackoffOptions,
  childLogger,
  createFleetView,
  createRequestEngine,
  type MeshConnection,
  type MeshLogger,
  type MeshTlsOptions,
  mqttTransport,
  openMeshConnection,
  type PipelineDefinition,
  readReply,
  subscribeOrReconnect,
  systemClock,
  TailBudget,
  type TailBudgetOptions,
  turnWriteHold,
  waitUntil,
} from '@edge-mesh/client';
import {
  type AgentLoad,
  type AgentStatus,
  assertValidId,
  checkTensor,
  DEFAULT_MAX_MESSAGE_BYTES,
  decodeTensorMap,
  encodeMessage,
  encodeTensorMap,
  generateIdentity,
  hashTensorMap,
  type Identity,
  type InferRequest,
  MeshError,
  type ModelInfo,
  newRequestId,
  PROTOCOL_VERSION,
  parseTopic,
  requestIdHex,
  type Tensor,
  topics,
} from '@edge-mesh/protocol';
import type { MqttClient } from 'mqtt';
import { createLeaseBook, type LeaseBook } from './leases.ts';
import type { LaneView, PayerLanes, PaymentOptions } from './payments.ts';
import { createPipelines, type PipelineOptions, type PipelineRunResult } from './pipelines.ts';
import { createSdkPolicy, type SdkReply, type SdkRequest } from './policy.ts';

export {
  type BrokerEngine,
  engineDefaults,
  ocrPipeline,
  ocrText,
  type PipelineDefinition,
  type PipelineResult,
  type StageRecord,
  wakeWordPipeline,
} from '@edge-mesh/client';
export {
  generateIdentity,
  type Identity,
  MeshError,
  type MeshErrorCode,
  parseKeyFile,
  publicIdentity,
  type Tensor,
} from '@edge-mesh/protocol';
export type { LaneView, PaymentOptions } from './payments.ts';
export type { PipelineOptions, PipelineRunResult } from './pipelines.ts';

export interface ConnectOptions {
  brokerUrl: string;
  /**
   * This client's key (role app, router or bridge): its id is the client id and it proves the client
   * to the broker on CONNECT. When absent, an ephemeral app key is made, which only an open broker accepts.
   */
  identity?: Identity;
  /**
   * @deprecated Ids derive from keys: pass `identity`. A free-form id given without an identity
   * connects anonymously, which only an open broker accepts; with an identity it must equal its id.
   */
  clientId?: string;
  /**
   * Use only agents whose status is signed by the key their id derives from (default true). Other
   * statuses, offline ones included, and load reports of agents without a verified status are
   * ignored (and counted in `mesh.counters`).
   */
  requireSignedStatus?: boolean;
  /** CA, and for mutual TLS this client's certificate and key, for an `mqtts://` broker (docs/operations.md, "TLS"). */
  tls?: MeshTlsOptions;
  /**
   * Username and password for an external broker that checks passwords, sent on every (re)connect instead of the
   * identity's CONNECT token (docs/operations.md, "External brokers").
   */
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
  /**
   * How long `connect` waits for the first connection before it fails with MESH_NOT_CONNECTED (default 30 000; the
   * last refusal or TLS failure seen, if any, is the error's cause). A TLS failure or an unauthorized CONNECT fails it
   * at once, with MESH_TLS or MESH_UNAUTHORIZED.
   */
  connectTimeoutMs?: number;
  /** Deadline used when `infer` is given none. */
  defaultDeadlineMs?: number;
  /** Agents tried per request, the first included (default 3). */
  maxAttempts?: number;
  /**
   * Lower bound of the wait before a slow attempt is hedged: the same request also goes to another
   * agent, the first answer wins and the other is cancelled. A slow attempt is never abandoned.
   */
  minHedgeAfterMs?: number;
  /**
   * Id of a router to ask for route leases (direct mode). Requests still go straight to agents; the
   * router only says which ones. Unset: the SDK routes by itself.
   */
  router?: string;
  /** Retry and hedge budget (the client layer's TailBudget; default: extras ≤ 20 % of requests, hedges ≤ 5 %). */
  tailBudget?: Partial<TailBudgetOptions>;
  /** How long to wait for a lease before routing by itself, ms (default 150). */
  leaseTimeoutMs?: number;
  /** A load report older than this no longer counts; the agent's status still does. */
  loadStaleMs?: number;
  maxMessageBytes?: number;
  keepaliveS?: number;
  backoff?: BackoffOptions;
  /** A pino logger, or anything with its debug/info/warn/error methods (default: silent). */
  logger?: MeshLogger;
  /**
   * Pay agents that quote a price on this chain and escrow: each request names this payer's lane,
   * each receipt is checked, and verified work is paid with EIP-712 vouchers (docs/settlement.md).
   */
  payment?: PaymentOptions;
  /**
   * Pipelines `pipeline()` runs besides the built-in `wakeword` (docs/pipelines.md); one with the same name
   * replaces it. The OCR pipeline needs its dictionary: `ocrPipeline({ dictionary })`.
   */
  pipelines?: readonly PipelineDefinition[];
}

export interface InferOptions {
  /** Time budget from now; the absolute deadline travels with the request. */
  deadlineMs?: number;
  /** Send only to this agent: one attempt, no failover, retry or hedge. */
  agentId?: string;
  /** Never send to these agents (a pipeline stage retried after refusing an agent's answer). */
  excludeAgents?: ReadonlySet<string>;
  /**
   * Checks an answer's outputs before it is accepted and paid: throwing refuses them. The request then fails with
   * MESH_BAD_TENSOR (`details.refused` 'outputs', `details.agentId`), and on a paid request the agent's receipt for
   * them is not paid. A pipeline checks each stage's outputs this way (docs/pipelines.md).
   */
  checkOutputs?: (outputs: Record<string, Tensor>) => void;
  /**
   * Gives up on the request: it fails with MESH_CANCELLED and every attempt still running is cancelled. On a
   * paid request to a model that runs in units, the agent is paid for the units whose outputs came before
   * the cancel reached it (docs/settlement.md, "Progress receipts").
   */
  signal?: AbortSignal;
  /**
   * Called with each progress message of a model that runs in units (docs/agent.md): the units done so far
   * and the outputs of the ones since the last call. Paid requests only; the result still carries every unit.
   */
  onProgress?: (progress: { agentId: string; units: number; outputs: Record<string, Tensor> }) => void;
}

export interface InferTimings {
  /** From the call to the result, retries included. */
  totalMs: number;
  /** Time in the serving agent's queue. */
  queueMs: number;
  /** Time the serving agent's runtime computed. */
  execMs: number;
  /** The rest of the final attempt: MQTT hops, encoding and validation. */
  networkMs: number;
}

export interface InferResult {
  requestId: string;
  model: string;
  agentId: string;
  outputs: Record<string, Tensor>;
  timings: InferTimings;
  attempts: number;
  /** The router whose lease chose the first attempt's agent; undefined when the SDK chose by itself. */
  routedBy: string | undefined;
}

export interface AgentView {
  id: string;
  status: AgentStatus;
  load: AgentLoad | undefined;
  /** Requests this client has outstanding there. */
  outstanding: number;
  /**
   * The agent's queue as its last reply to this client gave it (requests held, and that as work in ms;
   * NaN when it gave none), bounded by what its status says it can hold: see docs/routing.md.
   */
  claimedQueue: { rif: number; workMs: number } | undefined;
}

export interface MeshCounters {
  /** Statuses dropped because they were unsigned, mis-signed or signed by a key their id does not derive from. */
  statusRejected: number;
  /** Statuses dropped because they did not decode as a status or named another agent than their topic. */
  statusMalformed: number;
  /** Statuses held back, then replaced by the agent's next, because it sent more status bytes than its budget. */
  statusDeferred: number;
  /** Offline statuses (late last wills) dropped because they name an older session than the agent's live one. */
  staleOffline: number;
  /** Retained statuses dropped because a status of the same session had already come live on this connection. */
  staleRetained: number;
  /** Load reports dropped because their agent has no verified status here. */
  loadIgnored: number;
  /** Route leases received from the router, requests whose first attempt followed one, and requests the SDK routed itself although a router was set. */
  leases: number;
  routed: number;
  leaseFallbacks: number;
  /** Attempts beyond the first, by kind (the request engine's counts): failovers from lost agents, paid retries, hedges; and per-try timeouts. */
  failovers: number;
  retries: number;
  hedges: number;
  timeouts: number;
  /** Attempts given up because their agent went silent (no heartbeat for a few periods, no last will yet). */
  silenced: number;
  /**
   * Paid requests held back before their first attempt because no agent serving them had room in its credit
   * window by this client's count, and of those, the ones that failed (MESH_CREDIT_EXCEEDED) for want of it.
   */
  creditHeld: number;
  creditFailed: number;
  /**
   * Not a count but a level: paid requests remembered now for the receipts still owed for them (0 without `payment`).
   * A request is forgotten once it is over and the final receipt of each attempt is in (docs/settlement.md).
   */
  paidRequestsRemembered: number;
}

export interface Mesh {
  readonly clientId: string;
  readonly counters: Readonly<MeshCounters>;
  infer(model: string, inputs: Record<string, Tensor>, options?: InferOptions): Promise<InferResult>;
  /**
   * Runs a pipeline (docs/pipelines.md): each model stage an ordinary request (routed, paid, receipted) to
   * whichever agent is best for its model, within one deadline; the steps between run here.
   */
  pipeline(name: string, inputs: Record<string, Tensor>, options?: PipelineOptions): Promise<PipelineRunResult>;
  /** The pipelines `pipeline()` knows, by name. */
  pipelines(): PipelineDefinition[];
  /** Live agents as this client sees them. */
  agents(): AgentView[];
  /** Models served by at least one live agent. */
  models(): ModelInfo[];
  /** Resolves once a live agent serves `model` (or, with `count`, that many agents). */
  waitForModel(model: string, timeoutMs?: number, count?: number): Promise<void>;
  /**
   * Publishes a raw payload as this client. The broker's ACLs decide what a role may publish: a
   * bridge publishes its devices' availability (retained) and telemetry here. Rejects with
   * MESH_NOT_CONNECTED while the broker is unreachable.
   */
  publish(topic: string, payload: Uint8Array, options?: { retain?: boolean; qos?: 0 | 1 }): Promise<void>;
  /** Payment lanes, one per paid agent: owed (verified receipts) and paid (signed vouchers). Empty without `payment`. */
  lanes(): LaneView[];
  /**
   * Resolves once the receipts of the answers already in have come (an agent signs a paid answer's receipt after
   * the answer leaves, and sends it on its next answer to this client or within some 20 ms), or after `timeoutMs`
   * (default 2,000); true when none is still due. Read `lanes()` after it to see every answer billed.
   */
  receiptsIn(timeoutMs?: number): Promise<boolean>;
  close(): Promise<void>;
}

const SENDER_ROLES: ReadonlySet<string> = new Set(['app', 'router', 'bridge']);

export async function connect(options: ConnectOptions): Promise<Mesh> {
  const {
    brokerUrl,
    requireSignedStatus = true,
    defaultDeadlineMs = 1_000,
    maxAttempts = 3,
    minHedgeAfterMs = 200,
    loadStaleMs = 5_000,
    maxMessageBytes = DEFAULT_MAX_MESSAGE_BYTES,
    keepaliveS = 10,
    backoff,
    leaseTimeoutMs = 150,
    connectTimeoutMs = 30_000,
  } = options;
  if (!Number.isFinite(connectTimeoutMs) || connectTimeoutMs <= 0)
    throw new MeshError('MESH_CONFIG', `connectTimeoutMs must be a positive number, got ${connectTimeoutMs}`);
  const routerId = options.router === undefined ? undefined : assertValidId(options.router, 'router id');
  // A free-form clientId without an identity is the deprecated anonymous mode (open brokers only).
  const identity = options.identity ?? (options.clientId === undefined ? generateIdentity('app') : undefined);
  const ephemeral = options.identity === undefined;
  if (identity && !SENDER_ROLES.has(identity.role)) {
    throw new MeshError('MESH_CONFIG', `an SDK client needs an app, router or bridge key, got a ${identity.role} key (${identity.id})`);
  }
  if (identity && options.clientId !== undefined && options.clientId !== identity.id) {
    throw new MeshError(
      'MESH_CONFIG',
      `clientId ${JSON.stringify(options.clientId)} must be the identity's id ${identity.id} (or be left out)`,
    );
  }
  const clientId = assertValidId(identity?.id ?? options.clientId, 'client id');
  if (!Number.isInteger(maxAttempts) || maxAttempts < 1)
    throw new MeshError('MESH_CONFIG', `maxAttempts must be a positive integer, got ${maxAttempts}`);
  const logger = childLogger(options.logger, { part: 'sdk', clientId });
  const clock = systemClock;

  let client!: MqttClient;
  const publishQos = options.publishQos ?? 1;
  let payments: PayerLanes | undefined;
  if (options.payment) {
    // Loaded on demand: an app that does not pay never loads the payment code.
    const { PayerLanes } = await import('./payments.ts');
    payments = await PayerLanes.open(
      options.payment,
      clientId,
      (topic, payload) => client.publish(topic, payload, { qos: publishQos }),
      logger,
    );
  }

  const counters = { leases: 0, routed: 0, leaseFallbacks: 0 };
  const fleet = createFleetView({
    requireSignedStatus,
    maxMessageBytes,
    loadStaleMs,
    now: clock.now,
    logger,
    onStatus: (status) => payments?.onStatus(status.agent, status),
    onAgentLost: (agentId, reason) =>
      engine.agentLost(
        agentId,
        new MeshError('MESH_AGENT_LOST', `agent ${agentId} ${reason === 'offline' ? 'went offline' : 'restarted'}`, {
          details: { agentId },
        }),
      ),
  });
  const policy = createSdkPolicy({
    fleet,
    minHedgeAfterMs,
    onRouted: (routed) => (routed ? counters.routed++ : counters.leaseFallbacks++),
    onCancelled: (key, agentId) => payments?.noteCancel(key, agentId),
    retrySameAfter: (agentId, error, key, model, deadlineAt) =>
      // The agent waits for a voucher this client is about to send: try it again once that is out and, by
      // this client's count, its window has room for the request (or the deadline is near).
      error.code === 'MESH_CREDIT_EXCEEDED' && payments?.owes(agentId)
        ? payments.flush().then(() => waitForCredit(key, model, (id) => id === agentId, deadlineAt, false))
        : undefined,
    // Agents whose credit window has no room for the request now are passed over while another has room.
    creditRoom: (agentId, key, model) => payments?.room(agentId, key, model) ?? 'room',
  });
  const engine = createRequestEngine<SdkRequest, SdkReply>({
    policy,
    clock,
    budget: new TailBudget(options.tailBudget ?? {}, clock.now()),
    maxAttempts,
    // An agent silent for a few heartbeats is presumed dead before its last will arrives.
    liveness: { isSilent: (agentId, now) => fleet.silent(agentId, now) },
    transport: mqttTransport({
      client: () => client,
      senderId: clientId,
      qos: publishQos,
      payload: (attempt) => attempt.request.data.payloadFor(attempt.agentId),
      onSendFailed: (attempt, error) => engine.unsent(attempt.request.key, attempt.agentId, error),
    }),
  });
  const leases: LeaseBook | undefined = routerId
    ? createLeaseBook({
        router: routerId,
        timeoutMs: leaseTimeoutMs,
        now: clock.now,
        logger,
        maxMessageBytes,
        onLease: () => counters.leases++,
        ask(id, model, budgetMs, bytes, sent) {
          if (!client.connected) return sent(false);
          // The router never sees replies in direct mode: it is told which agents this client saw fail lately.
          const exclude = policy.suspects(model, clock.now());
          client.publish(
            topics.routerRoute(routerId, clientId),
            encodeMessage({ v: PROTOCOL_VERSION, kind: 'route', id, model, budgetMs, bytes, ...(exclude.length > 0 ? { exclude } : {}) }),
            { qos: publishQos },
            (err) => sent(!err),
          );
        },
      })
    : undefined;

  const progressListeners = new Map<string, NonNullable<InferOptions['onProgress']>>();
  const outputChecks = new Map<string, NonNullable<InferOptions['checkOutputs']>>();
  // The payment side of answers, taken in the order they came once the app has them (takeAnswers): what an answer
  // brings for payment (the receipts of earlier answers, where its lane stands) is not on the app's path.
  const answersToTake: (() => void)[] = [];
  const takeAnswers = () => {
    for (const take of answersToTake.splice(0)) take();
  };
  const onReply = (agentId: string, payload: Buffer) => {
    const reading = readReply(agentId, payload, maxMessageBytes);
    if (!reading) {
      logger.debug({ agentId }, 'ignoring bad reply');
      return;
    }
    fleet.heard(agentId);
    // Anything else for payment comes after the answers that came before it.
    if (payments && !reading.reply) takeAnswers();
    if (reading.batch) {
      payments?.onReceiptBatch(agentId, reading.batch);
      return;
    }
    // Progress of a job that runs in units: its partial receipt is paid for the unit outputs it brought.
    if (reading.progress) {
      payments?.onProgress(agentId, reading.key, reading.progress);
      const listener = progressListeners.get(reading.key);
      if (listener) {
        try {
          listener({ agentId, units: reading.progress.units, outputs: decodeTensorMap(reading.progress.outputs) });
        } catch (err) {
          logger.debug({ agentId, err: (err as Error).message }, 'progress not delivered');
        }
      }
      return;
    }
    // The app's check of the outputs comes first: outputs it refuses are not paid.
    let outputs: Record<string, Tensor> | undefined;
    let refusal: MeshError | undefined;
    if (!reading.error) {
      try {
        outputs = decodeTensorMap(reading.reply!.outputs);
        outputChecks.get(reading.key)?.(outputs);
      } catch (err) {
        refusal = new MeshError('MESH_BAD_TENSOR', `agent ${agentId} answered with outputs refused: ${(err as Error).message}`, {
          cause: err,
          details: { agentId, requestId: reading.key, refused: 'outputs' },
        });
      }
    }
    // Every receipt is linked, a late or hedged attempt's too: the lane's chain runs through all of them.
    // Every reply also gives back the credit held for its attempt. An answer is taken for payment at the end of
    // this turn (its outputs hashed and its time noted now), the receipts of earlier answers it carries first:
    // they come before its own in the lane. An error is taken at once, after the answers before it.
    if (payments) {
      const { key } = reading;
      const kind = reading.error ? 'err' : 'res';
      const came = { arrivedAt: Date.now(), outputHash: reading.reply ? hashTensorMap(reading.reply.outputs) : undefined };
      const earlier = reading.reply?.earlier;
      const refused = refusal !== undefined;
      const take = () => {
        if (earlier) payments.onReceipts(agentId, earlier);
        payments.onReply(agentId, key, kind, reading.receipt, undefined, reading.lane, refused, came);
      };
      // An error has no reply: the answers before it were taken on its arrival, above.
      if (reading.error) take();
      else if (answersToTake.push(take) === 1) setImmediate(takeAnswers);
    }
    if (reading.error) {
      const better = reading.error.code === 'MESH_FORBIDDEN' ? payments?.onForbidden(agentId, reading.error) : undefined;
      engine.fail(reading.key, agentId, better ?? reading.error);
      return;
    }
    if (refusal) {
      engine.fail(reading.key, agentId, refusal);
      return;
    }
    engine.answer(reading.key, agentId, { reply: reading.reply!, outputs: outputs! });
  };

  let refusedFirst: ((err: MeshError) => void) | undefined;
  let subscribedBefore = false;
  const connection: MeshConnection = openMeshConnection(brokerUrl, {
    clientId,
    ...(identity ? { identity } : {}),
    ...(options.tls ? { tls: options.tls } : {}),
    ...(options.username !== undefined ? { username: options.username } : {}),
    ...(options.password !== undefined ? { password: options.password } : {}),
    keepaliveS,
    // One CONNECT attempt may not outlast the whole wait for the first connection.
    connectTimeoutMs: Math.min(5_000, connectTimeoutMs),
    ...(backoff ? { backoff } : {}),
    onConnect: (c: MqttClient) => {
      fleet.onConnect();
      const filters = [topics.clientRepliesFor(clientId), topics.allAgentStatus(), topics.allAgentLoad()];
      // Only the named router's leases: any admitted router may publish to `lease/+` of any client, and each message
      // costs a small device a read and a decode before it is dropped.
      if (routerId) filters.push(topics.clientLease(clientId, routerId));
      subscribeOrReconnect(
        c,
        filters,
        options.subscriptionQos ?? 1,
        (reason) => logger.error({ err: reason }, 'subscribe failed; reconnecting'),
        () => {
          // Agents announce again: a broker may not hand this connection their retained statuses (RabbitMQ 3.10).
          c.publish(topics.discover(clientId), Buffer.alloc(0), { qos: 0 });
          // Requests in flight when the connection dropped go out again, now that their replies can come back.
          if (subscribedBefore) {
            const resent = engine.resendInFlight();
            if (resent > 0) logger.info({ resent }, 'requests in flight sent again after the reconnect');
          }
          subscribedBefore = true;
        },
      );
    },
    onReconnectScheduled: (delayMs) => logger.warn({ delayMs }, 'broker connection lost; reconnecting'),
    onRefused: (err, first) => {
      if (first && (err.code === 'MESH_UNAUTHORIZED' || err.code === 'MESH_TLS') && refusedFirst) return refusedFirst(err);
      logger.error({ code: err.code, err: err.message }, 'broker refused the connection; retrying');
    },
  });
  client = connection.client;
  // Writes from a reply's arrival to this event-loop turn's check phase leave together: the reply's PUBACK, which
  // mqtt.js writes once the handler returns (mqtt.js lib/handlers/publish.js), and whatever the app sends in its
  // continuation, most often its next request: one write, and one read at the broker, instead of two
  // (docs/sdk.md, "Writes"; turnWriteHold).
  const holdWrites = turnWriteHold(() => client.stream);
  client.on('message', (topic, payload, packet) => {
    const parsed = parseTopic(topic);
    if (!parsed) return;
    if (parsed.kind === 'reply') {
      if (parsed.clientId !== clientId) return;
      holdWrites();
      onReply(parsed.agentId, payload);
    } else if (parsed.kind === 'status') fleet.onStatus(parsed.agentId, payload, packet.retain);
    else if (parsed.kind === 'load') fleet.onLoad(parsed.agentId, payload);
    else if (parsed.kind === 'lease' && parsed.clientId === clientId && parsed.routerId === routerId) leases?.onLeaseMessage(payload);
  });
  // A first CONNECT refused as unauthorized, or a failed TLS handshake, is final: waiting would hang the app on a broker
  // that will never let it in. Anything else is retried until connectTimeoutMs.
  let connectTimer: NodeJS.Timeout | undefined;
  try {
    await Promise.race([
      connection.firstConnect,
      new Promise<never>((_, reject) => {
        connectTimer = setTimeout(() => {
          const last = connection.refusal;
          reject(
            new MeshError(
              'MESH_NOT_CONNECTED',
              `no connection to the broker within ${connectTimeoutMs} ms${last ? `: ${last.message}` : ' (is it up, and is this the right port and scheme, mqtt:// or mqtts://?)'}`,
              { ...(last ? { cause: last } : {}), details: { clientId, connectTimeoutMs, ...(last ? { lastCode: last.code } : {}) } },
            ),
          );
        }, connectTimeoutMs);
        refusedFirst = (err) => {
          if (err.code === 'MESH_TLS') return reject(err);
          const hint = !identity
            ? 'a client id without an identity connects anonymously, which only an open broker accepts: pass an identity the operator admitted'
            : ephemeral
              ? 'without an identity the SDK uses an ephemeral key, which only an open broker accepts: pass an identity the operator admitted'
              : 'is this client admitted (edge-mesh admit) and not revoked?';
          reject(new MeshError('MESH_UNAUTHORIZED', `${err.message}; ${hint}`, { cause: err, details: { clientId } }));
        };
      }),
    ]);
  } catch (err) {
    await connection.close();
    throw err;
  } finally {
    refusedFirst = undefined;
    clearTimeout(connectTimer);
  }

  /**
   * Whether request `key` must wait for credit: undefined when one of the agents serving `model` that
   * `eligible` accepts has room in its credit window by this client's count (or none serves it: the engine
   * says so), else a promise that resolves when credit may have been freed, to ask again. When no agent could
   * ever have room, or at `deadlineAt` (engine clock), it throws MESH_CREDIT_EXCEEDED (`details.reason`
   * 'window-too-small' or 'no-room') when `failAtEnd`, else returns undefined (the agent is tried anyway,
   * and its refusal ends the attempt). Synchronous when there is room, so that nothing runs between the
   * check and the attempt it lets through.
   */
  const creditWait = (
    key: string,
    model: string,
    eligible: (agentId: string) => boolean,
    deadlineAt: number,
    failAtEnd: boolean,
  ): Promise<void> | undefined => {
    if (!payments) return undefined;
    const agents = fleet
      .online(model)
      .map((a) => a.id)
      .filter(eligible);
    const rooms = agents.map((id) => payments!.room(id, key, model));
    if (agents.length === 0 || rooms.includes('room')) return undefined;
    const left = deadlineAt - clock.now();
    if (rooms.every((r) => r === 'taken')) {
      if (!failAtEnd) return undefined;
      creditCounters.creditFailed++;
      throw new MeshError(
        'MESH_FORBIDDEN',
        `every agent serving ${model} serves this payer's lane to another client: ${payments.takenReason(agents[0]!)}`,
        { details: { reason: 'lane-taken', model, agents } },
      );
    }
    const never = rooms.every((r) => r === 'never' || r === 'taken');
    if (never || left <= 0) {
      if (!failAtEnd) return undefined;
      creditCounters.creditFailed++;
      throw new MeshError(
        'MESH_CREDIT_EXCEEDED',
        never
          ? `no agent serving ${model} quotes a credit window this request fits in (beside receipts this client refused)`
          : `no credit window had room for this request before its deadline: the unpaid work and requests in flight on every lane serving ${model} fill it`,
        { details: { reason: never ? 'window-too-small' : 'no-room', model, agents } },
      );
    }
    return payments.whenRoom(agents, left);
  };
  /** Waits (see creditWait) until there is room; resolves with no await after the last check. */
  const waitForCredit = async (
    key: string,
    model: string,
    eligible: (agentId: string) => boolean,
    deadlineAt: number,
    failAtEnd: boolean,
  ): Promise<void> => {
    let wait = creditWait(key, model, eligible, deadlineAt, failAtEnd);
    while (wait) {
      await wait;
      wait = creditWait(key, model, eligible, deadlineAt, failAtEnd);
    }
  };
  const creditCounters = { creditHeld: 0, creditFailed: 0 };

  const infer = async (model: string, inputs: Record<string, Tensor>, inferOptions: InferOptions = {}): Promise<InferResult> => {
    const { deadlineMs = defaultDeadlineMs, agentId: pinned, signal, onProgress, excludeAgents, checkOutputs } = inferOptions;
    if (signal?.aborted) throw new MeshError('MESH_CANCELLED', 'the request was aborted before it was sent');
    for (const [name, tensor] of Object.entries(inputs)) checkTensor(name, tensor);
    const startedAt = clock.now();
    const deadline = Date.now() + deadlineMs;
    const deadlineAt = startedAt + deadlineMs;
    const id = newRequestId();
    const key = requestIdHex(id);
    // The request owns a copy of the inputs' bytes (a microsecond for a wake-word frame): an app may fill its buffer
    // again as soon as this returns, while attempts are encoded later and the payer hashes the inputs later.
    const wire = encodeTensorMap(inputs);
    for (const t of Object.values(wire)) t.data = t.data.slice();
    const request: InferRequest = { v: PROTOCOL_VERSION, kind: 'req', id, deadline, model, inputs: wire };
    // Encoded when first needed: a paid attempt is encoded with its payment field instead.
    let plain: Uint8Array | undefined;
    const payload = () => (plain ??= encodeMessage(request));
    payments?.noteRequest(key, deadline, request.inputs);
    const payloadFor = (agentId: string): Uint8Array => {
      const pay = payments?.payField(agentId);
      if (!pay) return payload();
      payments!.noteAttempt(key, agentId, model);
      return encodeMessage({ ...request, pay });
    };

    let lease: Awaited<ReturnType<LeaseBook['leaseFor']>>;
    const eligible = (id: string) => (pinned === undefined || id === pinned) && !excludeAgents?.has(id);
    try {
      // Before the first attempt, wait (within the deadline) for an agent to announce the model, and for
      // the lanes being opened with agents that announced themselves (a payout check on chain, a grant).
      while (!policy.hasCandidate(model, pinned) && clock.now() < deadlineAt) await fleet.changes.wait(deadlineAt - clock.now());
      if (payments) await payments.ready();
      lease = leases && !pinned ? await leases.leaseFor(model, Math.max(0, deadlineAt - clock.now()), payload().byteLength) : undefined;

      // A paid request waits here (within its deadline) until an agent that serves it has room in its credit
      // window by this client's count, instead of drawing MESH_CREDIT_EXCEEDED; nothing is awaited between the
      // last check and the first attempt, so requests released together cannot overfill a window.
      let creditHold = creditWait(key, model, eligible, deadlineAt, true);
      if (creditHold) creditCounters.creditHeld++;
      while (creditHold) {
        await creditHold;
        if (signal?.aborted) throw new MeshError('MESH_CANCELLED', 'the request was aborted while it waited for credit');
        if (closing) throw new MeshError('MESH_NOT_CONNECTED', 'client closed while the request waited for credit');
        creditHold = creditWait(key, model, eligible, deadlineAt, true);
      }
    } catch (err) {
      // Given up before any attempt: no receipt is owed for it, and the payer forgets it.
      payments?.noteSettled(key);
      throw err;
    }
    const data: SdkRequest = {
      model,
      payloadFor,
      lease,
      viaRouter: leases !== undefined && !pinned,
      pinned,
      routedBy: undefined,
      ...(excludeAgents?.size ? { excluded: excludeAgents } : {}),
    };
    if (onProgress) progressListeners.set(key, onProgress);
    if (checkOutputs) outputChecks.set(key, checkOutputs);
    const onAbort = () => engine.abort(key, new MeshError('MESH_CANCELLED', 'the request was aborted by its sender'));
    signal?.addEventListener('abort', onAbort, { once: true });
    return new Promise<InferResult>((resolve, reject) => {
      engine.start({ key, deadlineAt, data, model, ...(pinned ? { maxAttempts: 1 } : {}) }, (outcome) => {
        // No attempt starts after this; the request is forgotten once the receipts of those made are in.
        payments?.noteSettled(key);
        progressListeners.delete(key);
        outputChecks.delete(key);
        signal?.removeEventListener('abort', onAbort);
        if (!outcome.ok) {
          reject(outcome.error);
          return;
        }
        const { reply } = outcome.reply;
        const now = clock.now();
        resolve({
          requestId: key,
          model,
          agentId: outcome.attempt.agentId,
          outputs: outcome.reply.outputs,
          timings: {
            totalMs: now - startedAt,
            queueMs: reply.queueMs,
            execMs: reply.execMs,
            networkMs: Math.max(0, now - outcome.attempt.sentAt - reply.queueMs - reply.execMs),
          },
          attempts: outcome.tried.length,
          routedBy: data.routedBy,
        });
      });
    });
  };

  const pipelines = createPipelines(options.pipelines ?? [], infer, defaultDeadlineMs);

  let closing: Promise<void> | undefined;
  return {
    clientId,
    get counters() {
      const { failovers, retries, hedges, timeouts, silent } = engine.counters;
      return {
        ...counters,
        statusRejected: fleet.counters.statusRejected,
        statusMalformed: fleet.counters.statusMalformed,
        statusDeferred: fleet.counters.statusDeferred,
        staleOffline: fleet.counters.staleOffline,
        staleRetained: fleet.counters.staleRetained,
        loadIgnored: fleet.counters.loadIgnored,
        failovers,
        retries,
        hedges,
        timeouts,
        silenced: silent,
        ...creditCounters,
        paidRequestsRemembered: payments?.remembered ?? 0,
      };
    },
    infer,
    pipeline: pipelines.run,
    pipelines: pipelines.list,
    agents: () =>
      [...fleet.all()]
        .filter((a) => a.status.state !== 'offline')
        .map((a) => ({
          id: a.id,
          status: a.status,
          load: a.load,
          outstanding: policy.outstanding(a.id),
          claimedQueue: policy.claimedQueue(a.id),
        })),
    models: () => fleet.models(),
    waitForModel(model, timeoutMs = 10_000, count = 1) {
      return waitUntil(
        fleet.changes,
        () => fleet.online(model).length >= count,
        timeoutMs,
        () => new MeshError('MESH_NO_AGENT', `no live agent serves model ${model} after ${timeoutMs} ms`),
      );
    },
    publish(topic, payload, { retain = false, qos = 1 } = {}) {
      if (!client.connected) {
        // A broker limit (CONNACK 3) says why better than "not connected": MESH_RATE_LIMITED, retried until it ends.
        return Promise.reject(connection.refusal ?? new MeshError('MESH_NOT_CONNECTED', 'not connected to the broker'));
      }
      return new Promise<void>((resolve, reject) => {
        client.publish(topic, Buffer.from(payload.buffer, payload.byteOffset, payload.byteLength), { qos, retain }, (err) =>
          err ? reject(new MeshError('MESH_NOT_CONNECTED', err.message, { cause: err })) : resolve(),
        );
      });
    },
    close() {
      // Closing twice waits for the first close (the lanes' store and the connection close once).
      closing ??= (async () => {
        leases?.close();
        engine.close(new MeshError('MESH_NOT_CONNECTED', 'client closed'));
        // Vouchers being signed still go out before the connection closes.
        takeAnswers();
        await payments?.close();
        await connection.close();
      })();
      return closing;
    },
    lanes: () => {
      takeAnswers();
      return payments?.lanesView() ?? [];
    },
    receiptsIn: (timeoutMs = 2_000) => {
      takeAnswers();
      return payments?.receiptsIn(timeoutMs) ?? Promise.resolve(true);
    },
  };
}
