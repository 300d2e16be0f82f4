/**
 * The live router (docs/routing.md): the registry and selection core fed from MQTT, answering route
 * questions from SDK clients (leases.ts) and forwarding requests for thin clients through the request
 * engine of @edge-mesh/client with the router's policy (policy.ts). Optionally serves the HTTP API
 * (http.ts, loaded only when asked for). This file is the wiring.
 */
import {
  childLogger,
  createFleetView,
  createRequestEngine,
  KeyedBuckets,
  type MeshTlsOptions,
  mqttTransport,
  openMeshConnection,
  type PipelineDefinition,
  readReply,
  subscribeOrReconnect,
  systemClock,
  TailBudget,
  type TailBudgetOptions,
  waitUntil,
} from '@edge-mesh/client';
import {
  assertValidId,
  checkTensor,
  DEFAULT_MAX_MESSAGE_BYTES,
  decodeMessage,
  decodeTensorMap,
  encodeMessage,
  encodeTensorMap,
  type Identity,
  type InferReply,
  isMeshErrorCode,
  MeshError,
  type MeshErrorCode,
  type ModelInfo,
  newRequestId,
  PROTOCOL_VERSION,
  parseTopic,
  type RouteRequest as RouteQuestion,
  requestIdHex,
  type Tensor,
  topics,
} from '@edge-mesh/protocol';
import type { MqttClient } from 'mqtt';
import { AdaptiveConcurrency, type AdaptiveConcurrencyOptions } from './concurrency.ts';
import { createRegistry, onLoad, onStatus, type RouterOptions } from './estimates.ts';
import type {
  AttemptRecord,
  RoutedRecord,
  RouteOptions,
  RouteResult,
  RouterCounters,
  RouterGrpcHandle,
  RouterHandle,
  RouterHttpHandle,
  RouterHttpOptions,
  RouterInferOptions,
  RouterLogger,
} from './handle.ts';
import { answerRoute } from './leases.ts';
import { createRouterPipelines } from './pipelines.ts';
import { type LivePolicyFactory, observedBy, resolveRouterPolicy } from './policies.ts';
import { createRouterPolicy, type RouterAsk } from './policy.ts';
import { RevocationList } from './revocations.ts';
import type { RolloutOptions, RouterRollouts } from './rollout.ts';
import { selectAgent } from './select.ts';
import { StallMonitor } from './stalls.ts';

export interface StartRouterOptions {
  brokerUrl: string;
  /** CA, and for mutual TLS the router's certificate and key, for an `mqtts://` broker (docs/operations.md, "TLS"). */
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
  /** A 'router' identity: its id is the router's client id and it proves the router on CONNECT. */
  identity: Identity;
  logger?: RouterLogger;
  /** Tuning of the pure core (see RouterConfig). */
  config?: RouterOptions;
  /** Deadline when a call gives none, ms. */
  defaultDeadlineMs?: number;
  /** Pipelines served as models on the KServe API and by `infer` (docs/pipelines.md). */
  pipelines?: readonly PipelineDefinition[];
  /** Agents tried per forwarded request, the first included (default 3). */
  maxAttempts?: number;
  /** Hedge a slow attempt on a different warm node (default true). */
  hedging?: boolean;
  /** No hedges while the fleet's utilisation is above this (default 0.8). */
  hedgeMaxUtilization?: number;
  /** Retry and hedge budget (the client layer's TailBudget; default: extras ≤ 20 % of requests, hedges ≤ 5 %). */
  tailBudget?: Partial<TailBudgetOptions>;
  /** How often the success-rate outlier sweep runs, ms. */
  outlierIntervalMs?: number;
  maxMessageBytes?: number;
  keepaliveS?: number;
  /** Ignore statuses without a valid signature from the agent's key (default true). */
  requireSignedStatus?: boolean;
  /** How long a route lease given to an SDK client may be used, ms (default 500). */
  leaseTtlMs?: number;
  /** Agents per lease, best first (default 3). */
  leaseAgents?: number;
  /**
   * Route questions one client may ask a second, sustained (default 50), and in a burst (default 100); past that
   * its questions are dropped unanswered (counted in `questionsDropped`), and the SDK routes by itself meanwhile.
   */
  routeQuestionsPerSecond?: number;
  routeQuestionsBurst?: number;
  /**
   * The balancer for forwarded requests (policies.ts): `ours` (default), a name from ROUTER_POLICIES
   * (`finagle` where the baselines are built in), or a factory. Route leases always come from `ours`.
   */
  policy?: string | LivePolicyFactory;
  /** Also serve the HTTP API (KServe v2, /v1 operator endpoints, /metrics; see http.ts); closed with the router. */
  http?: RouterHttpOptions;
  /** Staged model rollouts (rollout.ts, docs/deployment.md): bundles, signed steps, canary split and analysis. */
  rollouts?: RolloutOptions;
  /** Also serve the KServe v2 gRPC service on this port (0: any free port; see grpc.ts); closed with the router. */
  grpcPort?: number;
  /** Address of the gRPC service (default 127.0.0.1). */
  grpcHost?: string;
  /**
   * The adaptive concurrency limit on requests forwarded for the HTTP and gRPC APIs (concurrency.ts; Envoy's
   * gradient controller and its defaults); false turns it off.
   */
  adaptiveConcurrency?: AdaptiveConcurrencyOptions | false;
}

/** A forwarded request as the engine carries it: what the policy needs, and the bytes to send. */
interface Forwarded extends RouterAsk {
  payload: Buffer;
}

export async function startRouter(options: StartRouterOptions): Promise<RouterHandle> {
  const {
    brokerUrl,
    identity,
    defaultDeadlineMs = 2_000,
    maxAttempts = 3,
    hedging = true,
    outlierIntervalMs = 1_000,
    maxMessageBytes = DEFAULT_MAX_MESSAGE_BYTES,
    keepaliveS = 10,
    requireSignedStatus = true,
    leaseTtlMs = 500,
    hedgeMaxUtilization = 0.8,
    leaseAgents = 3,
  } = options;
  if (identity.role !== 'router')
    throw new MeshError('MESH_CONFIG', `startRouter needs a router key, got a ${identity.role} key (${identity.id})`);
  const routerId = assertValidId(identity.id, 'router id');
  if (!Number.isInteger(maxAttempts) || maxAttempts < 1)
    throw new MeshError('MESH_CONFIG', `maxAttempts must be a positive integer, got ${maxAttempts}`);
  const logger = childLogger(options.logger, { part: 'router', routerId });
  const clock = systemClock;
  const liveFactory = resolveRouterPolicy(options.policy);

  const registry = createRegistry(options.config ?? {});
  // The router's own stalls are taken out of the round trips it learns from (docs/routing.md).
  const stalls = new StallMonitor(clock.now).start();
  registry.stalls = stalls;
  // Built before the fleet view, which feeds it the statuses it has seen.
  const live = liveFactory?.({ random: registry.rng, nowMs: clock.now(), maxAttempts, hedging });
  const listeners = new Set<(a: AttemptRecord) => void>();
  const emit = (a: AttemptRecord) => {
    for (const listener of listeners) {
      try {
        listener(a);
      } catch (err) {
        logger.warn({ err: (err as Error).message }, 'attempt listener threw');
      }
    }
  };
  const routeCounters = { leases: 0, leasesRefused: 0, questionsDropped: 0 };
  // Each answer costs a decode, three selections and an encode on this one thread (~14 µs with 20 agents, before
  // MQTT): a client asking tens of thousands of times a second would starve every other client's leases. An SDK
  // asks once per model per lease (500 ms) plus once per failed lease, far below the default.
  const questionBuckets = new KeyedBuckets(options.routeQuestionsBurst ?? 100, options.routeQuestionsPerSecond ?? 50);
  const routedListeners = new Set<(r: RoutedRecord) => void>();
  const routed = (r: RoutedRecord) => {
    for (const listener of routedListeners) {
      try {
        listener(r);
      } catch (err) {
        logger.warn({ err: (err as Error).message }, 'routed listener threw');
      }
    }
  };

  const fleet = createFleetView({
    requireSignedStatus,
    maxMessageBytes,
    now: clock.now,
    logger,
    onStatus: (status) => {
      live?.onStatus?.(status, clock.now());
      const entry = onStatus(registry, status, clock.now());
      // A returning agent is up again (upsertAgent keeps what was learned about it).
      if (status.state === 'online' && entry) entry.up = true;
      if (status.state !== 'online') logger.info({ agentId: status.agent, state: status.state }, 'agent not online');
    },
    onLoad: (load) => {
      if (fleet.get(load.agent)?.status.state !== 'online') return;
      live?.onLoad?.(load, clock.now());
      onLoad(registry, load, clock.now());
    },
    onAgentLost: (agentId, reason) =>
      engine.agentLost(
        agentId,
        new MeshError('MESH_AGENT_LOST', `agent ${agentId} ${reason === 'offline' ? 'went offline' : 'restarted'}`, {
          details: { agentId },
        }),
      ),
  });
  const policy = createRouterPolicy<InferReply>(registry, {
    hedging,
    hedgeMaxUtilization,
    outlierIntervalMs,
    onAttemptResult: emit,
    onEjected: (ejected) => logger.info({ ejected }, 'ejected outliers'),
  });

  let client!: MqttClient;
  const engine = createRequestEngine<Forwarded, InferReply>({
    ...(live
      ? {
          // Another balancer routes, with its own retry rule, attempt limit and budget; ours only learns.
          policy: observedBy(live, policy),
          budget: live.budget,
          maxAttempts: live.maxAttempts ?? maxAttempts,
          ...(live.retryable ? { retryable: (code: MeshErrorCode) => live.retryable!(code) } : {}),
        }
      : {
          policy,
          budget: new TailBudget(options.tailBudget ?? {}, clock.now()),
          maxAttempts,
          // An agent silent for a few heartbeats is presumed dead before its last will arrives.
          liveness: { isSilent: (agentId: string, now: number) => fleet.silent(agentId, now) },
        }),
    clock,
    transport: mqttTransport({
      client: () => client,
      senderId: routerId,
      qos: options.publishQos ?? 1,
      payload: (attempt) => attempt.request.data.payload,
      onSendFailed: (attempt, error) => engine.unsent(attempt.request.key, attempt.agentId, error),
    }),
  });

  const onReply = (agentId: string, payload: Buffer) => {
    const reading = readReply(agentId, payload, maxMessageBytes);
    if (!reading) {
      logger.debug({ agentId }, 'ignoring bad reply');
      return;
    }
    fleet.heard(agentId);
    if (reading.error) engine.fail(reading.key, agentId, reading.error);
    else engine.answer(reading.key, agentId, reading.reply!);
  };

  const onRouteQuestion = (senderId: string, payload: Buffer) => {
    if (!questionBuckets.take(senderId, clock.now())) {
      routeCounters.questionsDropped++;
      return;
    }
    let question: RouteQuestion;
    try {
      question = decodeMessage(payload, ['route'], maxMessageBytes);
    } catch (err) {
      logger.debug({ senderId, err: (err as Error).message }, 'ignoring bad route request');
      return;
    }
    const lease = answerRoute(registry, routerId, question, clock.now(), { agents: leaseAgents, ttlMs: leaseTtlMs });
    if (lease.agents.length > 0) routeCounters.leases++;
    else routeCounters.leasesRefused++;
    routed({
      via: 'lease',
      model: question.model,
      ok: lease.agents.length > 0,
      ...(isMeshErrorCode(lease.code) ? { code: lease.code } : {}),
      ...(lease.agents[0] ? { agentId: lease.agents[0].agent } : {}),
    });
    if (client.connected) client.publish(topics.clientLease(senderId, routerId), encodeMessage(lease), { qos: options.publishQos ?? 1 });
  };

  // With credentials on the HTTP/gRPC API, the revocations the broker republishes refuse revoked ids' tokens.
  const revocations = options.http?.auth
    ? new RevocationList(new Map(options.http.auth.trustedOperators.map((o) => [o.id, o.publicKey] as const)), logger)
    : undefined;
  const auth = options.http?.auth
    ? {
        ...options.http.auth,
        isRevoked: (id: string, issuedMs: number) =>
          revocations!.isRevoked(id, issuedMs) || (options.http!.auth!.isRevoked?.(id, issuedMs) ?? false),
      }
    : undefined;
  let connected = false;
  let refusedFirst: ((err: MeshError) => void) | undefined;
  let subscribedBefore = false;
  const connection = openMeshConnection(brokerUrl, {
    identity,
    ...(options.tls ? { tls: options.tls } : {}),
    ...(options.username !== undefined ? { username: options.username } : {}),
    ...(options.password !== undefined ? { password: options.password } : {}),
    keepaliveS,
    onConnect: (c: MqttClient) => {
      connected = true;
      fleet.onConnect();
      subscribeOrReconnect(
        c,
        [topics.clientRepliesFor(routerId), topics.routerRoutesFor(routerId), topics.allAgentStatus(), topics.allAgentLoad()],
        options.subscriptionQos ?? 1,
        (reason) => logger.error({ err: reason }, 'subscribe failed; reconnecting'),
        () => {
          // Agents announce again: a broker may not hand this connection their retained statuses (RabbitMQ 3.10).
          c.publish(topics.discover(routerId), Buffer.alloc(0), { qos: 0 });
          // Requests in flight when the connection dropped go out again, now that their replies can come back.
          if (subscribedBefore) {
            const resent = engine.resendInFlight();
            if (resent > 0) logger.info({ resent }, 'requests in flight sent again after the reconnect');
          }
          subscribedBefore = true;
        },
      );
      if (revocations) {
        c.subscribe(topics.allRevocations(), { qos: 1 }, (err, granted) => {
          if (err || granted?.[0]?.qos === 128)
            logger.warn(
              { err: err?.message },
              'the broker does not let this router read revocations (mesh/v1/revoked/+): revoked keys keep their HTTP tokens until they expire',
            );
        });
      }
    },
    onRefused: (err, first) => {
      // A refused identity or a failed TLS handshake on the first connect is configuration: fail the start at once.
      if (first && (err.code === 'MESH_UNAUTHORIZED' || err.code === 'MESH_TLS') && refusedFirst) return refusedFirst(err);
      logger.error({ code: err.code, err: err.message }, 'broker refused the router');
    },
  });
  client = connection.client;
  client.on('close', () => {
    connected = false;
  });
  client.on('message', (topic, payload, packet) => {
    const parsed = parseTopic(topic);
    if (!parsed) return;
    if (parsed.kind === 'status') fleet.onStatus(parsed.agentId, payload, packet.retain);
    else if (parsed.kind === 'load') fleet.onLoad(parsed.agentId, payload);
    else if (parsed.kind === 'reply' && parsed.clientId === routerId) onReply(parsed.agentId, payload);
    else if (parsed.kind === 'route' && parsed.routerId === routerId) onRouteQuestion(parsed.senderId, payload);
    else if (parsed.kind === 'revocation') revocations?.onMessage(parsed.id, payload);
  });
  try {
    await Promise.race([connection.firstConnect, new Promise<never>((_, reject) => (refusedFirst = reject))]);
  } catch (err) {
    stalls.stop();
    await connection.close();
    throw err;
  } finally {
    refusedFirst = undefined;
  }

  const route = (model: string, routeOptions: RouteOptions = {}): RouteResult => {
    const now = clock.now();
    const selection = selectAgent(
      registry,
      {
        model,
        ...(routeOptions.deadlineMs !== undefined ? { deadlineMs: now + routeOptions.deadlineMs } : {}),
        ...(routeOptions.bytesUp !== undefined ? { bytesUp: routeOptions.bytesUp } : {}),
        ...(routeOptions.exclude ? { exclude: routeOptions.exclude } : {}),
      },
      now,
      registry.rng,
    );
    if (!selection.ok) throw new MeshError(selection.code, selection.message, { details: { model } });
    return { agentId: selection.agentId, predictedMs: selection.predictedMs };
  };
  const isLive = (agentId: string) => fleet.get(agentId)?.status.state === 'online' && (registry.agents.get(agentId)?.up ?? false);
  const hasCandidate = (model: string) => fleet.online(model).some((a) => registry.agents.get(a.id)?.up);
  let rollouts: RouterRollouts | undefined;
  if (options.rollouts) {
    const { RouterRollouts } = await import('./rollout.ts');
    rollouts = new RouterRollouts(options.rollouts, {
      publish: (topic, payload) => client.publish(topic, payload, { qos: 1, retain: true }),
      agents: () => [...fleet.all()].filter((a) => isLive(a.id)).map((a) => a.status),
      logger,
    });
  }

  const limiter = options.adaptiveConcurrency === false ? undefined : new AdaptiveConcurrency(options.adaptiveConcurrency ?? {});
  let closing = false;
  const infer: RouterHandle['infer'] = async (model, inputs, inferOptions: RouterInferOptions = {}) => {
    const { deadlineMs = defaultDeadlineMs, excludeAgents } = inferOptions;
    if (closing) throw new MeshError('MESH_NOT_CONNECTED', 'router closed');
    if (pipelines.has(model)) {
      // One permit for the whole pipeline (its stages are not limited on their own), as a proxy's limit sees one request;
      // taken after its inputs are checked, so refused inputs are no latency samples (they would drag the baseline down).
      pipelines.check(model, inputs);
      const permit = inferOptions.limited ? limiter?.acquire(inferOptions.caller) : undefined;
      try {
        return await pipelines.run(model, inputs, deadlineMs);
      } finally {
        permit?.release();
      }
    }
    for (const [name, tensor] of Object.entries(inputs)) checkTensor(name, tensor);
    const startedAt = clock.now();
    const deadlineAt = startedAt + deadlineMs;
    const id = newRequestId();
    const key = requestIdHex(id);
    const pin = rollouts?.pick(model);
    const payload = encodeMessage({
      v: PROTOCOL_VERSION,
      kind: 'req',
      id,
      deadline: Date.now() + deadlineMs,
      model,
      inputs: encodeTensorMap(inputs),
      ...(pin ? { version: pin.version } : {}),
    });
    // A router that just started may not have heard the statuses yet: wait within the deadline.
    while (!hasCandidate(model) && clock.now() < deadlineAt) await fleet.changes.wait(Math.min(100, deadlineAt - clock.now()));
    // Beyond the adaptive limit: refused at once, before anything is sent (MESH_OVERLOADED, HTTP 503).
    const permit = inferOptions.limited ? limiter?.acquire(inferOptions.caller) : undefined;
    return new Promise((resolve, reject) => {
      const data = { model, bytesUp: payload.byteLength, payload, ...(excludeAgents?.size ? { excluded: excludeAgents } : {}) };
      engine.start({ key, deadlineAt, data, model }, (outcome) => {
        if (pin) rollouts?.observe(pin, outcome.ok, clock.now() - startedAt, outcome.ok ? outcome.reply.version : undefined);
        permit?.release();
        if (!outcome.ok) {
          routed({ via: 'forward', model, ok: false, code: outcome.error.code, totalMs: clock.now() - startedAt });
          reject(outcome.error);
          return;
        }
        routed({ via: 'forward', model, ok: true, agentId: outcome.attempt.agentId, totalMs: clock.now() - startedAt });
        let outputs: Record<string, Tensor>;
        try {
          outputs = decodeTensorMap(outcome.reply.outputs);
        } catch (err) {
          reject(err);
          return;
        }
        const reply = outcome.reply;
        resolve({
          requestId: key,
          model,
          agentId: outcome.attempt.agentId,
          outputs,
          tried: [...outcome.tried],
          attempts: outcome.tried.length,
          hedged: outcome.hedged,
          timings: {
            totalMs: clock.now() - startedAt,
            queueMs: reply.queueMs,
            execMs: reply.execMs,
            predictedMs: outcome.attempt.plan.predictedMs ?? 0,
          },
        });
      });
    });
  };

  const pipelines = createRouterPipelines(options.pipelines ?? [], infer, () => handle.models());

  let http: RouterHttpHandle | undefined;
  let grpc: RouterGrpcHandle | undefined;
  const counters = (): RouterCounters => {
    const c = engine.counters;
    return {
      statusRejected: fleet.counters.statusRejected,
      statusMalformed: fleet.counters.statusMalformed,
      statusDeferred: fleet.counters.statusDeferred,
      staleOffline: fleet.counters.staleOffline,
      staleRetained: fleet.counters.staleRetained,
      requests: c.requests,
      ok: c.ok,
      failed: c.failed,
      retries: c.retries + c.failovers,
      hedges: c.hedges,
      cancels: c.cancels,
      silenced: c.silent,
      budgetRefused: c.refused,
      leases: routeCounters.leases,
      leasesRefused: routeCounters.leasesRefused,
      questionsDropped: routeCounters.questionsDropped,
      sentTo: policy.sentTo,
    };
  };
  const handle: RouterHandle = {
    id: routerId,
    policy: live?.name ?? 'ours',
    registry,
    get counters() {
      return counters();
    },
    route: (model, routeOptions) => route(model, routeOptions),
    concurrency: () => limiter?.snapshot(),
    infer,
    pipelines,
    agents: () => [...fleet.all()].map((a) => ({ id: a.id, up: isLive(a.id), status: a.status })),
    models: () => {
      const byName = new Map<string, ModelInfo>();
      for (const a of fleet.online()) {
        if (!registry.agents.get(a.id)?.up) continue;
        for (const m of a.status.models ?? []) if (!byName.has(m.name)) byName.set(m.name, m);
      }
      return [...byName.values()];
    },
    waitForModel(model, timeoutMs = 10_000, count = 1) {
      return waitUntil(
        fleet.changes,
        () => fleet.online(model).filter((a) => registry.agents.get(a.id)?.up).length >= count,
        timeoutMs,
        () => new MeshError('MESH_NO_AGENT', `no live agent serves model ${model} after ${timeoutMs} ms`),
      );
    },
    onAttempt(listener) {
      listeners.add(listener);
      return () => listeners.delete(listener);
    },
    onRouted(listener) {
      routedListeners.add(listener);
      return () => routedListeners.delete(listener);
    },
    get connected() {
      return connected;
    },
    get http() {
      return http;
    },
    rollouts,
    get grpc() {
      return grpc;
    },
    async close() {
      await Promise.all([http?.close(), grpc?.close()]);
      rollouts?.close();
      stalls.stop();
      closing = true;
      engine.close(new MeshError('MESH_NOT_CONNECTED', 'router closed'));
      await connection.close();
    },
  };
  if (options.http) {
    try {
      // Loaded on demand: a router without the HTTP API never loads fastify.
      const { startRouterHttp } = await import('./http.ts');
      const httpOptions = withConsoleBrokerAccess(options)!;
      http = await startRouterHttp(handle, auth ? { ...httpOptions, auth } : httpOptions);
    } catch (err) {
      await handle.close();
      throw err;
    }
  }
  if (options.grpcPort !== undefined) {
    try {
      // Loaded on demand, like the HTTP API.
      const { startRouterGrpc } = await import('./grpc.ts');
      // The gRPC port takes the HTTP API's credentials and certificate, so neither door is more open than the other.
      grpc = await startRouterGrpc(handle, {
        port: options.grpcPort,
        ...(options.grpcHost !== undefined ? { host: options.grpcHost } : {}),
        ...(auth ? { auth } : {}),
        ...(options.http?.tls ? { tls: options.http.tls } : {}),
      });
    } catch (err) {
      await handle.close();
      throw err;
    }
  }
  return handle;
}

/**
 * The HTTP options with the console's admin connection given the router's own broker TLS and password settings where
 * it has none of its own: the operator's records go to the same broker the router reaches with them.
 */
function withConsoleBrokerAccess(options: StartRouterOptions): StartRouterOptions['http'] {
  const http = options.http;
  const admin = http?.console ? http.console.admin : undefined;
  if (!http?.console || !admin || admin.brokerAccess !== undefined) return http;
  const brokerAccess = {
    ...(options.tls ? { tls: options.tls } : {}),
    ...(options.username !== undefined ? { username: options.username } : {}),
    ...(options.password !== undefined ? { password: options.password } : {}),
  };
  return { ...http, console: { ...http.console, admin: { ...admin, brokerAccess } } };
}
