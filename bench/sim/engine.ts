/**
 * The discrete-event simulator: virtual clock in ms, one event heap, FIFO queues with per-node workers,
 * open-loop arrivals from the pre-generated trace. It plays the agents (queues, cold loads, crashes,
 * fail-fast errors, load reports) and the network. The router's runtime (per-try timeouts, hedges,
 * retries and failover within the budget, cancels, the one deadline) is the request engine of
 * @edge-mesh/client itself, run on virtual time, with each policy plugged in as the engine's policy.
 * A policy sees only what a real router would.
 */
import { type Attempt, type AttemptEnd, createRequestEngine, type EngineClock, type EnginePolicy, TailBudget } from '@edge-mesh/client';
import { MeshError, type MeshErrorCode } from '@edge-mesh/protocol';
import { EventHeap } from './heap.ts';
import { type LatencySummary, summarize } from './metrics.ts';
import { Rng } from './rng.ts';
import type { AnyPolicy, EngineSimPolicy, Policy, PolicyEnv, ProbeReply, ReplyInfo, SimAsk, SimRequest } from './types.ts';
import {
  BROKER_HOP_MS,
  CLIENT_HEIGHT_MS,
  DRAWS,
  FAIL_FAST_MS,
  LOAD_REPORT_MS,
  type NodeTruth,
  SERVICE_SIGMA,
  type World,
} from './world.ts';

enum Ev {
  Arrival,
  AtNode,
  SvcDone,
  Reply,
  Timer,
  LoadTick,
  LoadDeliver,
  NodeDown,
  NodeUp,
  StatusDeliver,
  ModelLoaded,
  ProbeReply,
}

const DOWN_BYTES = 2_000;
const MODEL = 'm';

/** One attempt as the simulated agent and network see it. */
interface Job {
  id: number;
  req: number;
  node: number;
  /** The attempt's index within its request: picks its random draws. */
  k: number;
  sentAt: number;
  /** When the cancel message reaches the agent (Infinity: never cancelled). */
  cancelAt: number;
  arrivedAt: number;
  ok: boolean;
  queueMs: number;
  execMs: number;
  loadMs: number;
  rif: number;
  warm: boolean;
  key: string;
  agentId: string;
}

interface ReqRun {
  req: SimRequest;
  done: boolean;
  latency: number;
  attempts: number;
}

export interface SimResult extends LatencySummary {
  policy: string;
  scenario: string;
  load: number;
  requests: number;
  hedges: number;
  retries: number;
  extra_load: number;
  probes_per_request: number;
  /** Share of successful replies per class. */
  served: Record<string, number>;
  /** Ramp: p99 per load step. */
  steps?: { load: number; p99_ms: number; fail_rate: number }[];
  wall_ms: number;
}

/**
 * A baseline `Policy` as an engine policy: its pick for every attempt, its tail (per-try timeout, hedge
 * delay) as the attempt's plan, and its bookkeeping hooks on send, reply and failure. An attempt that
 * timed out was reported as a failure then; its late answer still wins the request but is not reported twice.
 */
function baselineAsEngine(policy: Policy, nodes: readonly NodeTruth[], nodeOf: (agentId: string) => number): EngineSimPolicy {
  const tail = policy.tail;
  const purposeOf = (kind: string): 'primary' | 'hedge' | 'retry' => (kind === 'first' ? 'primary' : kind === 'hedge' ? 'hedge' : 'retry');
  const engine: EnginePolicy<SimAsk, ReplyInfo> = {
    pick(request, tried, kind, now) {
      const exclude = tried.size > 0 ? new Set([...tried].map(nodeOf)) : null;
      const node = policy.pick(request.data.req, exclude, now, purposeOf(kind));
      if (node < 0) return undefined;
      const agentId = nodes[node]!.agentId;
      if (!tail) return { agentId };
      const hedge = tail.hedgeDelayMs?.(request.data.req, node, now);
      return {
        agentId,
        timeoutMs: tail.perTryTimeoutMs(request.data.req, node, now),
        ...(hedge !== null && hedge !== undefined ? { hedgeAfterMs: hedge } : {}),
      };
    },
    onSend: (a, now) => policy.onSend(nodeOf(a.agentId), a.request.data.req, now),
    onTimeout: (a, now) => policy.onFailure(nodeOf(a.agentId), a.request.data.req, 'timeout', now - a.sentAt, now),
    onAttemptEnd(a: Attempt<SimAsk>, end: AttemptEnd<ReplyInfo>, now) {
      if (a.timedOut) return;
      const node = nodeOf(a.agentId);
      if (end.kind === 'reply') policy.onReply(node, a.request.data.req, end.reply, now);
      else if (end.kind === 'error') policy.onFailure(node, a.request.data.req, 'error', now - a.sentAt, now);
      else policy.onFailure(node, a.request.data.req, end.reason === 'answered-elsewhere' ? 'cancel' : 'timeout', now - a.sentAt, now);
    },
  };
  return {
    name: policy.name,
    kind: 'engine',
    init: (env) => policy.init(env),
    policy: () => engine,
    ask: (req) => ({ model: MODEL, bytesUp: req.upBytes, bytesDown: req.downBytes }),
    maxAttempts: tail?.maxAttempts ?? 1,
    budget: tail?.budget,
    ...(policy.onLoadReport
      ? { onLoadReport: (node: number, rif: number, warm: boolean, now: number) => policy.onLoadReport!(node, rif, warm, now) }
      : {}),
    ...(policy.onStatus ? { onStatus: (node: number, up: boolean, now: number) => policy.onStatus!(node, up, now) } : {}),
    ...(tail
      ? {
          retryable: (code: MeshErrorCode) =>
            code === 'MESH_TIMEOUT' ? tail.retryOnTimeout : code === 'MESH_AGENT_LOST' ? true : tail.retryOnError,
        }
      : {}),
  };
}

export function runSim(world: World, input: AnyPolicy): SimResult {
  const wall0 = performance.now();
  const { cfg, nodes, trace } = world;
  const N = nodes.length;
  const heap = new EventHeap();
  let now = 0;

  const nodeIndex = new Map(nodes.map((n) => [n.agentId, n.id]));
  const nodeOf = (agentId: string) => nodeIndex.get(agentId)!;
  const sim: EngineSimPolicy = 'kind' in input ? input : baselineAsEngine(input, nodes, nodeOf);

  // Agent state.
  const up = new Uint8Array(N).fill(1);
  const epoch = new Int32Array(N);
  const busy = new Int32Array(N);
  const queues: number[][] = nodes.map(() => []);
  const qHead = new Int32Array(N);
  const readyAt = new Float64Array(N); // model usable from (Infinity: cold and not loading)
  const loadPending = new Float64Array(N); // cold-load ms to attribute to the next request served
  const execEwma = new Float64Array(N);
  for (const n of nodes) {
    readyAt[n.id] = n.warm ? 0 : Infinity;
    execEwma[n.id] = n.benchMs;
  }
  const warmNow = (i: number) => readyAt[i]! <= now;

  const jobs: Job[] = [];
  const runs: ReqRun[] = [];
  const probeCbs = new Map<number, { node: number; reply: ProbeReply; cb: (node: number, r: ProbeReply, now: number) => void }>();
  let probeSeq = 0;
  let probes = 0;
  const served: Record<string, number> = {};

  const dist = (x1: number, y1: number, x2: number, y2: number) => Math.hypot(x1 - x2, y1 - y2);
  const clientOneWay = (r: SimRequest, n: NodeTruth) => dist(r.cx, r.cy, n.x, n.y) + n.heightMs + CLIENT_HEIGHT_MS + BROKER_HOP_MS;
  const routerOneWay = (n: NodeTruth) => dist(world.routerX, world.routerY, n.x, n.y) + n.heightMs + BROKER_HOP_MS;
  const xfer = (bytes: number, n: NodeTruth) => (bytes * 8) / (n.bwMbps * 1000);

  const env: PolicyEnv = {
    nodes,
    rng: new Rng(cfg.seed, 'policy'),
    now: () => now,
    deadlineMs: cfg.deadlineMs,
    probe(node, cb) {
      probes++;
      if (!up[node]) return; // no answer from a dead agent
      const n = nodes[node]!;
      const rif = n.failFast ? 0 : queues[node]!.length - qHead[node]! + busy[node]!;
      const latencyMs = n.failFast
        ? FAIL_FAST_MS
        : execEwma[node]! * Math.max(1, (rif + 1) / n.slots) + (warmNow(node) ? 0 : Math.max(0, readyAt[node]! - now));
      const id = probeSeq++;
      probeCbs.set(id, { node, reply: { rif, latencyMs }, cb });
      heap.push(now + 2 * routerOneWay(n), Ev.ProbeReply, id);
    },
  };
  sim.init(env);

  // The engine's clock: virtual time, timers on the event heap.
  const timers = new Map<number, () => void>();
  let timerSeq = 0;
  const clock: EngineClock = {
    now: () => now,
    setTimer(delayMs, fire) {
      const id = timerSeq++;
      timers.set(id, fire);
      heap.push(now + delayMs, Ev.Timer, id);
      return id;
    },
    clearTimer: (id) => {
      timers.delete(id as number);
    },
  };
  const jobOf = new Map<string, number>(); // `${key}/${agentId}` -> job id
  const engine = createRequestEngine<SimAsk, ReplyInfo>({
    policy: sim.policy(),
    clock,
    ...(sim.budget ? { budget: new TailBudget(sim.budget, 0) } : {}),
    maxAttempts: sim.maxAttempts,
    ...(sim.retryable ? { retryable: sim.retryable } : {}),
    transport: {
      send(attempt) {
        const req = attempt.request.data.req;
        const node = nodeOf(attempt.agentId);
        const n = nodes[node]!;
        const job: Job = {
          id: jobs.length,
          req: req.id,
          node,
          k: attempt.index,
          sentAt: now,
          cancelAt: Infinity,
          arrivedAt: Number.NaN,
          ok: false,
          queueMs: 0,
          execMs: 0,
          loadMs: 0,
          rif: 0,
          warm: true,
          key: attempt.request.key,
          agentId: attempt.agentId,
        };
        jobs.push(job);
        jobOf.set(`${job.key}/${job.agentId}`, job.id);
        runs[req.id]!.attempts++;
        const j = req.id * DRAWS + (job.k % DRAWS);
        heap.push(now + clientOneWay(req, n) * trace.jitUp[j]! + xfer(req.upBytes, n), Ev.AtNode, job.id);
      },
      cancel(attempt) {
        const id = jobOf.get(`${attempt.request.key}/${attempt.agentId}`);
        if (id === undefined) return;
        const job = jobs[id]!;
        job.cancelAt = Math.min(job.cancelAt, now + routerOneWay(nodes[job.node]!));
      },
    },
  });

  const requestOf = (i: number): SimRequest => ({
    id: i,
    t: trace.t[i]!,
    clientSite: trace.site[i]!,
    cx: trace.cx[i]!,
    cy: trace.cy[i]!,
    upBytes: trace.upBytes[i]!,
    downBytes: DOWN_BYTES,
    model: MODEL,
    deadline: trace.t[i]! + cfg.deadlineMs,
  });

  const startWork = (i: number) => {
    const n = nodes[i]!;
    const q = queues[i]!;
    while (busy[i]! < n.slots && qHead[i]! < q.length && warmNow(i)) {
      const job = jobs[q[qHead[i]!]!]!;
      qHead[i]!++;
      const run = runs[job.req]!;
      // Agents drop queued work that was cancelled or can no longer make its deadline.
      if (job.cancelAt <= now || run.req.deadline <= now) continue;
      const j = job.req * DRAWS + (job.k % DRAWS);
      const gray = now >= n.grayStart && now < n.grayEnd ? n.grayMult : 1;
      const svc = n.medianMs * Math.exp(SERVICE_SIGMA * trace.z[j]!) * trace.strag[j]! * gray;
      job.queueMs = now - job.arrivedAt;
      job.execMs = svc;
      job.loadMs = loadPending[i]!;
      loadPending[i] = 0;
      busy[i]!++;
      heap.push(now + svc, Ev.SvcDone, job.id, epoch[i]!);
    }
    if (qHead[i]! > 1024 && qHead[i]! * 2 > q.length) {
      queues[i] = q.slice(qHead[i]!);
      qHead[i] = 0;
    }
  };

  const replyBack = (job: Job, ok: boolean) => {
    const n = nodes[job.node]!;
    const run = runs[job.req]!;
    const j = job.req * DRAWS + (job.k % DRAWS);
    job.ok = ok;
    job.rif = n.failFast ? 0 : queues[job.node]!.length - qHead[job.node]! + busy[job.node]!;
    job.warm = warmNow(job.node);
    heap.push(now + clientOneWay(run.req, n) * trace.jitDown[j]! + xfer(DOWN_BYTES, n), Ev.Reply, job.id);
  };

  // Seed the heap: arrivals, load ticks, churn.
  for (let i = 0; i < trace.n; i++) heap.push(trace.t[i]!, Ev.Arrival, i);
  const endT = cfg.durationMs + cfg.deadlineMs;
  for (const n of nodes) {
    heap.push(n.reportPhase, Ev.LoadTick, n.id);
    for (let c = 0; c < n.churn.length; c += 2) {
      heap.push(n.churn[c]!, Ev.NodeDown, n.id, c >> 1);
      heap.push(n.churn[c + 1]!, Ev.NodeUp, n.id);
    }
  }

  for (let ev = heap.pop(); ev !== undefined; ev = heap.pop()) {
    now = ev.t;
    switch (ev.kind) {
      case Ev.Arrival: {
        const req = requestOf(ev.a);
        const run: ReqRun = { req, done: false, latency: Number.NaN, attempts: 0 };
        runs[ev.a] = run;
        engine.start({ key: String(ev.a), deadlineAt: req.deadline, data: { ...sim.ask(req), req }, model: MODEL }, (outcome) => {
          run.done = true;
          run.latency = outcome.ok ? now - req.t : Infinity;
          if (outcome.ok) {
            const cls = nodes[nodeOf(outcome.attempt.agentId)]!.cls;
            served[cls] = (served[cls] ?? 0) + 1;
          }
        });
        break;
      }
      case Ev.Timer: {
        const fire = timers.get(ev.a);
        if (fire) {
          timers.delete(ev.a);
          fire();
        }
        break;
      }
      case Ev.AtNode: {
        const job = jobs[ev.a]!;
        const i = job.node;
        const n = nodes[i]!;
        if (!up[i]) break; // lost: a dead agent never answers
        job.arrivedAt = now;
        if (n.failFast) {
          heap.push(now + FAIL_FAST_MS, Ev.SvcDone, job.id, -1 - epoch[i]!);
          break;
        }
        if (readyAt[i] === Infinity) {
          readyAt[i] = now + n.coldLoadMs;
          loadPending[i] = n.coldLoadMs;
          heap.push(readyAt[i]!, Ev.ModelLoaded, i, epoch[i]!);
        }
        queues[i]!.push(job.id);
        startWork(i);
        break;
      }
      case Ev.SvcDone: {
        const job = jobs[ev.a]!;
        const i = job.node;
        if (ev.b < 0) {
          // fail-fast error reply
          if (-1 - ev.b !== epoch[i] || !up[i]) break;
          replyBack(job, false);
          break;
        }
        if (ev.b !== epoch[i] || !up[i]) break; // the node crashed meanwhile
        busy[i]!--;
        execEwma[i] = 0.9 * execEwma[i]! + 0.1 * job.execMs;
        replyBack(job, true);
        startWork(i);
        break;
      }
      case Ev.ModelLoaded: {
        if (ev.b === epoch[ev.a] && up[ev.a]) startWork(ev.a);
        break;
      }
      case Ev.Reply: {
        const job = jobs[ev.a]!;
        const run = runs[job.req]!;
        if (job.ok) {
          engine.answer(job.key, job.agentId, {
            ok: true,
            queueMs: job.queueMs,
            execMs: job.execMs,
            loadMs: job.loadMs,
            rif: job.rif,
            sentAt: job.sentAt,
            upBytes: run.req.upBytes,
            warm: job.warm,
          });
        } else engine.fail(job.key, job.agentId, new MeshError('MESH_INFERENCE_FAILED', 'fail-fast node'));
        break;
      }
      case Ev.LoadTick: {
        const i = ev.a;
        const n = nodes[i]!;
        if (up[i]) {
          const rif = n.failFast ? 0 : queues[i]!.length - qHead[i]! + busy[i]!;
          heap.push(now + routerOneWay(n), Ev.LoadDeliver, i, rif * 2 + (warmNow(i) ? 1 : 0));
        }
        if (now + LOAD_REPORT_MS < endT) heap.push(now + LOAD_REPORT_MS, Ev.LoadTick, i);
        break;
      }
      case Ev.LoadDeliver: {
        if (up[ev.a]) sim.onLoadReport?.(ev.a, ev.b >> 1, (ev.b & 1) === 1, now);
        break;
      }
      case Ev.NodeDown: {
        const i = ev.a;
        up[i] = 0;
        epoch[i]!++;
        busy[i] = 0;
        queues[i] = [];
        qHead[i] = 0;
        readyAt[i] = nodes[i]!.warm || readyAt[i] !== Infinity ? 0 : Infinity;
        loadPending[i] = 0;
        heap.push(now + nodes[i]!.detectDelay[ev.b]!, Ev.StatusDeliver, i, 0);
        break;
      }
      case Ev.NodeUp: {
        up[ev.a] = 1;
        heap.push(now + routerOneWay(nodes[ev.a]!), Ev.StatusDeliver, ev.a, 1);
        break;
      }
      case Ev.StatusDeliver: {
        // Deliver only if still true (a node back up before its death was noticed sends its birth anyway).
        if (ev.b === 1 || !up[ev.a]) {
          sim.onStatus?.(ev.a, ev.b === 1, now);
          // The live router fails over what the dead agent held, as the request engine does on an offline status.
          if (ev.b === 0) engine.agentLost(nodes[ev.a]!.agentId);
        }
        break;
      }
      case Ev.ProbeReply: {
        const p = probeCbs.get(ev.a)!;
        probeCbs.delete(ev.a);
        p.cb(p.node, p.reply, now);
        break;
      }
    }
  }

  // Measure requests after the warm-up.
  const lat: number[] = [];
  const stepLat: number[][] = world.steps.map(() => []);
  let originals = 0;
  let extra = 0;
  for (const run of runs) {
    if (run.req.t < cfg.warmupMs) continue;
    originals++;
    extra += run.attempts > 0 ? run.attempts - 1 : 0;
    lat.push(run.done ? run.latency : Infinity);
    stepLat[trace.step[run.req.id]!]!.push(run.done ? run.latency : Infinity);
  }
  const summary = summarize(lat);
  const totalServed = Object.values(served).reduce((a, b) => a + b, 0);
  const result: SimResult = {
    policy: sim.name,
    scenario: cfg.scenario,
    load: cfg.scenario === 'ramp' ? Number.NaN : cfg.load,
    requests: originals,
    ...summary,
    hedges: engine.counters.hedges,
    retries: engine.counters.retries + engine.counters.failovers,
    extra_load: originals > 0 ? extra / originals : 0,
    probes_per_request: trace.n > 0 ? probes / trace.n : 0,
    served: Object.fromEntries(Object.entries(served).map(([k, v]) => [k, v / Math.max(1, totalServed)])),
    wall_ms: performance.now() - wall0,
  };
  if (world.steps.length > 1) {
    result.steps = world.steps.map((load, s) => {
      const sm = summarize(stepLat[s]!);
      return { load, p99_ms: sm.p99_ms, fail_rate: sm.fail_rate };
    });
  }
  return result;
}
