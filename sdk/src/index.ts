/**
 * What an IoT app imports.
 *
 *   const identity = parseKeyFile(await readFile('app.key', 'utf8'));   // admitted by the operator
 *   const mesh = await connect({ brokerUrl: 'mqtt://127.0.0.1:1883', identity });
 *   const { outputs, agentId, timings } = await mesh.infer('kws', { x: tensor }, { deadlineMs: 50 });
 *
 * With `router` set to a router's id, the SDK asks that router for a route lease per model (a few
 * ranked agents, valid for a short while) and sends straight to the agents, one hop fewer than
 * forwarding through the router. Without a router, or when the router does not answer in time, it
 * picks among live agents itself from their retained status and load heartbeats (lowest expected
 * latency). Either way it retries on another agent within the deadline when one is busy, silent or
 * dies, and hedges an attempt that runs far over its prediction.
 */

import {
  type BackoffOptions,
  changeSignal,
  childLogger,
  extraAttemptAfter,
  type MeshConnection,
  type MeshLogger,
  openMeshConnection,
  readAgentStatus,
  readReply,
  TailBudget,
  type TailBudgetOptions,
} from '@edge-mesh/client';
import {
  type AgentLoad,
  type AgentStatus,
  assertValidId,
  checkTensor,
  DEFAULT_MAX_MESSAGE_BYTES,
  decodeMessage,
  decodeTensorMap,
  encodeMessage,
  encodeTensorMap,
  generateIdentity,
  type Identity,
  type InferReply,
  type Lease,
  type LeaseAgent,
  MeshError,
  type MeshErrorCode,
  type ModelInfo,
  newRequestId,
  PROTOCOL_VERSION,
  parseTopic,
  requestIdHex,
  type Tensor,
  topics,
} from '@edge-mesh/protocol';
import type { MqttClient } from 'mqtt';
import { type LaneView, PayerLanes, type PaymentOptions } from './payments.ts';

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
  /** Deadline used when `infer` is given none. */
  defaultDeadlineMs?: number;
  /** Attempts per request, the first included. */
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
  /** Retry and hedge budget (protocol/budget.ts; default: extras ≤ 20 % of requests, hedges ≤ 5 %). */
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
   * each receipt is checked, and verified work is paid with EIP-712 vouchers (see sdk/payments.ts).
   */
  payment?: PaymentOptions;
}

export interface InferOptions {
  /** Time budget from now; the absolute deadline travels with the request. */
  deadlineMs?: number;
  /** Send only to this agent (no retries elsewhere). */
  agentId?: string;
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
}

export interface MeshCounters {
  /** Statuses dropped because they were unsigned, mis-signed or signed by a key their id does not derive from. */
  statusRejected: number;
  /** Load reports dropped because their agent has no verified status here. */
  loadIgnored: number;
  /** Route leases received from the router, requests whose first attempt followed one, and requests the SDK routed itself although a router was set. */
  leases: number;
  routed: number;
  leaseFallbacks: number;
}

export interface Mesh {
  readonly clientId: string;
  readonly counters: Readonly<MeshCounters>;
  infer(model: string, inputs: Record<string, Tensor>, options?: InferOptions): Promise<InferResult>;
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
  close(): Promise<void>;
}

interface AgentEntry {
  status: AgentStatus;
  load: AgentLoad | undefined;
  loadReceivedAt: number;
  outstanding: number;
  /** Expected service time of the requests this client has outstanding there. */
  outstandingWorkMs: number;
  /** EWMA of the part of a round trip spent outside the agent's queue and runtime. */
  networkMs: number;
  /** Until this time (performance.now()) the agent is only used when nothing else is left. */
  suspectUntil: number;
}

/** One request in flight; it may have attempts on several agents at once (after a hedge). */
interface InFlight {
  /** Agents holding an attempt, with when it was sent and its expected service time. */
  attempts: Map<string, { sentAt: number; workMs: number; extra: boolean }>;
  onAnswer: (agentId: string, reply: InferReply | undefined, err: MeshError | undefined) => void;
}

const NETWORK_EWMA_ALPHA = 0.2;
const INITIAL_NETWORK_MS = 1;
const SUSPECT_MS = 3_000;
/** Codes after which another agent may well succeed. */
const RETRY_ELSEWHERE: ReadonlySet<MeshErrorCode> = new Set([
  'MESH_BUSY',
  'MESH_AGENT_LOST',
  'MESH_SHUTTING_DOWN',
  'MESH_UNKNOWN_MODEL',
  'MESH_INFERENCE_FAILED',
  'MESH_CREDIT_EXCEEDED',
]);

/** A lease stays usable this many times its ttl while a fresh one is on its way. */
const LEASE_STALE_FACTOR = 4;

interface LeaseState {
  agents: LeaseAgent[];
  /** performance.now() times. */
  freshUntil: number;
  usableUntil: number;
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
  } = options;
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

  let client!: MqttClient;
  const payments = options.payment
    ? await PayerLanes.open(options.payment, clientId, (topic, payload) => client.publish(topic, payload, { qos: 1 }), logger)
    : undefined;

  const counters: MeshCounters = { statusRejected: 0, loadIgnored: 0, leases: 0, routed: 0, leaseFallbacks: 0 };
  const budget = new TailBudget(options.tailBudget ?? {}, performance.now());
  const leases = new Map<string, LeaseState>();
  /** Route requests on their way, by request id, and the model each is for (one at a time per model). */
  const leaseWaiters = new Map<string, (lease: Lease | undefined) => void>();
  const leasesComing = new Map<string, Promise<LeaseState | undefined>>();
  const agents = new Map<string, AgentEntry>();
  const pending = new Map<string, InFlight>();
  const changes = changeSignal();

  const failOutstanding = (agentId: string, code: MeshErrorCode, message: string) => {
    for (const request of [...pending.values()]) {
      if (request.attempts.has(agentId)) request.onAnswer(agentId, undefined, new MeshError(code, message, { details: { agentId } }));
    }
  };

  const onStatus = (agentId: string, payload: Buffer) => {
    if (payload.length === 0) {
      agents.delete(agentId);
      return;
    }
    const reading = readAgentStatus(agentId, payload, { maxBytes: maxMessageBytes, requireSigned: requireSignedStatus });
    if (!reading.ok) {
      if (reading.reason === 'unverified') counters.statusRejected++;
      logger.debug({ agentId, reason: reading.reason, err: reading.message }, 'ignoring status');
      return;
    }
    const { status } = reading;
    payments?.onStatus(agentId, status);
    const known = agents.get(agentId);
    if (status.state === 'offline') {
      if (known) {
        agents.delete(agentId);
        failOutstanding(agentId, 'MESH_AGENT_LOST', `agent ${agentId} went offline`);
        logger.info({ agentId }, 'agent offline');
      }
      changes.notify();
      return;
    }
    if (known && known.status.session !== status.session) {
      failOutstanding(agentId, 'MESH_AGENT_LOST', `agent ${agentId} restarted`);
    }
    agents.set(agentId, {
      status,
      load: known && known.status.session === status.session ? known.load : undefined,
      loadReceivedAt: known?.loadReceivedAt ?? 0,
      outstanding: known?.outstanding ?? 0,
      outstandingWorkMs: known?.outstandingWorkMs ?? 0,
      networkMs: known?.networkMs ?? INITIAL_NETWORK_MS,
      suspectUntil: known?.suspectUntil ?? 0,
    });
    changes.notify();
  };

  const onLoad = (agentId: string, payload: Buffer) => {
    const entry = agents.get(agentId);
    if (!entry) {
      counters.loadIgnored++;
      return;
    }
    try {
      const load = decodeMessage(payload, ['load'], maxMessageBytes);
      if (load.agent !== agentId) return;
      entry.load = load;
      entry.loadReceivedAt = performance.now();
    } catch (err) {
      logger.debug({ agentId, err: (err as Error).message }, 'ignoring bad load report');
    }
  };

  const onReply = (agentId: string, payload: Buffer) => {
    const reading = readReply(agentId, payload, maxMessageBytes);
    if (!reading) {
      logger.debug({ agentId }, 'ignoring bad reply');
      return;
    }
    // Every receipt is checked and paid, a late or hedged attempt's too: the lane's chain runs through all of them.
    if (payments && reading.receipt) payments.onReceipt(agentId, reading.key, reading.receipt, reading.reply?.outputs);
    // A reply counts only from an agent the request went to.
    const request = pending.get(reading.key);
    if (request?.attempts.has(agentId)) request.onAnswer(agentId, reading.reply, reading.error);
  };

  const onLease = (payload: Buffer) => {
    let lease: Lease;
    try {
      lease = decodeMessage(payload, ['lease'], maxMessageBytes);
    } catch (err) {
      logger.debug({ err: (err as Error).message }, 'ignoring bad lease');
      return;
    }
    const waiter = leaseWaiters.get(requestIdHex(lease.id));
    if (waiter) waiter(lease);
  };

  /** Asks the router for a lease on `model`; undefined when it refuses or does not answer within leaseTimeoutMs. */
  const fetchLease = (model: string, budgetMs: number, bytes: number): Promise<LeaseState | undefined> => {
    const coming = leasesComing.get(model);
    if (coming) return coming;
    const id = newRequestId();
    const key = requestIdHex(id);
    const p = new Promise<LeaseState | undefined>((resolve) => {
      const timer = setTimeout(() => answer(undefined), leaseTimeoutMs);
      const answer = (lease: Lease | undefined) => {
        clearTimeout(timer);
        leaseWaiters.delete(key);
        leasesComing.delete(model);
        if (!lease || lease.agents.length === 0) {
          if (lease) logger.debug({ model, code: lease.code, err: lease.message }, 'router has no route');
          else logger.debug({ model, router: routerId }, 'no lease in time');
          return resolve(undefined);
        }
        counters.leases++;
        const now = performance.now();
        const state: LeaseState = {
          agents: lease.agents,
          freshUntil: now + lease.ttlMs,
          usableUntil: now + lease.ttlMs * LEASE_STALE_FACTOR,
        };
        leases.set(model, state);
        resolve(state);
      };
      leaseWaiters.set(key, answer);
      if (!client.connected) return answer(undefined);
      client.publish(
        topics.routerRoute(routerId!, clientId),
        encodeMessage({ v: PROTOCOL_VERSION, kind: 'route', id, model, budgetMs, bytes }),
        { qos: 1 },
        (err) => {
          if (err) answer(undefined);
        },
      );
    });
    leasesComing.set(model, p);
    return p;
  };

  /** A usable lease for `model`: a fresh one at once, a stale one while a fresh one is fetched, else waits for one. */
  const leaseFor = async (model: string, budgetMs: number, bytes: number): Promise<LeaseState | undefined> => {
    const now = performance.now();
    const held = leases.get(model);
    if (held && now < held.freshUntil) return held;
    if (held && now < held.usableUntil) {
      void fetchLease(model, budgetMs, bytes);
      return held;
    }
    return fetchLease(model, budgetMs, bytes);
  };

  let refusedFirst: ((err: MeshError) => void) | undefined;
  const connection: MeshConnection = openMeshConnection(brokerUrl, {
    clientId,
    ...(identity ? { identity } : {}),
    keepaliveS,
    ...(backoff ? { backoff } : {}),
    onConnect: (c: MqttClient) => {
      const filters = [topics.clientRepliesFor(clientId), topics.allAgentStatus(), topics.allAgentLoad()];
      if (routerId) filters.push(topics.clientLeasesFor(clientId));
      c.subscribe(filters, { qos: 1 }, (err) => {
        if (err) logger.error({ err: err.message }, 'subscribe failed');
      });
    },
    onReconnectScheduled: (delayMs) => logger.warn({ delayMs }, 'broker connection lost; reconnecting'),
    onRefused: (err, first) => {
      if (first && err.code === 'MESH_UNAUTHORIZED' && refusedFirst) return refusedFirst(err);
      logger.error({ code: err.code, err: err.message }, 'broker refused the connection; retrying');
    },
  });
  client = connection.client;
  client.on('message', (topic, payload) => {
    const parsed = parseTopic(topic);
    if (!parsed) return;
    if (parsed.kind === 'reply') {
      if (parsed.clientId === clientId) onReply(parsed.agentId, payload);
    } else if (parsed.kind === 'status') onStatus(parsed.agentId, payload);
    else if (parsed.kind === 'load') onLoad(parsed.agentId, payload);
    else if (parsed.kind === 'lease' && parsed.clientId === clientId && parsed.routerId === routerId) onLease(payload);
  });
  // A first CONNECT refused as unauthorized is final: waiting would hang the app on a broker that will never let it in.
  try {
    await Promise.race([
      connection.firstConnect,
      new Promise<never>((_, reject) => {
        refusedFirst = (err) => {
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
  }

  const serviceMsOf = (entry: AgentEntry, model: string, now: number): number => {
    const fresh = entry.load && now - entry.loadReceivedAt < loadStaleMs ? entry.load.models[model] : undefined;
    return Math.max(0.01, fresh?.serviceMs ?? entry.status.models?.find((m) => m.name === model)?.latencyMs ?? 1);
  };

  /**
   * Expected completion time on an agent: the work queued ahead (as last reported, plus what this
   * client has sent since), shared by its workers, then one service time and the network.
   */
  const expectedMs = (entry: AgentEntry, model: string, now: number): number => {
    let aheadMs = entry.outstandingWorkMs;
    if (entry.load && now - entry.loadReceivedAt < loadStaleMs) {
      for (const m of Object.values(entry.load.models)) aheadMs += (m.queued + m.inFlight) * m.serviceMs;
    }
    const workers = Math.max(1, entry.status.workers ?? 1);
    return aheadMs / workers + serviceMsOf(entry, model, now) + entry.networkMs;
  };

  const candidates = (model: string, tried: ReadonlySet<string>, pinned: string | undefined) => {
    const out: { id: string; entry: AgentEntry }[] = [];
    for (const [id, entry] of agents) {
      if (entry.status.state !== 'online' || tried.has(id)) continue;
      if (pinned && id !== pinned) continue;
      if (entry.status.models?.some((m) => m.name === model)) out.push({ id, entry });
    }
    return out;
  };

  /** Lowest expected latency; agents within 10 % of the best share the work at random. */
  const pick = (model: string, tried: ReadonlySet<string>, pinned: string | undefined) => {
    const now = performance.now();
    const all = candidates(model, tried, pinned);
    const healthy = all.filter((c) => c.entry.suspectUntil <= now);
    const pool = healthy.length > 0 ? healthy : all;
    if (pool.length === 0) return undefined;
    const scored = pool.map((c) => ({ ...c, expected: expectedMs(c.entry, model, now) }));
    const best = Math.min(...scored.map((s) => s.expected));
    const near = scored.filter((s) => s.expected <= best * 1.1 + 0.05);
    return near[Math.floor(Math.random() * near.length)]!;
  };

  /**
   * The lease agent with the soonest expected answer: the router's prediction plus the work this client
   * has outstanding there (expected service times of its requests in flight, shared by the agent's workers).
   */
  const pickFromLease = (lease: LeaseState, tried: ReadonlySet<string>) => {
    let best: { id: string; entry: AgentEntry; leased: LeaseAgent; score: number } | undefined;
    for (const leased of lease.agents) {
      const entry = agents.get(leased.agent);
      if (entry?.status.state !== 'online' || tried.has(leased.agent)) continue;
      const score = leased.predictedMs + entry.outstandingWorkMs / Math.max(1, entry.status.workers ?? 1);
      if (!best || score < best.score) best = { id: leased.agent, entry, leased, score };
    }
    return best;
  };

  const cancelOn = (agentId: string, id: Uint8Array) => {
    if (client.connected)
      client.publish(topics.agentCancel(agentId, clientId), encodeMessage({ v: PROTOCOL_VERSION, kind: 'cancel', id }), { qos: 1 });
  };

  /**
   * Sends one request and resolves with the first result. Attempts go to the agent with the lowest
   * expected completion time; a refusal or a lost agent moves the request to the next one at once;
   * an attempt slower than 4× its prediction is hedged on another agent (when there is one) while it
   * keeps running; the deadline bounds everything.
   */
  const infer = async (model: string, inputs: Record<string, Tensor>, inferOptions: InferOptions = {}): Promise<InferResult> => {
    const { deadlineMs = defaultDeadlineMs, agentId: pinned } = inferOptions;
    for (const [name, tensor] of Object.entries(inputs)) checkTensor(name, tensor);
    const started = performance.now();
    const deadline = Date.now() + deadlineMs;
    const id = newRequestId();
    const key = requestIdHex(id);
    const request0 = { v: PROTOCOL_VERSION, kind: 'req', id, deadline, model, inputs: encodeTensorMap(inputs) } as const;
    const payload = encodeMessage(request0);
    payments?.noteRequest(key, deadline, request0.inputs);
    const payloadFor = (agentId: string) => {
      const pay = payments?.payField(agentId);
      return pay ? encodeMessage({ ...request0, pay }) : payload;
    };
    const attemptLimit = pinned ? 1 : maxAttempts;

    // Before the first attempt, wait (within the deadline) for an agent to announce the model.
    while (!pick(model, new Set(), pinned) && Date.now() < deadline) await changes.wait(deadline - Date.now());
    const lease = routerId && !pinned ? await leaseFor(model, Math.max(0, deadline - Date.now()), payload.byteLength) : undefined;
    let routedBy: string | undefined;

    budget.onRequest(performance.now());
    return new Promise<InferResult>((resolve, reject) => {
      const tried = new Set<string>();
      const attempts = new Map<string, { sentAt: number; workMs: number; extra: boolean }>();
      let lastError: MeshError | undefined;
      let hedgeTimer: NodeJS.Timeout | undefined;
      let done = false;
      const creditRetried = new Set<string>();

      const release = (agentId: string) => {
        const attempt = attempts.get(agentId);
        if (!attempt) return;
        attempts.delete(agentId);
        if (attempt.extra) budget.onExtraDone();
        const entry = agents.get(agentId);
        if (entry) {
          entry.outstanding = Math.max(0, entry.outstanding - 1);
          entry.outstandingWorkMs = entry.outstanding === 0 ? 0 : Math.max(0, entry.outstandingWorkMs - attempt.workMs);
        }
      };
      const finish = (err: MeshError | undefined, result?: InferResult) => {
        if (done) return;
        done = true;
        budget.onRequestDone();
        clearTimeout(deadlineTimer);
        clearTimeout(hedgeTimer);
        pending.delete(key);
        for (const agentId of [...attempts.keys()]) {
          release(agentId);
          cancelOn(agentId, id);
        }
        if (err) reject(err);
        else resolve(result!);
      };
      const failNow = () => {
        if (Date.now() >= deadline) {
          const last = lastError ? ` (last: ${lastError.code})` : '';
          finish(
            new MeshError('MESH_DEADLINE_EXCEEDED', `no result for ${model} within ${deadlineMs} ms${last}`, {
              cause: lastError,
              details: { model, tried: [...tried] },
            }),
          );
        } else if (lastError) finish(lastError);
        else finish(new MeshError('MESH_NO_AGENT', `no live agent serves model ${model}`, { details: { model } }));
      };

      /** Starts an attempt on the best untried agent; false when there is none (or the budget is spent). */
      const launch = (kind: 'first' | 'failover' | 'retry' | 'hedge'): boolean => {
        if (tried.size >= attemptLimit || Date.now() >= deadline) return false;
        const paid = kind === 'retry' || kind === 'hedge';
        if (paid && !budget.take(kind, performance.now())) {
          logger.debug({ model, kind }, 'no budget for another attempt');
          return false;
        }
        const leased = lease ? pickFromLease(lease, tried) : undefined;
        const choice = leased ?? pick(model, tried, pinned);
        if (!choice) {
          if (paid) budget.refund(kind);
          return false;
        }
        if (tried.size === 0 && routerId && !pinned) {
          if (leased) {
            routedBy = routerId;
            counters.routed++;
          } else counters.leaseFallbacks++;
        }
        const now = performance.now();
        const workMs = leased ? leased.leased.serviceMs : serviceMsOf(choice.entry, model, now);
        const expected = leased ? leased.score : expectedMs(choice.entry, model, now);
        tried.add(choice.id);
        attempts.set(choice.id, { sentAt: now, workMs, extra: paid });
        choice.entry.outstanding++;
        choice.entry.outstandingWorkMs += workMs;
        client.publish(topics.agentRequest(choice.id, clientId), payloadFor(choice.id), { qos: 1 }, (err) => {
          if (err)
            request.onAnswer(choice.id, undefined, new MeshError('MESH_NOT_CONNECTED', `publish failed: ${err.message}`, { cause: err }));
        });
        clearTimeout(hedgeTimer);
        // A lease carries the router's hedge delay (max of p95 and 2 × predicted); the floor still applies.
        const hedgeAfterMs = Math.max(minHedgeAfterMs, leased ? leased.leased.hedgeAfterMs : 4 * expected + 50);
        if (hedgeAfterMs < deadline - Date.now()) {
          hedgeTimer = setTimeout(() => {
            if (!done && launch('hedge')) logger.debug({ model, slow: choice.id, afterMs: hedgeAfterMs }, 'hedged a slow attempt');
          }, hedgeAfterMs);
        }
        return true;
      };

      const request: InFlight = {
        attempts,
        onAnswer: (agentId, reply, err) => {
          if (done || !attempts.has(agentId)) return;
          const attempt = attempts.get(agentId)!;
          release(agentId);
          const entry = agents.get(agentId);
          if (reply) {
            const networkMs = Math.max(0, performance.now() - attempt.sentAt - reply.queueMs - reply.execMs);
            if (entry) entry.networkMs += NETWORK_EWMA_ALPHA * (networkMs - entry.networkMs);
            let outputs: Record<string, Tensor>;
            try {
              outputs = decodeTensorMap(reply.outputs);
            } catch (decodeErr) {
              request.onAnswer(agentId, undefined, decodeErr as MeshError);
              return;
            }
            finish(undefined, {
              requestId: key,
              model,
              agentId,
              outputs,
              timings: { totalMs: performance.now() - started, queueMs: reply.queueMs, execMs: reply.execMs, networkMs },
              attempts: tried.size,
              routedBy,
            });
            return;
          }
          lastError = err!;
          if (err!.code === 'MESH_CREDIT_EXCEEDED' && payments?.owes(agentId) && !creditRetried.has(agentId)) {
            // The agent waits for a voucher this client is about to send: try it again once that is out.
            creditRetried.add(agentId);
            tried.delete(agentId);
            void payments.flush().then(() => {
              if (!done && !launch('failover') && attempts.size === 0) failNow();
            });
            return;
          }
          if (err!.code === 'MESH_INFERENCE_FAILED' && entry) entry.suspectUntil = performance.now() + SUSPECT_MS;
          if (!RETRY_ELSEWHERE.has(err!.code)) return finish(err);
          logger.debug({ model, agentId, code: err!.code }, 'attempt failed; trying another agent');
          const kind = extraAttemptAfter(err!.code);
          if (!launch(kind) && attempts.size === 0) failNow();
        },
      };
      pending.set(key, request);
      const deadlineTimer = setTimeout(failNow, Math.max(0, deadline - Date.now()));
      if (!launch('first')) failNow();
    });
  };

  return {
    clientId,
    counters,
    infer,
    agents: () => [...agents].map(([id, e]) => ({ id, status: e.status, load: e.load, outstanding: e.outstanding })),
    models: () => {
      const byName = new Map<string, ModelInfo>();
      for (const e of agents.values()) for (const m of e.status.models ?? []) if (!byName.has(m.name)) byName.set(m.name, m);
      return [...byName.values()];
    },
    async waitForModel(model, timeoutMs = 10_000, count = 1) {
      const until = Date.now() + timeoutMs;
      while (candidates(model, new Set(), undefined).length < count) {
        if (Date.now() >= until) throw new MeshError('MESH_NO_AGENT', `no live agent serves model ${model} after ${timeoutMs} ms`);
        await changes.wait(until - Date.now());
      }
    },
    publish(topic, payload, { retain = false, qos = 1 } = {}) {
      if (!client.connected) return Promise.reject(new MeshError('MESH_NOT_CONNECTED', 'not connected to the broker'));
      return new Promise<void>((resolve, reject) => {
        client.publish(topic, Buffer.from(payload.buffer, payload.byteOffset, payload.byteLength), { qos, retain }, (err) =>
          err ? reject(new MeshError('MESH_NOT_CONNECTED', err.message, { cause: err })) : resolve(),
        );
      });
    },
    async close() {
      for (const waiter of [...leaseWaiters.values()]) waiter(undefined);
      for (const request of [...pending.values()]) {
        for (const agentId of [...request.attempts.keys()])
          request.onAnswer(agentId, undefined, new MeshError('MESH_NOT_CONNECTED', 'client closed'));
      }
      // Vouchers being signed still go out before the connection closes.
      await payments?.close();
      await connection.close();
    },
    lanes: () => payments?.lanesView() ?? [],
  };
}
