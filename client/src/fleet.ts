/**
 * The fleet as one client sees it (docs/protocol.md, "Statuses and load"): every agent's latest
 * verified status and load report, built from the retained `status` topics and the `load` heartbeats.
 * The SDK and the router read the fleet through this one view, so they agree on who is serving.
 *
 * What a sender could gain by lying, and what the view does about it:
 * - a status published for another agent, or signed by a key its id does not derive from, would steer
 *   traffic or evict a genuine agent: it is ignored (and counted) unless it verifies;
 * - a load report from an agent with no verified status here is ignored, and one naming another agent too;
 * - an `offline` status ends the agent's outstanding work (`onAgentLost`) only when it verifies.
 */
import { type AgentLoad, type AgentStatus, DEFAULT_MAX_MESSAGE_BYTES, decodeMessage, type ModelInfo } from '@edge-mesh/protocol';
import type { MeshLogger } from './logger.ts';
import { SILENT_LOGGER } from './logger.ts';
import { readAgentStatus } from './receive.ts';
import { type ChangeSignal, changeSignal } from './signal.ts';

export interface FleetAgent {
  readonly id: string;
  status: AgentStatus;
  /** The latest load report of the agent's current session, if any. */
  load: AgentLoad | undefined;
  /** When `load` arrived (the view's clock, ms). */
  loadAt: number;
  /** When the agent was last heard from: a status, a load report or a reply (the view's clock, ms). */
  heardAt: number;
  /** Its heartbeat period as received (an EWMA of the gaps between its load reports, ms); NaN until two arrive. */
  heartbeatMs: number;
  /** Per model reported loading: when the first report of this load arrived (the view's clock, ms). */
  loadingSince: Map<string, number>;
}

export interface FleetCounters {
  /** Statuses ignored because they were unsigned, mis-signed or signed by a key their id does not derive from. */
  statusRejected: number;
  /** Statuses ignored because they did not decode as a status or named another agent than their topic. */
  statusMalformed: number;
  /** Load reports ignored because their agent has no verified status here. */
  loadIgnored: number;
  /** Offline statuses (late last wills) ignored because they name an older session than the agent's live one. */
  staleOffline: number;
  /** Retained statuses ignored because a status of the same session had already come live on this connection. */
  staleRetained: number;
  /**
   * Statuses held back because their agent sent more status bytes than `statusBytesPerSecond` allows; each held one is
   * replaced by the next, and the latest is applied once the agent's budget allows it.
   */
  statusDeferred: number;
}

export interface FleetViewOptions {
  /** Use only statuses signed by the key their agent id derives from (default true). */
  requireSignedStatus?: boolean;
  maxMessageBytes?: number;
  /** A load report older than this no longer counts (default 5 s). */
  loadStaleMs?: number;
  /** The clock for load ages (default `performance.now`). */
  now?: () => number;
  logger?: MeshLogger;
  /**
   * An online agent counts as silent (presumed dead, though its connection and so its last will may
   * linger) when nothing was heard from it for `silenceBeats` heartbeat periods, and at least
   * `minSilenceMs` (defaults 3 and 1 s). Only agents whose period is known (two load reports) are judged,
   * and only while some other agent was heard from within that time: when every agent is quiet, it is
   * this side's link or process that stalled, and nobody is presumed dead for it.
   */
  silenceBeats?: number;
  minSilenceMs?: number;
  /** The agent went offline or restarted (a new session): its outstanding work will never be answered. */
  onAgentLost?: (agentId: string, reason: 'offline' | 'restarted') => void;
  /** A verified status was applied (`previous` is the one it replaced). */
  onStatus?: (status: AgentStatus, previous: AgentStatus | undefined) => void;
  /** A load report was applied. */
  onLoad?: (load: AgentLoad) => void;
  /**
   * Status bytes read and checked per agent and second, sustained (default 64 KiB) and at once (default 1 MiB).
   * Checking a status costs its decode and signature (6.4 ms for a 366 KB one of 256 models): an agent republishing
   * its status in a loop would otherwise take a core in every router and app. Past the budget an agent's statuses
   * wait, and only its latest is applied when the budget allows (`statusDeferred`). Empty payloads (an agent
   * forgotten) are never held back.
   */
  statusBytesPerSecond?: number;
  statusBurstBytes?: number;
}

export interface FleetView {
  /**
   * Applies a payload from `topics.agentStatus(agentId)`; an empty one (retained status cleared) forgets the agent.
   * `retained` is the MQTT retain flag of the delivery: set on the copies the broker hands a new subscription (see
   * `isStaleRetained`).
   */
  onStatus(agentId: string, payload: Uint8Array, retained?: boolean): void;
  /** The client's broker connection is new (call before subscribing): retained copies are expected again. */
  onConnect(): void;
  /** Applies a payload from `topics.agentLoad(agentId)`. */
  onLoad(agentId: string, payload: Uint8Array): void;
  get(agentId: string): FleetAgent | undefined;
  all(): IterableIterator<FleetAgent>;
  /** Agents whose status is `online` and that serve `model` (any model when omitted). */
  online(model?: string): FleetAgent[];
  /** The load report of an agent, unless it is older than `loadStaleMs`. */
  freshLoad(agent: FleetAgent): AgentLoad | undefined;
  /** A reply from the agent arrived: it is alive. */
  heard(agentId: string): void;
  /** See `silenceBeats`: online, its heartbeat period known, nothing heard for that many periods while others were. */
  silent(agentId: string, now?: number): boolean;
  /** Models served by at least one online agent (the first status seen gives the metadata). */
  models(): ModelInfo[];
  readonly counters: Readonly<FleetCounters>;
  /** Notified on every status change. */
  readonly changes: ChangeSignal;
}

/**
 * Whether `status` is an offline status of an older session than the one `previous` announced. An offline status
 * ends only the session it names: a restarted agent's old last will can come after the new session's announcement (an
 * engine that publishes wills late, such as a NATS node noticing the dead connection after the new one came up), and
 * taking it would mark a live agent dead and fail its work.
 */
export function isStaleOffline(
  previous: Pick<AgentStatus, 'session' | 'state'> | undefined,
  status: Pick<AgentStatus, 'session' | 'state'>,
): boolean {
  return status.state === 'offline' && previous !== undefined && previous.session !== status.session && previous.state !== 'offline';
}

/**
 * Whether a retained copy of a status is older news than what this connection already received live. A broker sends
 * a new subscription the retained status it holds, through a queue of its own, while live statuses flow to the same
 * subscription: aedes reads the retained store when the SUBSCRIBE is handled and writes each copy only after the one
 * before it was written (aedes/lib/handlers/subscribe.js, `sendRetained`), so a router subscribing to a busy fleet got
 * an agent's retained "online" 140 ms after the will that agent's death had published live, and held a dead agent
 * online. Live messages are published after the subscription began, so a retained copy that comes after a live status
 * of the same session never says anything newer: it is the same status or an older one. Another session's retained copy
 * is still taken (a session is ended only by an offline status naming it; see `isStaleOffline`).
 */
export function isStaleRetained(liveSession: string | undefined, status: Pick<AgentStatus, 'session'>, retained: boolean): boolean {
  return retained && liveSession !== undefined && liveSession === status.session;
}

/** One agent's status budget: the bytes it may still send now, and the status held back for want of them. */
interface StatusBudget {
  bytes: number;
  at: number;
  held: { payload: Uint8Array; retained: boolean } | undefined;
  timer: NodeJS.Timeout | undefined;
}

export function createFleetView(options: FleetViewOptions = {}): FleetView {
  const {
    requireSignedStatus = true,
    maxMessageBytes = DEFAULT_MAX_MESSAGE_BYTES,
    loadStaleMs = 5_000,
    now = () => performance.now(),
    logger = SILENT_LOGGER,
    onAgentLost,
    silenceBeats = 3,
    minSilenceMs = 1_000,
    statusBytesPerSecond = 64 * 1024,
    statusBurstBytes = 1024 * 1024,
  } = options;
  const agents = new Map<string, FleetAgent>();
  const counters: FleetCounters = {
    statusRejected: 0,
    statusMalformed: 0,
    loadIgnored: 0,
    staleOffline: 0,
    staleRetained: 0,
    statusDeferred: 0,
  };
  /** Per agent, its status budget (`statusBytesPerSecond`). */
  const statusBudgets = new Map<string, StatusBudget>();
  /** Adds what `statusBytesPerSecond` gave the budget since it was last looked at. */
  const refill = (b: StatusBudget, t: number) => {
    b.bytes = Math.min(statusBurstBytes, b.bytes + ((t - b.at) * statusBytesPerSecond) / 1000);
    b.at = t;
  };
  const costOf = (payload: Uint8Array) => Math.min(payload.byteLength, statusBurstBytes);
  /** Whether `agentId` may have `payload` checked now; if not, it is held (replacing any held before) and applied later. */
  const withinBudget = (agentId: string, payload: Uint8Array, retained: boolean): boolean => {
    const t = now();
    let b = statusBudgets.get(agentId);
    if (!b) {
      b = { bytes: statusBurstBytes, at: t, held: undefined, timer: undefined };
      statusBudgets.set(agentId, b);
    }
    refill(b, t);
    const cost = costOf(payload);
    if (!b.held && b.bytes >= cost) {
      b.bytes -= cost;
      return false;
    }
    counters.statusDeferred++;
    b.held = { payload, retained };
    const budget = b;
    const waitMs = Math.max(1, ((cost - b.bytes) * 1000) / statusBytesPerSecond);
    clearTimeout(b.timer);
    b.timer = setTimeout(() => {
      budget.timer = undefined;
      const held = budget.held;
      budget.held = undefined;
      if (!held) return;
      // Paid for when applied (the budget may go below zero: the next status waits the longer).
      refill(budget, now());
      budget.bytes -= costOf(held.payload);
      applyStatus(agentId, held.payload, held.retained);
    }, waitMs);
    b.timer.unref?.();
    return true;
  };
  /** When any agent was last heard from. */
  let anyHeardAt = Number.NEGATIVE_INFINITY;
  const changes = changeSignal();
  /** Per agent, the session of the last status that came live (not a retained copy) on this connection. */
  const liveSessions = new Map<string, string | undefined>();

  const serves = (a: FleetAgent, model: string | undefined) => model === undefined || (a.status.models ?? []).some((m) => m.name === model);

  /** Checks a status and, when it holds, applies it (see `onStatus`). */
  const applyStatus = (agentId: string, payload: Uint8Array, retained: boolean): void => {
    const reading = readAgentStatus(agentId, payload, { maxBytes: maxMessageBytes, requireSigned: requireSignedStatus });
    if (!reading.ok) {
      if (reading.reason === 'unverified') counters.statusRejected++;
      else counters.statusMalformed++;
      logger.debug({ agentId, reason: reading.reason, err: reading.message }, 'ignoring status');
      return;
    }
    const { status } = reading;
    if (isStaleRetained(liveSessions.get(agentId), status, retained)) {
      counters.staleRetained++;
      logger.debug({ agentId, session: status.session, state: status.state }, 'ignoring a retained status older than a live one');
      return;
    }
    if (!retained) liveSessions.set(agentId, status.session);
    const known = agents.get(agentId);
    const previous = known?.status;
    const sameSession = previous !== undefined && previous.session === status.session;
    if (isStaleOffline(previous, status)) {
      counters.staleOffline++;
      logger.debug({ agentId, session: status.session, current: previous?.session }, 'ignoring the offline status of an older session');
      return;
    }
    if (known) {
      known.status = status;
      known.heardAt = now();
      if (!sameSession) {
        known.load = undefined;
        known.loadAt = 0;
        known.heartbeatMs = Number.NaN;
        known.loadingSince.clear();
      }
    } else
      agents.set(agentId, {
        id: agentId,
        status,
        load: undefined,
        loadAt: 0,
        heardAt: now(),
        heartbeatMs: Number.NaN,
        loadingSince: new Map(),
      });
    options.onStatus?.(status, previous);
    if (status.state === 'offline') {
      if (previous !== undefined && previous.state !== 'offline') {
        logger.info({ agentId }, 'agent offline');
        onAgentLost?.(agentId, 'offline');
      }
    } else if (previous !== undefined && !sameSession && previous.state !== 'offline') {
      // A new session: whatever the old one held is gone with it.
      onAgentLost?.(agentId, 'restarted');
    }
    changes.notify();
  };

  return {
    onConnect() {
      liveSessions.clear();
    },
    onStatus(agentId, payload, retained = false) {
      if (payload.byteLength === 0) {
        const b = statusBudgets.get(agentId);
        if (b) {
          clearTimeout(b.timer);
          statusBudgets.delete(agentId);
        }
        if (agents.delete(agentId)) changes.notify();
        return;
      }
      if (withinBudget(agentId, payload, retained)) return;
      applyStatus(agentId, payload, retained);
    },
    onLoad(agentId, payload) {
      const agent = agents.get(agentId);
      if (!agent) {
        counters.loadIgnored++;
        return;
      }
      let load: AgentLoad;
      try {
        load = decodeMessage(payload, ['load'], maxMessageBytes);
      } catch (err) {
        logger.debug({ agentId, err: (err as Error).message }, 'ignoring bad load report');
        return;
      }
      if (load.agent !== agentId) return;
      const at = now();
      if (agent.loadAt > 0) {
        const gap = at - agent.loadAt;
        agent.heartbeatMs = Number.isNaN(agent.heartbeatMs) ? gap : agent.heartbeatMs + 0.2 * (gap - agent.heartbeatMs);
      }
      for (const [model, m] of Object.entries(load.models)) {
        if (m.state !== 'loading') agent.loadingSince.delete(model);
        else if (!agent.loadingSince.has(model)) agent.loadingSince.set(model, at);
      }
      agent.load = load;
      agent.loadAt = at;
      agent.heardAt = at;
      anyHeardAt = at;
      options.onLoad?.(load);
    },
    heard(agentId) {
      const agent = agents.get(agentId);
      if (!agent) return;
      agent.heardAt = now();
      anyHeardAt = agent.heardAt;
    },
    silent(agentId, at = now()) {
      const agent = agents.get(agentId);
      if (agent?.status.state !== 'online' || !(agent.heartbeatMs > 0)) return false;
      const quietMs = Math.max(minSilenceMs, silenceBeats * agent.heartbeatMs);
      return at - agent.heardAt > quietMs && at - anyHeardAt <= quietMs;
    },
    get: (agentId) => agents.get(agentId),
    all: () => agents.values(),
    online(model) {
      const out: FleetAgent[] = [];
      for (const a of agents.values()) if (a.status.state === 'online' && serves(a, model)) out.push(a);
      return out;
    },
    freshLoad(agent) {
      return agent.load !== undefined && now() - agent.loadAt < loadStaleMs ? agent.load : undefined;
    },
    models() {
      const byName = new Map<string, ModelInfo>();
      for (const a of agents.values()) {
        if (a.status.state !== 'online') continue;
        for (const m of a.status.models ?? []) if (!byName.has(m.name)) byName.set(m.name, m);
      }
      return [...byName.values()];
    },
    counters,
    changes,
  };
}

/** Resolves once `ready()` holds, re-checking on every fleet change; rejects with `onTimeout()` after `timeoutMs`. */
export async function waitUntil(changes: ChangeSignal, ready: () => boolean, timeoutMs: number, onTimeout: () => Error): Promise<void> {
  const until = Date.now() + timeoutMs;
  while (!ready()) {
    if (Date.now() >= until) throw onTimeout();
    await changes.wait(Math.min(250, until - Date.now()));
  }
}
