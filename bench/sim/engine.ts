/**
 * The discrete-event simulator: virtual clock in ms, one event heap. It plays the agents (a FIFO per
 * node with its workers, cold loads per model, crashes, fail-fast errors, load reports every second,
 * statuses and LWTs) and the network (every message through the broker, payload transfer at the node's
 * link rate). The routers are the request engine of @edge-mesh/client itself on virtual time, one per
 * router, each with its own instance of the policy under test, fed only what the wire carries.
 */
import { type Attempt, createRequestEngine, type EngineClock, type RequestEngine } from '@edge-mesh/client';
import {
  type AgentLoad,
  type AgentStatus,
  ErrorReplySchema,
  InferReplySchema,
  MeshError,
  type MeshErrorCode,
  ModelLoadSchema,
  PROTOCOL_VERSION,
} from '@edge-mesh/protocol';
import type { ProbeAnswer } from '@edge-mesh/router';
import { EventHeap } from './heap.ts';
import { type LatencySummary, summarize } from './metrics.ts';
import { Rng } from './rng.ts';
import type { PolicyEnv, PolicyFactory, SimAsk, SimPolicy, SimReply, SimRequest, Truth } from './types.ts';
import { BORN_MS, DRAWS, FAIL_FAST_MS, LOAD_REPORT_MS, MODELS, type NodeTruth, serviceMs, type World } from './world.ts';

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
  ProbeAt,
  ProbeBack,
}

const M = MODELS.length;

/**
 * Which optional fields the protocol's messages define (protocol/src/messages.ts). The simulated agents
 * fill exactly these, as the live agent does, so a figure put on the wire reaches every policy here the
 * day the schema carries it, and none before: the reply's queue (`rif`, `workMs`) and cold-load wait
 * (`loadMs`), the error reply's queue, and a model's `state` and `etaMs` in the load report.
 */
export const WIRE = {
  replyRif: 'rif' in InferReplySchema.properties,
  replyWorkMs: 'workMs' in InferReplySchema.properties,
  replyLoadMs: 'loadMs' in InferReplySchema.properties,
  errorRif: 'rif' in ErrorReplySchema.properties,
  errorWorkMs: 'workMs' in ErrorReplySchema.properties,
  modelState: 'state' in ModelLoadSchema.properties,
  modelEtaMs: 'etaMs' in ModelLoadSchema.properties,
} as const;
/** The agent's per-model queue bound (edge-agent's default queueLimit): beyond it, MESH_BUSY at once. */
const QUEUE_LIMIT = 64;
/** SvcDone marker of a MESH_BUSY refusal. */
const BUSY_REPLY = -1_000_000_000;

/** One attempt as the simulated agent and network see it. */
interface Job {
  req: number;
  node: number;
  router: number;
  /** Index into the request's attempt draws. */
  k: number;
  sentAt: number;
  /** When the cancel reaches the agent (Infinity: never cancelled). */
  cancelAt: number;
  arrivedAt: number;
  startedAt: number;
  ok: boolean;
  code: MeshErrorCode;
  svcMs: number;
  /** Time the attempt waited at the agent for its model to load. */
  loadWaitMs: number;
  /** The optional reply fields the protocol defines, as the agent filled them when it replied. */
  wire: Record<string, number> | undefined;
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
  requests: number;
  hedges: number;
  retries: number;
  extra_load: number;
  probes_per_request: number;
  /** Share of successful replies per hardware class. */
  served: Record<string, number>;
  /** Failed requests by error code. */
  errors: Record<string, number>;
  /** Per model: p99 (failures as +∞) and fail rate, to see where a tail comes from. */
  by_model: Record<string, { p99_ms: number; fail_rate: number }>;
  wall_ms: number;
}

export function runSim(world: World, make: PolicyFactory): SimResult {
  // Errors are made by the thousand here (deadlines, timeouts); their stack traces are never read.
  const stackTraceLimit = Error.stackTraceLimit;
  Error.stackTraceLimit = 0;
  try {
    return simulate(world, make);
  } finally {
    Error.stackTraceLimit = stackTraceLimit;
  }
}

function simulate(world: World, make: PolicyFactory): SimResult {
  const wall0 = performance.now();
  const { cfg, nodes, trace } = world;
  const N = nodes.length;
  const R = cfg.routers;
  const heap = new EventHeap();
  let now = BORN_MS;

  const nodeIndex = new Map(nodes.map((n) => [n.agentId, n.id]));
  const nodeOf = (agentId: string) => nodeIndex.get(agentId)!;

  // Agent state.
  const up = new Uint8Array(N).fill(1);
  const epoch = new Int32Array(N);
  const busy = new Int32Array(N);
  // The agent's scheduler (edge-agent/src/scheduler.ts): a bounded FIFO per model, the earliest
  // deadline among the queue heads runs next, expired jobs are dropped when they reach a head.
  const queues: number[][] = Array.from({ length: N * M }, () => []);
  const qHead = new Int32Array(N * M);
  const readyAt = new Float64Array(N * M); // model usable from (Infinity: cold and not loading)
  const queuedBy = new Int32Array(N * M);
  const runningBy = new Int32Array(N * M);
  const execEwma = new Float64Array(N * M);
  const served = new Int32Array(N * M);
  const queuedWorkMs = new Float64Array(N);
  // Work sent to a node and still on its way there (the oracle counts it as queued).
  const inboundWorkMs = new Float64Array(N);
  const runningEndSum = new Float64Array(N);
  const sessions = new Int32Array(N);
  const reportSeq = new Int32Array(N);
  for (const n of nodes)
    for (let m = 0; m < M; m++) {
      readyAt[n.id * M + m] = n.warm[m] ? Number.NEGATIVE_INFINITY : Number.POSITIVE_INFINITY;
      execEwma[n.id * M + m] = n.medianMs[m]!;
    }
  const ready = (i: number, m: number) => readyAt[i * M + m]! <= now;

  const jobs: Job[] = [];
  const runs: ReqRun[] = [];
  const pendingLoads = new Map<string, AgentLoad>();
  const probeCbs: ((reply: ProbeAnswer, nowMs: number) => void)[] = [];
  const probeNode: number[] = [];
  const probeModel: number[] = [];
  const probeReply: ProbeAnswer[] = [];
  let probes = 0;
  const servedBy: Record<string, number> = {};
  const errors: Record<string, number> = {};

  const svcOf = (job: Job): number => serviceMs(world, nodes[job.node]!, job.req, job.k, now);
  const queuedAt = (i: number) => {
    let q = 0;
    for (let m = 0; m < M; m++) q += queuedBy[i * M + m]!;
    return q;
  };
  const rifOf = (i: number) => (nodes[i]!.failFast ? 0 : queuedAt(i) + busy[i]!);

  const statusOf = (n: NodeTruth, state: AgentStatus['state'], ts: number): AgentStatus => {
    const gpu = n.cls === 'orin-nano' || n.cls === 'orin-agx';
    return {
      v: PROTOCOL_VERSION,
      kind: 'status',
      agent: n.agentId,
      state,
      ts,
      session: `${n.agentId}-${sessions[n.id]}`,
      models: MODELS.map((m, k) => ({
        name: m.name,
        version: '1',
        sha256: '0'.repeat(64),
        priceMicros: 0,
        latencyMs: n.medianMs[k]!,
        inputs: [],
        outputs: [],
      })),
      hardware: { platform: 'linux', arch: 'arm64', cpus: gpu ? 8 : 4, cpuModel: n.cls, memoryMb: gpu ? 8_192 : 4_096 },
      providers: gpu ? ['CUDAExecutionProvider', 'CPUExecutionProvider'] : ['CPUExecutionProvider'],
      workers: n.workers,
    };
  };

  /** A model's load state as the report carries it, when the schema has the fields. */
  const modelState = (i: number, m: number): Record<string, unknown> => {
    if (!WIRE.modelState) return {};
    const r = readyAt[i * M + m]!;
    if (r <= now) return { state: 'warm' };
    if (r === Number.POSITIVE_INFINITY) return { state: 'cold' };
    return { state: 'loading', ...(WIRE.modelEtaMs ? { etaMs: r - now } : {}) };
  };

  /** The agent's queue as a reply claims it: requests held (queued and running) and the same as work, ms. */
  const queueClaim = (i: number): { rif: number; workMs: number } => {
    if (nodes[i]!.failFast) return { rif: 0, workMs: 0 };
    let workMs = 0;
    for (let k = 0; k < M; k++) workMs += (queuedBy[i * M + k]! + runningBy[i * M + k]!) * execEwma[i * M + k]!;
    return { rif: queuedAt(i) + busy[i]!, workMs };
  };

  const loadOf = (i: number): AgentLoad => {
    const n = nodes[i]!;
    const models: AgentLoad['models'] = {};
    MODELS.forEach((m, k) => {
      models[m.name] = n.failFast
        ? { queued: 0, inFlight: 0, serviceMs: FAIL_FAST_MS, served: 0, failed: 0 }
        : {
            queued: queuedBy[i * M + k]!,
            inFlight: runningBy[i * M + k]!,
            serviceMs: execEwma[i * M + k]!,
            served: served[i * M + k]!,
            failed: 0,
            ...modelState(i, k),
          };
    });
    return {
      v: PROTOCOL_VERSION,
      kind: 'load',
      agent: n.agentId,
      ts: now,
      seq: reportSeq[i]!++,
      queued: n.failFast ? 0 : queuedAt(i),
      inFlight: n.failFast ? 0 : busy[i]!,
      workers: n.workers,
      models,
    };
  };

  /** What a node answers a probe with: its requests in flight and its estimate for a query of model m arriving now. */
  const probeAnswer = (i: number, m: number): ProbeAnswer => {
    const n = nodes[i]!;
    if (n.failFast) return { rif: 0, latencyMs: FAIL_FAST_MS };
    let workMs = 0;
    for (let k = 0; k < M; k++) workMs += (queuedBy[i * M + k]! + 0.5 * runningBy[i * M + k]!) * execEwma[i * M + k]!;
    const load = ready(i, m) ? 0 : readyAt[i * M + m] === Number.POSITIVE_INFINITY ? n.coldLoadMs : readyAt[i * M + m]! - now;
    return { rif: rifOf(i), latencyMs: workMs / n.workers + execEwma[i * M + m]! + load };
  };

  const truth: Truth = {
    nodeOf,
    agentIds: nodes.map((n) => n.agentId),
    completionMs(i, req, k) {
      const n = nodes[i]!;
      if (!up[i] || n.failFast) return Number.POSITIVE_INFINITY;
      const j = req.id * DRAWS + (k % DRAWS);
      const arrive = now + n.oneWayMs * trace.jitUp[j]! + req.bytesUp / n.bytesPerMs;
      const backlog = queuedWorkMs[i]! + inboundWorkMs[i]! + Math.max(0, runningEndSum[i]! - busy[i]! * now);
      const wait = busy[i]! < n.workers && queuedAt(i) === 0 && inboundWorkMs[i] === 0 ? 0 : backlog / n.workers;
      const r = readyAt[i * M + req.model]!;
      const coldUntil = r === Number.POSITIVE_INFINITY ? arrive + n.coldLoadMs : r;
      const start = Math.max(arrive + wait, coldUntil);
      const svc = serviceMs(world, n, req.id, k, now);
      return start + svc + n.oneWayMs * trace.jitDown[j]! + req.bytesDown / n.bytesPerMs;
    },
  };

  // One policy instance and one engine per router.
  const policies: SimPolicy[] = [];
  const engines: RequestEngine<SimAsk, SimReply>[] = [];
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
  for (let r = 0; r < R; r++) {
    const sim = make();
    const env: PolicyEnv = {
      rng: new Rng(cfg.seed, `policy-${r}`),
      routers: R,
      now: () => now,
      truth,
      probe(agentId, model, cb) {
        probes++;
        const i = nodeOf(agentId);
        if (!up[i]) return; // a dead agent never answers
        const id = probeCbs.length;
        probeCbs.push(cb);
        probeNode.push(i);
        probeModel.push(MODELS.findIndex((m) => m.name === model));
        probeReply.push({ rif: 0, latencyMs: 0 });
        heap.push(now + nodes[i]!.oneWayMs, Ev.ProbeAt, id);
      },
    };
    sim.init(env);
    const budget = sim.budget();
    const engine = createRequestEngine<SimAsk, SimReply>({
      policy: sim.policy(),
      clock,
      ...(budget ? { budget } : {}),
      maxAttempts: sim.maxAttempts,
      ...(sim.retryable ? { retryable: (code) => sim.retryable!(code) } : {}),
      transport: {
        send(attempt: Attempt<SimAsk>) {
          const req = attempt.request.data.req;
          const node = nodeOf(attempt.agentId);
          const n = nodes[node]!;
          const job: Job = {
            req: req.id,
            node,
            router: r,
            k: attempt.index,
            sentAt: now,
            cancelAt: Number.POSITIVE_INFINITY,
            arrivedAt: Number.NaN,
            startedAt: Number.NaN,
            ok: false,
            code: 'MESH_INFERENCE_FAILED',
            svcMs: 0,
            loadWaitMs: 0,
            wire: undefined,
            key: attempt.request.key,
            agentId: attempt.agentId,
          };
          const id = jobs.length;
          jobs.push(job);
          jobOf.set(`${job.key}/${job.agentId}`, id);
          runs[req.id]!.attempts++;
          const j = req.id * DRAWS + (job.k % DRAWS);
          job.svcMs = svcOf(job);
          inboundWorkMs[node]! += job.svcMs;
          heap.push(now + n.oneWayMs * trace.jitUp[j]! + req.bytesUp / n.bytesPerMs, Ev.AtNode, id);
        },
        cancel(attempt: Attempt<SimAsk>) {
          const id = jobOf.get(`${attempt.request.key}/${attempt.agentId}`);
          if (id === undefined) return;
          const job = jobs[id]!;
          job.cancelAt = Math.min(job.cancelAt, now + nodes[job.node]!.oneWayMs);
        },
      },
    });
    policies.push(sim);
    engines.push(engine);
  }

  // The fleet is born long before the run: every router gets every agent's status.
  for (const n of nodes) for (const p of policies) p.onStatus?.(statusOf(n, 'online', BORN_MS), BORN_MS);

  const requestOf = (i: number): SimRequest => {
    const m = trace.model[i]!;
    const spec = MODELS[m]!;
    return {
      id: i,
      t: trace.t[i]!,
      model: m,
      modelName: spec.name,
      bytesUp: spec.bytesUp,
      bytesDown: spec.bytesDown,
      deadline: trace.t[i]! + spec.deadlineMs,
    };
  };

  const dropQueued = (i: number, id: number) => {
    const job = jobs[id]!;
    queuedBy[i * M + runs[job.req]!.req.model]!--;
    queuedWorkMs[i]! -= job.svcMs;
  };

  /** Drops the cancelled and expired jobs at the head of a queue; the live head's job id, or -1. */
  const headOf = (i: number, m: number): number => {
    const qi = i * M + m;
    const q = queues[qi]!;
    while (qHead[qi]! < q.length) {
      const id = q[qHead[qi]!]!;
      const job = jobs[id]!;
      if (job.cancelAt > now && runs[job.req]!.req.deadline > now) return id;
      dropQueued(i, id);
      qHead[qi]!++;
    }
    if (qHead[qi]! > 256) {
      queues[qi] = q.slice(qHead[qi]!);
      qHead[qi] = 0;
    }
    return -1;
  };

  const startWork = (i: number) => {
    const n = nodes[i]!;
    while (busy[i]! < n.workers) {
      let next = -1;
      let nextM = -1;
      for (let m = 0; m < M; m++) {
        if (!ready(i, m)) continue;
        const id = headOf(i, m);
        if (id >= 0 && (next < 0 || runs[jobs[id]!.req]!.req.deadline < runs[jobs[next]!.req]!.req.deadline)) {
          next = id;
          nextM = m;
        }
      }
      if (next < 0) return;
      qHead[i * M + nextM]!++;
      dropQueued(i, next);
      const job = jobs[next]!;
      job.startedAt = now;
      job.svcMs = svcOf(job);
      busy[i]!++;
      runningBy[i * M + nextM]!++;
      runningEndSum[i]! += now + job.svcMs;
      heap.push(now + job.svcMs, Ev.SvcDone, next, epoch[i]!);
    }
  };

  const replyBack = (id: number, ok: boolean, code: MeshErrorCode = 'MESH_INFERENCE_FAILED') => {
    const job = jobs[id]!;
    job.code = code;
    const claim = queueClaim(job.node);
    const fields: Record<string, number> = {};
    if (ok ? WIRE.replyRif : WIRE.errorRif) fields.rif = claim.rif;
    if (ok ? WIRE.replyWorkMs : WIRE.errorWorkMs) fields.workMs = claim.workMs;
    if (ok && WIRE.replyLoadMs && job.loadWaitMs > 0) fields.loadMs = job.loadWaitMs;
    if (Object.keys(fields).length > 0) job.wire = fields;
    const n = nodes[job.node]!;
    const req = runs[job.req]!.req;
    const j = job.req * DRAWS + (job.k % DRAWS);
    job.ok = ok;
    heap.push(now + n.oneWayMs * trace.jitDown[j]! + req.bytesDown / n.bytesPerMs, Ev.Reply, id);
  };

  const crash = (i: number) => {
    up[i] = 0;
    epoch[i]!++;
    busy[i] = 0;
    queuedWorkMs[i] = 0;
    runningEndSum[i] = 0;
    for (let m = 0; m < M; m++) {
      queues[i * M + m] = [];
      qHead[i * M + m] = 0;
      queuedBy[i * M + m] = 0;
      runningBy[i * M + m] = 0;
      // A restarted agent loads its models before it announces itself.
      readyAt[i * M + m] = Number.NEGATIVE_INFINITY;
    }
  };

  for (let i = 0; i < trace.n; i++) heap.push(trace.t[i]!, Ev.Arrival, i);
  const endT = cfg.durationMs + 5_000;
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
        const r = trace.router[ev.a]!;
        engines[r]!.start(
          { key: String(ev.a), deadlineAt: req.deadline, data: { ...policies[r]!.ask(req), req }, model: req.modelName },
          (outcome) => {
            run.done = true;
            run.latency = outcome.ok ? now - req.t : Number.POSITIVE_INFINITY;
            if (outcome.ok) {
              const cls = nodes[nodeOf(outcome.attempt.agentId)]!.cls;
              servedBy[cls] = (servedBy[cls] ?? 0) + 1;
            } else if (req.t >= cfg.warmupMs) errors[outcome.error.code] = (errors[outcome.error.code] ?? 0) + 1;
          },
        );
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
        inboundWorkMs[i] = Math.max(0, inboundWorkMs[i]! - job.svcMs);
        if (!up[i]) break; // lost: a dead agent never answers
        job.arrivedAt = now;
        if (n.failFast) {
          heap.push(now + FAIL_FAST_MS, Ev.SvcDone, ev.a, -1 - epoch[i]!);
          break;
        }
        const m = runs[job.req]!.req.model;
        if (readyAt[i * M + m] === Number.POSITIVE_INFINITY) {
          readyAt[i * M + m] = now + n.coldLoadMs;
          heap.push(readyAt[i * M + m]!, Ev.ModelLoaded, i, epoch[i]!);
        }
        job.loadWaitMs = Math.max(0, readyAt[i * M + m]! - now);
        if (queues[i * M + m]!.length - qHead[i * M + m]! >= QUEUE_LIMIT) {
          heap.push(now + FAIL_FAST_MS, Ev.SvcDone, ev.a, BUSY_REPLY);
          break;
        }
        job.svcMs = svcOf(job);
        queues[i * M + m]!.push(ev.a);
        queuedBy[i * M + m]!++;
        queuedWorkMs[i]! += job.svcMs;
        startWork(i);
        break;
      }
      case Ev.SvcDone: {
        const job = jobs[ev.a]!;
        const i = job.node;
        if (ev.b === BUSY_REPLY) {
          if (up[i]) replyBack(ev.a, false, 'MESH_BUSY');
          break;
        }
        if (ev.b < 0) {
          if (-1 - ev.b === epoch[i] && up[i]) replyBack(ev.a, false, 'MESH_INFERENCE_FAILED');
          break;
        }
        if (ev.b !== epoch[i] || !up[i]) break; // the node crashed meanwhile
        const m = runs[job.req]!.req.model;
        busy[i]!--;
        runningBy[i * M + m]!--;
        runningEndSum[i]! -= job.startedAt + job.svcMs;
        served[i * M + m]!++;
        execEwma[i * M + m] = 0.9 * execEwma[i * M + m]! + 0.1 * job.svcMs;
        replyBack(ev.a, true);
        startWork(i);
        break;
      }
      case Ev.ModelLoaded: {
        if (ev.b === epoch[ev.a] && up[ev.a]) startWork(ev.a);
        break;
      }
      case Ev.Reply: {
        const job = jobs[ev.a]!;
        const engine = engines[job.router]!;
        const fields = job.wire;
        if (job.ok) engine.answer(job.key, job.agentId, { queueMs: job.startedAt - job.arrivedAt, execMs: job.svcMs, ...fields });
        else
          engine.fail(
            job.key,
            job.agentId,
            new MeshError(job.code, job.code === 'MESH_BUSY' ? 'queue full' : 'fail-fast node', {
              details: { agentId: job.agentId, ...fields },
            }),
          );
        break;
      }
      case Ev.LoadTick: {
        const i = ev.a;
        if (up[i]) {
          // The agent's heartbeat sweeps expired jobs out of its queues, then reports.
          for (let m = 0; m < M; m++) {
            const qi = i * M + m;
            const q = queues[qi]!;
            const keep: number[] = [];
            for (let h = qHead[qi]!; h < q.length; h++) {
              if (runs[jobs[q[h]!]!.req]!.req.deadline > now) keep.push(q[h]!);
              else dropQueued(i, q[h]!);
            }
            queues[qi] = keep;
            qHead[qi] = 0;
          }
          const load = loadOf(i);
          heap.push(now + nodes[i]!.oneWayMs, Ev.LoadDeliver, i, reportSeq[i]! - 1);
          pendingLoads.set(`${i}/${reportSeq[i]! - 1}`, load);
        }
        if (now + LOAD_REPORT_MS < endT) heap.push(now + LOAD_REPORT_MS, Ev.LoadTick, i);
        break;
      }
      case Ev.LoadDeliver: {
        const key = `${ev.a}/${ev.b}`;
        const load = pendingLoads.get(key)!;
        pendingLoads.delete(key);
        if (up[ev.a]) for (const p of policies) p.onLoad?.(load, now);
        break;
      }
      case Ev.NodeDown: {
        const i = ev.a;
        crash(i);
        heap.push(now + nodes[i]!.detectDelay[ev.b]!, Ev.StatusDeliver, i, 0);
        policies.forEach((p, r) => {
          if (p.seesDeaths) engines[r]!.agentLost(nodes[i]!.agentId);
        });
        break;
      }
      case Ev.NodeUp: {
        up[ev.a] = 1;
        sessions[ev.a]!++;
        heap.push(now + nodes[ev.a]!.oneWayMs, Ev.StatusDeliver, ev.a, 1);
        break;
      }
      case Ev.StatusDeliver: {
        // Delivered only if still true (a node back up before its death was seen sends its birth anyway).
        if (ev.b === 1 || !up[ev.a]) {
          const status = statusOf(nodes[ev.a]!, ev.b === 1 ? 'online' : 'offline', now);
          policies.forEach((p, r) => {
            p.onStatus?.(status, now);
            // The live router fails over what the dead agent held, as the request engine does on an offline status.
            if (ev.b === 0) engines[r]!.agentLost(nodes[ev.a]!.agentId);
          });
        }
        break;
      }
      case Ev.ProbeAt: {
        const i = probeNode[ev.a]!;
        if (!up[i]) break;
        probeReply[ev.a] = probeAnswer(i, probeModel[ev.a]!);
        heap.push(now + nodes[i]!.oneWayMs, Ev.ProbeBack, ev.a);
        break;
      }
      case Ev.ProbeBack: {
        probeCbs[ev.a]!(probeReply[ev.a]!, now);
        break;
      }
    }
  }

  // Measure requests after the warm-up.
  const lat: number[] = [];
  const latByModel: number[][] = MODELS.map(() => []);
  let originals = 0;
  let extra = 0;
  for (const run of runs) {
    if (run.req.t < cfg.warmupMs) continue;
    originals++;
    extra += run.attempts > 0 ? run.attempts - 1 : 0;
    const ms = run.done ? run.latency : Number.POSITIVE_INFINITY;
    lat.push(ms);
    latByModel[run.req.model]!.push(ms);
  }
  const totalServed = Object.values(servedBy).reduce((a, b) => a + b, 0);
  return {
    policy: policies[0]!.name,
    requests: originals,
    ...summarize(lat),
    hedges: engines.reduce((s, e) => s + e.counters.hedges, 0),
    retries: engines.reduce((s, e) => s + e.counters.retries + e.counters.failovers, 0),
    extra_load: originals > 0 ? extra / originals : 0,
    probes_per_request: trace.n > 0 ? probes / trace.n : 0,
    served: Object.fromEntries(Object.entries(servedBy).map(([k, v]) => [k, v / Math.max(1, totalServed)])),
    errors,
    by_model: Object.fromEntries(
      MODELS.map((m, k) => {
        const s = summarize(latByModel[k]!);
        return [m.name, { p99_ms: s.p99_ms, fail_rate: s.fail_rate }];
      }),
    ),
    wall_ms: performance.now() - wall0,
  };
}
