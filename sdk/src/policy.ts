/**
 * How the SDK chooses an agent for each attempt (docs/routing.md, "Two ways in"): from the router's
 * route lease when it has one (among the lease's agents this client has not seen fail lately, the router's
 * prediction raised by how late this client saw each agent answer against it), else by
 * itself from the fleet's statuses and load reports. The request
 * engine in @edge-mesh/client does the rest (failover, retries, hedges, timeouts, the deadline).
 *
 * By itself it estimates each agent's completion time: the work queued there as last reported (by its
 * load heartbeat or, when newer, by its last reply to this client) plus what this client has sent
 * since, shared by the agent's workers, then one service time and the network time it measured. Agents
 * within 10 % of the best share the work at random, and an agent whose runtime just failed is used only
 * when nothing else is left for a few seconds. Per-try timeouts and hedge delays come from this
 * client's own latency history with each agent and model once it has one (client/src/quantiles.ts).
 *
 * Its `floorMs` for the engine is the shortest service time any agent left claims for the model: with less time
 * than that before the deadline, the request is refused at once (MESH_OVERLOADED) instead of being sent to fail.
 */
import {
  type Attempt,
  type AttemptKind,
  type AttemptPlan,
  type BoundedQueue,
  boundQueueClaim,
  type EnginePolicy,
  type EngineRequest,
  type FleetAgent,
  type FleetView,
  fitTimesToAttempt,
  LatencyQuantiles,
  maxHeldRequests,
  perTryTimeoutMs,
} from '@edge-mesh/client';
import type { InferReply, LeaseAgent, MeshError, Tensor } from '@edge-mesh/protocol';

/** A lease as the SDK holds it (clock times). */
export interface LeaseState {
  router: string;
  agents: LeaseAgent[];
  freshUntil: number;
  usableUntil: number;
}

/** What the engine carries for one SDK request. */
export interface SdkRequest {
  model: string;
  /** Encoded request for an agent (with that agent's payment field, if any). */
  payloadFor(agentId: string): Uint8Array;
  lease: LeaseState | undefined;
  /** A router was asked (so a first attempt without its lease counts as a fallback). */
  viaRouter: boolean;
  /** Send only here (`infer(…, { agentId })`). */
  pinned: string | undefined;
  /** Never send here (`infer(…, { excludeAgents })`: a pipeline stage whose answer from them was refused). */
  excluded?: ReadonlySet<string>;
  /** The router whose lease chose the first attempt. */
  routedBy: string | undefined;
}

/** An answer as the engine carries it: the agent's reply with its outputs already decoded and checked. */
export interface SdkReply {
  reply: InferReply;
  outputs: Record<string, Tensor>;
}

export interface SdkPolicyOptions {
  fleet: FleetView;
  /** The earliest a slow attempt is hedged, ms. */
  minHedgeAfterMs: number;
  random?: () => number;
  /** After this error, wait for the returned promise and try the same agent once more (payments). */
  retrySameAfter?: (agentId: string, error: MeshError, key: string, model: string, deadlineAt: number) => Promise<unknown> | undefined;
  /**
   * Whether the agent's credit window has room for the request (payments): agents without room are passed
   * over while another has room; a hedge goes only where there is room.
   */
  creditRoom?: (agentId: string, key: string, model: string) => 'room' | 'full' | 'never' | 'taken';
  /** An attempt was cancelled (a hedge that lost, or the request ended): the payer remembers it. */
  onCancelled?: (key: string, agentId: string) => void;
  onRouted?: (routed: boolean) => void;
}

/** What this client knows of one agent beyond the fleet view. */
interface Local {
  outstanding: number;
  /** Expected service time of the requests this client has outstanding there. */
  outstandingWorkMs: number;
  /** EWMA of the part of a round trip spent outside the agent's queue and runtime. */
  networkMs: number;
  /** Until this time the agent is only used when nothing else is left. */
  suspectUntil: number;
  /** The queue its last reply (or error reply) to this client carried, bounded, and when it came. */
  claim: BoundedQueue | undefined;
  claimAt: number;
  /** This client's attempt latencies there, per model. */
  latency: Map<string, LatencyQuantiles>;
  /** Per model: the load time its replies last reported (fitted to the attempt), and when one last came. */
  loadMs: Map<string, number>;
  repliedAt: Map<string, number>;
  /**
   * How much later than the router predicted its leased attempts answered (an EWMA of the excess, never below 0), as of
   * `lateAt`; it halves every LATE_HALF_LIFE_MS without a new sample.
   */
  lateMs: number;
  lateAt: number;
}

const NETWORK_EWMA_ALPHA = 0.2;
/** Weight of a new sample in a leased agent's lateness, and how fast the lateness fades without one. */
const LATE_EWMA_ALPHA = 0.3;
const LATE_HALF_LIFE_MS = 5_000;
const INITIAL_NETWORK_MS = 1;
const SUSPECT_MS = 3_000;
/** Codes that say the agent failed (its runtime, its own code, its model file), not the request: it is suspect a while. */
const AGENT_FAULTS: ReadonlySet<string> = new Set(['MESH_INFERENCE_FAILED', 'MESH_INTERNAL', 'MESH_MODEL_INTEGRITY']);
/** A reply's queue claim older than this no longer counts (the fleet view's default for load reports). */
const CLAIM_STALE_MS = 5_000;
/**
 * When every agent's service time is longer than a request's time left, the engine sheds it (`floorMs`); once per
 * this long per model one such request still goes out, so an estimate that only runs refresh cannot stay stale.
 */
const SHED_PROBE_EVERY_MS = 1_000;
/** What loading a model is taken to cost before any reply said (the router's default too). */
const DEFAULT_COLD_LOAD_MS = 5_000;
/** The most agents a route question may exclude (RouteRequestSchema). */
const MAX_EXCLUDED = 16;

export interface SdkPolicy extends EnginePolicy<SdkRequest, SdkReply> {
  /** Requests this client has outstanding at the agent. */
  outstanding(agentId: string): number;
  /** The queue the agent's last reply to this client carried, as bounded (workMs NaN when it gave none). */
  claimedQueue(agentId: string): BoundedQueue | undefined;
  /** Whether an attempt could be sent now (an online agent serves the model, the pinned one if any). */
  hasCandidate(model: string, pinned: string | undefined): boolean;
  /**
   * Online agents serving `model` that this client saw fail lately, for a route question's `exclude`; none when no
   * other online agent serves it (the router would have nothing left to lease).
   */
  suspects(model: string, now: number): string[];
}

export function createSdkPolicy(options: SdkPolicyOptions): SdkPolicy {
  const { fleet, minHedgeAfterMs, random = Math.random } = options;
  const locals = new Map<string, Local>();
  const local = (agentId: string): Local => {
    let l = locals.get(agentId);
    if (!l) {
      l = {
        outstanding: 0,
        outstandingWorkMs: 0,
        networkMs: INITIAL_NETWORK_MS,
        suspectUntil: 0,
        claim: undefined,
        claimAt: 0,
        latency: new Map(),
        loadMs: new Map(),
        repliedAt: new Map(),
        lateMs: 0,
        lateAt: 0,
      };
      locals.set(agentId, l);
    }
    return l;
  };
  /** What each attempt added to its agent's outstanding work, by attempt. */
  const workOf = new WeakMap<Attempt<SdkRequest>, number>();
  /** Attempts whose agent a lease chose, at the prediction it was chosen by. */
  const leasedAttempts = new WeakSet<Attempt<SdkRequest>>();

  /** How much later than predicted the agent's leased attempts answered lately (0 when unknown), faded to `now`. */
  const latenessMs = (agentId: string, now: number): number => {
    const l = locals.get(agentId);
    if (!l || l.lateMs === 0) return 0;
    return l.lateMs * 0.5 ** (Math.max(0, now - l.lateAt) / LATE_HALF_LIFE_MS);
  };
  const noteLate = (agentId: string, lateMs: number, now: number) => {
    const l = local(agentId);
    const current = latenessMs(agentId, now);
    l.lateMs = current + LATE_EWMA_ALPHA * (Math.max(0, lateMs) - current);
    l.lateAt = now;
  };

  const serviceMsOf = (agent: FleetAgent, model: string): number => {
    const fresh = fleet.freshLoad(agent)?.models[model];
    return Math.max(0.01, fresh?.serviceMs ?? agent.status.models?.find((m) => m.name === model)?.latencyMs ?? 1);
  };
  const workersOf = (agent: FleetAgent) => Math.max(1, agent.status.workers ?? 1);
  /** This client saw the agent fail lately (AGENT_FAULTS, for SUSPECT_MS). */
  const isSuspect = (agentId: string, now: number) => (locals.get(agentId)?.suspectUntil ?? 0) > now;

  const latencyOf = (agentId: string, model: string): LatencyQuantiles => {
    const byModel = local(agentId).latency;
    let q = byModel.get(model);
    if (!q) {
      q = new LatencyQuantiles();
      byModel.set(model, q);
    }
    return q;
  };

  /** An agent's queue claim, bounded by its status and the service times it announced (client/src/claims.ts). */
  const boundClaim = (agentId: string, rif: number, workMs: number | undefined): BoundedQueue | undefined => {
    const agent = fleet.get(agentId);
    if (!agent) return undefined;
    const models = agent.status.models ?? [];
    const services = models.map((m) => serviceMsOf(agent, m.name));
    return boundQueueClaim(rif, workMs, {
      maxRif: maxHeldRequests(agent.status.workers, agent.status.queueLimit, models.length),
      ...(services.length > 0 ? { minServiceMs: Math.min(...services), maxServiceMs: Math.max(...services) } : {}),
    });
  };

  const expectedMs = (agent: FleetAgent, model: string, now: number): number => {
    const l = local(agent.id);
    let aheadMs = l.outstandingWorkMs;
    const load = fleet.freshLoad(agent);
    if (l.claim && now - l.claimAt < CLAIM_STALE_MS && (!load || l.claimAt > agent.loadAt)) {
      // The agent's last reply to this client is newer than its last heartbeat.
      aheadMs += Number.isNaN(l.claim.workMs) ? l.claim.rif * serviceMsOf(agent, model) : l.claim.workMs;
    } else if (load) for (const m of Object.values(load.models)) aheadMs += (m.queued + m.inFlight) * m.serviceMs;
    return aheadMs / workersOf(agent) + serviceMsOf(agent, model) + l.networkMs + untilReadyMs(agent, model, now);
  };

  /**
   * How long until the model is ready there, by its last load report: 0 when warm (or when a reply for it
   * came after the report), the rest of a loading model's ETA, a cold model's load time. The ETA is the
   * agent's claim: where its replies reported a load time, the ETA cannot promise it sooner than that,
   * counted from the first report of this load.
   */
  const untilReadyMs = (agent: FleetAgent, model: string, now: number): number => {
    const l = local(agent.id);
    const ml = fleet.freshLoad(agent)?.models[model];
    if (!ml?.state || ml.state === 'warm' || (l.repliedAt.get(model) ?? Number.NEGATIVE_INFINITY) > agent.loadAt) return 0;
    const measured = l.loadMs.get(model);
    if (ml.state === 'cold') return measured ?? DEFAULT_COLD_LOAD_MS;
    const since = agent.loadingSince.get(model) ?? agent.loadAt;
    const claimedAt = agent.loadAt + (ml.etaMs ?? measured ?? DEFAULT_COLD_LOAD_MS);
    const readyAt = measured === undefined ? claimedAt : Math.max(claimedAt, since + measured);
    return Math.max(0, readyAt - now);
  };

  const candidates = (model: string, tried: ReadonlySet<string>, pinned: string | undefined): FleetAgent[] =>
    fleet.online(model).filter((a) => !tried.has(a.id) && (pinned === undefined || a.id === pinned));

  const hasRoom = (agentId: string, request: EngineRequest<SdkRequest>): boolean =>
    !options.creditRoom || options.creditRoom(agentId, request.key, request.data.model) === 'room';

  const pickLocal = (
    request: EngineRequest<SdkRequest>,
    tried: ReadonlySet<string>,
    now: number,
    kind: AttemptKind,
  ): AttemptPlan | undefined => {
    const { model, pinned, excluded } = request.data;
    const all = candidates(model, tried, pinned).filter((a) => !excluded?.has(a.id));
    // Not suspect, and not silent (no heartbeat for a few periods: presumed dead before its last will).
    const healthy = all.filter((a) => !isSuspect(a.id, now) && !fleet.silent(a.id, now));
    // With none healthy left, a first attempt may still go to a silent agent (the request has nowhere else to wait), but
    // a retry, failover or hedge never does: the request would only wait at a presumed-dead agent instead of on the
    // attempts it already has, and a retry there spends a budget token and one of the budget's extra-attempt slots
    // until the deadline.
    const live = healthy.length > 0 ? healthy : kind === 'first' ? all : all.filter((a) => !fleet.silent(a.id, now));
    const roomy = live.filter((a) => hasRoom(a.id, request));
    // Without room anywhere a hedge waits for none; other attempts go where they would have, and an agent
    // that refuses for credit is tried again once there is room (retrySameAfter).
    if (roomy.length === 0 && kind === 'hedge' && live.length > 0) return undefined;
    const pool = roomy.length > 0 ? roomy : live;
    if (pool.length === 0) return undefined;
    const scored = pool.map((agent) => ({ agent, expected: expectedMs(agent, model, now) }));
    const best = Math.min(...scored.map((s) => s.expected));
    const near = scored.filter((s) => s.expected <= best * 1.1 + 0.05);
    const choice = near[Math.floor(random() * near.length)]!;
    const latency = latencyOf(choice.agent.id, model);
    const p95 = latency.p95();
    return {
      agentId: choice.agent.id,
      predictedMs: choice.expected,
      timeoutMs: perTryTimeoutMs(choice.expected, request.deadlineAt - now, { p99Ms: latency.p99() }),
      // With a history, hedge past this agent's own p95 (and 2 × expected); without, well past the expectation.
      hedgeAfterMs: Math.max(minHedgeAfterMs, p95 > 0 ? Math.max(p95, 2 * choice.expected) : 4 * choice.expected + 50),
    };
  };

  /**
   * The lease agent with the soonest answer: the router's prediction plus this client's work outstanding there plus how
   * much later than predicted its leased attempts answered lately. The router ranks agents by what they say of
   * themselves and, in direct mode, never sees their replies, so this client's own evidence counts too: an agent it saw
   * fail lately is passed over (as in pickLocal; with none left the SDK picks by itself), its outstanding work is not
   * shared among the workers the agent claims, a number nothing here checks (a claim of many would draw a whole burst),
   * and an agent that answers later than its claims let the router predict (a slow agent claiming to be idle and fast)
   * carries that lateness until it fades (LATE_HALF_LIFE_MS), when it is tried again.
   */
  const pickLeased = (
    request: EngineRequest<SdkRequest>,
    tried: ReadonlySet<string>,
    now: number,
  ): { plan: AttemptPlan; serviceMs: number } | undefined => {
    const lease = request.data.lease;
    if (!lease) return undefined;
    let best: { plan: AttemptPlan; serviceMs: number; score: number } | undefined;
    for (const leased of lease.agents) {
      const agent = fleet.get(leased.agent);
      if (
        agent?.status.state !== 'online' ||
        tried.has(leased.agent) ||
        request.data.excluded?.has(leased.agent) ||
        isSuspect(leased.agent, now) ||
        fleet.silent(leased.agent)
      )
        continue;
      // A leased agent without room in its credit window is passed over (the SDK then picks by itself).
      if (!hasRoom(leased.agent, request)) continue;
      const score = leased.predictedMs + local(leased.agent).outstandingWorkMs + latenessMs(leased.agent, now);
      if (!best || score < best.score) {
        best = {
          score,
          serviceMs: leased.serviceMs,
          // The lease carries the router's per-try timeout and hedge delay; the SDK's hedge floor still applies.
          plan: {
            agentId: leased.agent,
            predictedMs: score,
            timeoutMs: leased.timeoutMs,
            hedgeAfterMs: Math.max(minHedgeAfterMs, leased.hedgeAfterMs),
          },
        };
      }
    }
    return best;
  };

  const leasedWork = new Map<string, number>();
  /** Per model: when a request that the floor would have shed last went out as a probe. */
  const probedAt = new Map<string, number>();

  const noteClaim = (agentId: string, rif: number, workMs: number | undefined, now: number) => {
    const claim = boundClaim(agentId, rif, workMs);
    if (!claim) return;
    const l = local(agentId);
    l.claim = claim;
    l.claimAt = now;
  };

  return {
    pick(request, tried, kind: AttemptKind, now) {
      const first = request.data.viaRouter && tried.size === 0 && kind === 'first';
      const leased = request.data.pinned === undefined ? pickLeased(request, tried, now) : undefined;
      if (first) {
        options.onRouted?.(leased !== undefined);
        if (leased) request.data.routedBy = request.data.lease!.router;
      }
      if (leased) {
        leasedWork.set(`${request.key}/${leased.plan.agentId}`, leased.serviceMs);
        return leased.plan;
      }
      return pickLocal(request, tried, now, kind);
    },
    floorMs(request, tried, now) {
      const { model, pinned } = request.data;
      let floor = Number.POSITIVE_INFINITY;
      // Each agent's own claim of its service time: one honest agent is enough to keep the floor low.
      for (const agent of candidates(model, tried, pinned)) floor = Math.min(floor, serviceMsOf(agent, model));
      if (!Number.isFinite(floor) || floor <= request.deadlineAt - now) return undefined;
      if (now - (probedAt.get(model) ?? Number.NEGATIVE_INFINITY) >= SHED_PROBE_EVERY_MS) {
        probedAt.set(model, now);
        return undefined;
      }
      return floor;
    },
    onSend(attempt) {
      const agent = fleet.get(attempt.agentId);
      const leasedKey = `${attempt.request.key}/${attempt.agentId}`;
      const leasedMs = leasedWork.get(leasedKey);
      const workMs = leasedMs ?? (agent ? serviceMsOf(agent, attempt.request.data.model) : 1);
      if (leasedMs !== undefined) leasedAttempts.add(attempt);
      leasedWork.delete(leasedKey);
      workOf.set(attempt, workMs);
      const l = local(attempt.agentId);
      l.outstanding++;
      l.outstandingWorkMs += workMs;
    },
    onAttemptEnd(attempt, end, now) {
      const l = local(attempt.agentId);
      l.outstanding = Math.max(0, l.outstanding - 1);
      l.outstandingWorkMs = l.outstanding === 0 ? 0 : Math.max(0, l.outstandingWorkMs - (workOf.get(attempt) ?? 0));
      if (end.kind === 'reply') {
        const reply = end.reply.reply;
        const attemptMs = now - attempt.sentAt;
        // The agent's times and queue are claims, bounded by what this client measured and was told.
        const { queueMs, execMs, loadMs } = fitTimesToAttempt(reply, attemptMs);
        const networkMs = Math.max(0, attemptMs - queueMs - execMs - loadMs);
        l.networkMs += NETWORK_EWMA_ALPHA * (networkMs - l.networkMs);
        latencyOf(attempt.agentId, attempt.request.data.model).add(attemptMs);
        if (leasedAttempts.has(attempt) && attempt.plan.predictedMs !== undefined)
          noteLate(attempt.agentId, attemptMs - attempt.plan.predictedMs, now);
        l.repliedAt.set(attempt.request.data.model, now);
        if (loadMs > 0) l.loadMs.set(attempt.request.data.model, loadMs);
        if (reply.rif !== undefined) noteClaim(attempt.agentId, reply.rif, reply.workMs, now);
      } else if (end.kind === 'error') {
        const claim = end.error.details;
        if (typeof claim?.rif === 'number')
          noteClaim(attempt.agentId, claim.rif, typeof claim.workMs === 'number' ? claim.workMs : undefined, now);
        if (AGENT_FAULTS.has(end.error.code)) l.suspectUntil = now + SUSPECT_MS;
      } else if (end.kind === 'cancelled' && end.reason !== 'closed') {
        // An attempt past its per-try timeout and cancelled unanswered was at least this late. Not one moved on because
        // its agent went silent: silence has its own rule (docs/routing.md, "Dead agents"), and an agent back from it
        // is judged afresh.
        if (
          attempt.timedOut &&
          leasedAttempts.has(attempt) &&
          attempt.plan.predictedMs !== undefined &&
          !fleet.silent(attempt.agentId, now)
        )
          noteLate(attempt.agentId, now - attempt.sentAt - attempt.plan.predictedMs, now);
        options.onCancelled?.(attempt.request.key, attempt.agentId);
      }
    },
    retrySameAfter: options.retrySameAfter
      ? (attempt, error) =>
          options.retrySameAfter!(attempt.agentId, error, attempt.request.key, attempt.request.data.model, attempt.request.deadlineAt)
      : undefined,
    outstanding: (agentId) => locals.get(agentId)?.outstanding ?? 0,
    claimedQueue: (agentId) => locals.get(agentId)?.claim,
    hasCandidate: (model, pinned) => candidates(model, new Set(), pinned).length > 0,
    suspects(model, now) {
      const online = fleet.online(model);
      const failing = online.filter((a) => isSuspect(a.id, now)).map((a) => a.id);
      return failing.length < online.length ? failing.slice(0, MAX_EXCLUDED) : [];
    },
  } satisfies SdkPolicy;
}
