/**
 * The discrete-event engine: virtual clock in ms, one event heap, FIFO queues with per-node workers,
 * open-loop arrivals from the pre-generated trace. It plays both the agents (queues, cold loads, crashes,
 * fail-fast errors, load reports) and the router's runtime (per-try timeouts, hedges, retries with
 * budgets, cancels), calling the policy only with what a real router would see.
 */
import { TailBudget } from '@edge-mesh/client';
import { EventHeap } from './heap.ts';
import { type LatencySummary, summarize } from './metrics.ts';
import { Rng } from './rng.ts';
import type { FailureKind, Policy, PolicyEnv, ProbeReply, ReplyInfo, SimRequest } from './types.ts';
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
  TryTimeout,
  Hedge,
  Deadline,
  LoadTick,
  LoadDeliver,
  NodeDown,
  NodeUp,
  StatusDeliver,
  ModelLoaded,
  ProbeReply,
}

const DOWN_BYTES = 2_000;

interface Attempt {
  id: number;
  req: number;
  node: number;
  k: number;
  sentAt: number;
  /** Router has finished with it (reply, timeout, cancel). */
  ended: boolean;
  /** When the cancel message reaches the agent (Infinity: never cancelled). */
  cancelAt: number;
  arrivedAt: number;
  ok: boolean;
  queueMs: number;
  execMs: number;
  loadMs: number;
  rif: number;
  warm: boolean;
  extra: boolean;
}

interface ReqRun {
  req: SimRequest;
  done: boolean;
  failed: boolean;
  latency: number;
  attempts: Attempt[];
  outstanding: number;
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

export function runSim(world: World, policy: Policy): SimResult {
  const wall0 = performance.now();
  const { cfg, nodes, trace } = world;
  const N = nodes.length;
  const heap = new EventHeap();
  let now = 0;

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

  const attempts: Attempt[] = [];
  const runs: ReqRun[] = [];
  const probeCbs = new Map<number, { node: number; reply: ProbeReply; cb: (node: number, r: ProbeReply, now: number) => void }>();
  let probeSeq = 0;
  let probes = 0;
  let hedges = 0;
  let retries = 0;
  const served: Record<string, number> = {};

  // Retry / hedge budgets (used only when the policy has a tail).
  const tail = policy.tail;
  const budget = new TailBudget(tail?.budget ?? {}, 0);

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
  policy.init(env);

  const requestOf = (i: number): SimRequest => ({
    id: i,
    t: trace.t[i]!,
    clientSite: trace.site[i]!,
    cx: trace.cx[i]!,
    cy: trace.cy[i]!,
    upBytes: trace.upBytes[i]!,
    downBytes: DOWN_BYTES,
    model: 'm',
    deadline: trace.t[i]! + cfg.deadlineMs,
  });

  const send = (run: ReqRun, node: number, extra: boolean) => {
    const req = run.req;
    const k = run.attempts.length;
    const att: Attempt = {
      id: attempts.length,
      req: req.id,
      node,
      k,
      sentAt: now,
      ended: false,
      cancelAt: Infinity,
      arrivedAt: NaN,
      ok: false,
      queueMs: 0,
      execMs: 0,
      loadMs: 0,
      rif: 0,
      warm: true,
      extra,
    };
    attempts.push(att);
    run.attempts.push(att);
    run.outstanding++;
    policy.onSend(node, req, now);
    const n = nodes[node]!;
    const j = req.id * DRAWS + (k % DRAWS);
    heap.push(now + clientOneWay(req, n) * trace.jitUp[j]! + xfer(req.upBytes, n), Ev.AtNode, att.id);
    if (tail) {
      const to = tail.perTryTimeoutMs(req, node, now);
      if (now + to < req.deadline) heap.push(now + to, Ev.TryTimeout, att.id);
      if (tail.hedgeDelayMs && run.attempts.length < tail.maxAttempts) {
        const d = tail.hedgeDelayMs(req, node, now);
        if (d !== null && now + d < req.deadline) heap.push(now + d, Ev.Hedge, att.id);
      }
    }
  };

  const endAttempt = (att: Attempt) => {
    att.ended = true;
    runs[att.req]!.outstanding--;
    if (att.extra) budget.onExtraDone();
  };

  const cancel = (att: Attempt, kind: FailureKind) => {
    endAttempt(att);
    att.cancelAt = now + routerOneWay(nodes[att.node]!);
    const run = runs[att.req]!;
    policy.onFailure(att.node, run.req, kind, now - att.sentAt, now);
  };

  const finish = (run: ReqRun, ok: boolean) => {
    run.done = true;
    run.failed = !ok;
    run.latency = ok ? now - run.req.t : Infinity;
    budget.onRequestDone();
    for (const a of run.attempts) if (!a.ended) cancel(a, ok ? 'cancel' : 'timeout');
  };

  const tried = (run: ReqRun) => new Set(run.attempts.map((a) => a.node));

  /** A retry or hedge, if the budgets allow. */
  const tryExtra = (run: ReqRun, purpose: 'hedge' | 'retry'): boolean => {
    if (!tail || run.done || run.attempts.length >= tail.maxAttempts) return false;
    if (!budget.take(purpose, now)) return false;
    const node = policy.pick(run.req, tried(run), now, purpose);
    if (node < 0) {
      budget.refund(purpose);
      return false;
    }
    if (purpose === 'hedge') hedges++;
    else retries++;
    send(run, node, true);
    return true;
  };

  const startWork = (i: number) => {
    const n = nodes[i]!;
    const q = queues[i]!;
    while (busy[i]! < n.slots && qHead[i]! < q.length && warmNow(i)) {
      const att = attempts[q[qHead[i]!]!]!;
      qHead[i]!++;
      const run = runs[att.req]!;
      // Agents drop queued work that was cancelled or can no longer make its deadline.
      if (att.cancelAt <= now || run.req.deadline <= now) continue;
      const j = att.req * DRAWS + (att.k % DRAWS);
      const gray = now >= n.grayStart && now < n.grayEnd ? n.grayMult : 1;
      const svc = n.medianMs * Math.exp(SERVICE_SIGMA * trace.z[j]!) * trace.strag[j]! * gray;
      att.queueMs = now - att.arrivedAt;
      att.execMs = svc;
      att.loadMs = loadPending[i]!;
      loadPending[i] = 0;
      busy[i]!++;
      heap.push(now + svc, Ev.SvcDone, att.id, epoch[i]!);
    }
    if (qHead[i]! > 1024 && qHead[i]! * 2 > q.length) {
      queues[i] = q.slice(qHead[i]!);
      qHead[i] = 0;
    }
  };

  const replyBack = (att: Attempt, ok: boolean) => {
    const n = nodes[att.node]!;
    const run = runs[att.req]!;
    const j = att.req * DRAWS + (att.k % DRAWS);
    att.ok = ok;
    att.rif = n.failFast ? 0 : queues[att.node]!.length - qHead[att.node]! + busy[att.node]!;
    att.warm = warmNow(att.node);
    heap.push(now + clientOneWay(run.req, n) * trace.jitDown[j]! + xfer(DOWN_BYTES, n), Ev.Reply, att.id);
  };

  // Seed the heap: arrivals, deadlines come per arrival, load ticks, churn.
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
        const run: ReqRun = { req, done: false, failed: false, latency: NaN, attempts: [], outstanding: 0 };
        runs[ev.a] = run;
        budget.onRequest(now);
        heap.push(req.deadline, Ev.Deadline, ev.a);
        const node = policy.pick(req, null, now, 'primary');
        if (node < 0) finish(run, false);
        else send(run, node, false);
        break;
      }
      case Ev.AtNode: {
        const att = attempts[ev.a]!;
        const i = att.node;
        const n = nodes[i]!;
        if (!up[i]) break; // lost: a dead agent never answers
        att.arrivedAt = now;
        if (n.failFast) {
          heap.push(now + FAIL_FAST_MS, Ev.SvcDone, att.id, -1 - epoch[i]!);
          break;
        }
        if (readyAt[i] === Infinity) {
          readyAt[i] = now + n.coldLoadMs;
          loadPending[i] = n.coldLoadMs;
          heap.push(readyAt[i]!, Ev.ModelLoaded, i, epoch[i]!);
        }
        queues[i]!.push(att.id);
        startWork(i);
        break;
      }
      case Ev.SvcDone: {
        const att = attempts[ev.a]!;
        const i = att.node;
        if (ev.b < 0) {
          // fail-fast error reply
          if (-1 - ev.b !== epoch[i] || !up[i]) break;
          replyBack(att, false);
          break;
        }
        if (ev.b !== epoch[i] || !up[i]) break; // the node crashed meanwhile
        busy[i]!--;
        execEwma[i] = 0.9 * execEwma[i]! + 0.1 * att.execMs;
        replyBack(att, true);
        startWork(i);
        break;
      }
      case Ev.ModelLoaded: {
        if (ev.b === epoch[ev.a] && up[ev.a]) startWork(ev.a);
        break;
      }
      case Ev.Reply: {
        const att = attempts[ev.a]!;
        const run = runs[att.req]!;
        if (att.ended) break; // timed out or cancelled: the router no longer waits for it
        endAttempt(att);
        if (att.ok) {
          const info: ReplyInfo = {
            ok: true,
            queueMs: att.queueMs,
            execMs: att.execMs,
            loadMs: att.loadMs,
            rif: att.rif,
            sentAt: att.sentAt,
            upBytes: run.req.upBytes,
            warm: att.warm,
          };
          policy.onReply(att.node, run.req, info, now);
          if (!run.done) {
            served[nodes[att.node]!.cls] = (served[nodes[att.node]!.cls] ?? 0) + 1;
            finish(run, true);
          }
        } else {
          policy.onFailure(att.node, run.req, 'error', now - att.sentAt, now);
          if (!run.done) {
            const retried = tail?.retryOnError ? tryExtra(run, 'retry') : false;
            if (!retried && run.outstanding === 0) finish(run, false);
          }
        }
        break;
      }
      case Ev.TryTimeout: {
        const att = attempts[ev.a]!;
        const run = runs[att.req]!;
        if (att.ended || run.done) break;
        cancel(att, 'timeout');
        const retried = tail?.retryOnTimeout ? tryExtra(run, 'retry') : false;
        if (!retried && run.outstanding === 0) finish(run, false);
        break;
      }
      case Ev.Hedge: {
        const att = attempts[ev.a]!;
        const run = runs[att.req]!;
        if (att.ended || run.done) break;
        tryExtra(run, 'hedge');
        break;
      }
      case Ev.Deadline: {
        const run = runs[ev.a]!;
        if (!run.done) finish(run, false);
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
        if (up[ev.a]) policy.onLoadReport?.(ev.a, ev.b >> 1, (ev.b & 1) === 1, now);
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
        if (ev.b === 1 || !up[ev.a]) policy.onStatus?.(ev.a, ev.b === 1, now);
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
    extra += run.attempts.length > 0 ? run.attempts.length - 1 : 0;
    lat.push(run.latency);
    stepLat[trace.step[run.req.id]!]!.push(run.latency);
  }
  const summary = summarize(lat);
  const totalServed = Object.values(served).reduce((a, b) => a + b, 0);
  const result: SimResult = {
    policy: policy.name,
    scenario: cfg.scenario,
    load: cfg.scenario === 'ramp' ? NaN : cfg.load,
    requests: originals,
    ...summary,
    hedges,
    retries,
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
