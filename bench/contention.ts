/**
 * `npm run bench -- contention [--quick]`: the local mesh as `npm start` runs it, each part its own process (a broker,
 * two agents with every model, a router with its HTTP API; no chain), under a steady stream of requests, with 0, 1
 * and 2 cores held busy by another process (a `node -e 'for(;;){}'` per core). After each busy phase the busy
 * processes stop and the stream goes on, to measure how long latency takes to come back.
 *
 * The stream is open loop: one request every 1000/rate ms whatever the answers do, with the sample app's model mix
 * and deadlines (demo/src/sample-app.ts): an OCR detection every 20th request, the rest wake-word, voice activity and
 * OCR classification in turn. As in `up`, an SDK client in this process sends them with the router's route leases,
 * and every tenth request goes through the router's KServe HTTP API instead (never an OCR detection: see
 * docs/benchmarks.md, "contention").
 *
 * Each failed request is classified by its code: `admission` (MESH_OVERLOADED, MESH_BUSY: refused before any work,
 * at once), `deadline` (MESH_DEADLINE_EXCEEDED, MESH_TIMEOUT: the deadline passed after the request was sent and
 * accepted), `other`. Recovery: the requests sent after the busy processes stopped, in 250 ms windows by send time;
 * `recovery_ms` is the start of the first window from which every window's p99 is within the bound (the 0-core
 * phase's p99 × 2, at least + 10 ms) and has no error; null when that never happened within the recovery time.
 *
 * `--no-admission` runs the baseline without overload control: the agents with `--no-admission` (they queue what they
 * cannot serve in time) and the router with `--no-adaptive-concurrency`. The SDK's shedding has no switch and stays on.
 *
 * Last line: { busy_cores: { "0": { requests, errors, p50_ms, p99_ms, errors_by_code, errors_by_kind, recovery_ms,
 * recovery_p99_ms, recovery_errors }, "1": …, "2": … }, recovery_bound_ms, … } (docs/benchmarks.md, "contention").
 */
import os from 'node:os';
import { round, summarize } from '@edge-mesh/client';
import { ensureModelsFolder, kserveInfer, SAMPLE_DEADLINES_MS, sampleInputs } from '@edge-mesh/demo';
import { connect, type Mesh, MeshError } from '@edge-mesh/sdk';
import {
  admitted,
  assertBuilt,
  type BenchContext,
  type BenchResult,
  CLI,
  MODELS_DIR,
  type Proc,
  sleep,
  spawnProc,
  startAgentProc,
  startBrokerProc,
} from './lib.ts';

/** Codes of a refusal before any work, at once. */
const ADMISSION = new Set(['MESH_OVERLOADED', 'MESH_BUSY']);
/** Codes of a deadline that passed once the request was out. */
const DEADLINE = new Set(['MESH_DEADLINE_EXCEEDED', 'MESH_TIMEOUT']);
const RECOVERY_WINDOW_MS = 250;

interface Outcome {
  /** Sent at, performance.now() ms. */
  sentAt: number;
  ms: number;
  code: string | undefined;
  http: boolean;
  /** For a deadline error, where it was seen (deadlineWhere). */
  where?: string;
}

/**
 * Where a deadline error came from, by its message: the agent dropped the job in its queue or after its run
 * ('agent_queue'), the request reached the agent too late to be queued ('transit'), or no answer came in time and the
 * sender's own deadline timer ended it ('no_answer').
 */
function deadlineWhere(err: MeshError): string {
  if (/while queued|after the deadline/.test(err.message)) return 'agent_queue';
  if (/before the request was (queued|routed)/.test(err.message)) return 'transit';
  return 'no_answer';
}

/** The sample app's mix: an OCR detection every 20th request, else wake-word, voice activity, OCR classification in turn. */
function modelFor(n: number): string {
  if (n % 20 === 19) return 'ocr-det';
  return (['kws', 'vad', 'ocr-cls'] as const)[n % 3]!;
}

/** Every tenth request goes through the router's HTTP API, as in `up`; n % 20 is then 4 or 14, never an OCR detection. */
const viaHttp = (n: number) => n % 10 === 4;

export function kindOf(code: string): 'admission' | 'deadline' | 'other' {
  return ADMISSION.has(code) ? 'admission' : DEADLINE.has(code) ? 'deadline' : 'other';
}

/** Sends `rate` requests a second for `ms`, open loop, into `out`. */
async function stream(
  send: (model: string, n: number) => Promise<unknown>,
  rate: number,
  ms: number,
  counter: { n: number },
  out: Outcome[],
): Promise<void> {
  const inFlight = new Set<Promise<void>>();
  const started = performance.now();
  const gapMs = 1000 / rate;
  for (let i = 0; performance.now() - started < ms; i++) {
    const due = started + i * gapMs;
    const wait = due - performance.now();
    if (wait > 0) await sleep(wait);
    const n = counter.n++;
    const t0 = performance.now();
    const http = viaHttp(n);
    const p = send(modelFor(n), n)
      .then(
        () => void out.push({ sentAt: t0, ms: performance.now() - t0, code: undefined, http }),
        (err: unknown) => {
          const code = err instanceof MeshError ? err.code : 'OTHER';
          const where = err instanceof MeshError && DEADLINE.has(code) ? deadlineWhere(err) : undefined;
          out.push({ sentAt: t0, ms: performance.now() - t0, code, http, ...(where ? { where } : {}) });
        },
      )
      .finally(() => inFlight.delete(p));
    inFlight.add(p);
  }
  await Promise.all(inFlight);
}

function summary(outcomes: Outcome[]) {
  const latencies = outcomes.filter((o) => o.code === undefined).map((o) => o.ms);
  const s = latencies.length ? summarize(latencies) : undefined;
  const byCode: Record<string, number> = {};
  const byKind = { admission: 0, deadline: 0, other: 0 };
  const httpByKind = { admission: 0, deadline: 0, other: 0 };
  const deadlineWhereSeen: Record<string, number> = {};
  for (const o of outcomes) {
    if (o.code === undefined) continue;
    byCode[o.code] = (byCode[o.code] ?? 0) + 1;
    byKind[kindOf(o.code)]++;
    if (o.http) httpByKind[kindOf(o.code)]++;
    if (o.where) deadlineWhereSeen[o.where] = (deadlineWhereSeen[o.where] ?? 0) + 1;
  }
  return {
    requests: outcomes.length,
    errors: outcomes.length - latencies.length,
    p50_ms: s ? round(s.p50) : null,
    p99_ms: s ? round(s.p99) : null,
    errors_by_code: byCode,
    errors_by_kind: byKind,
    /** Of those, the requests sent through the router's HTTP API. */
    http_errors_by_kind: httpByKind,
    deadline_where: deadlineWhereSeen,
  };
}

/**
 * Time from `stoppedAt` to the start of the first 250 ms window (by send time) from which every window has no error
 * and a p99 within `boundMs`; null when the last window is still out of bound.
 */
export function recoveryMs(outcomes: Outcome[], stoppedAt: number, boundMs: number, windowMs = RECOVERY_WINDOW_MS): number | null {
  const windows: Outcome[][] = [];
  for (const o of outcomes) {
    const i = Math.max(0, Math.floor((o.sentAt - stoppedAt) / windowMs));
    const w = windows[i] ?? [];
    w.push(o);
    windows[i] = w;
  }
  let recoveredFrom: number | null = null;
  for (let i = 0; i < windows.length; i++) {
    const w = windows[i] ?? [];
    const ok = w.filter((o) => o.code === undefined).map((o) => o.ms);
    const good = ok.length === w.length && (ok.length === 0 || summarize(ok).p99 <= boundMs);
    if (!good) recoveredFrom = null;
    else recoveredFrom ??= i;
  }
  return recoveredFrom === null ? null : recoveredFrom * windowMs;
}

export async function run(ctx: BenchContext): Promise<BenchResult> {
  assertBuilt([...['protocol', 'client', 'edge-agent', 'broker', 'sdk', 'cli'], 'router']);
  const rate = Number(ctx.args.rate ?? 40);
  const phaseMs = Number(ctx.args['phase-ms'] ?? (ctx.quick ? 6_000 : 30_000));
  const recoveryWindowMs = Number(ctx.args['recovery-window-ms'] ?? (ctx.quick ? 4_000 : 10_000));
  // --no-admission: the baseline without overload control (agents queue what they cannot serve in time, the router
  // forwards without a concurrency limit); the SDK's shedding stays on (it has no switch).
  const admission = ctx.args['no-admission'] === undefined;
  const busyList = String(ctx.args.busy ?? '0,1,2')
    .split(',')
    .map(Number);
  await ensureModelsFolder(MODELS_DIR);
  const { url } = await startBrokerProc();
  const agents: Proc[] = [];
  for (let i = 0; i < 2; i++) {
    const a = await admitted(url, 'agent');
    agents.push(
      await startAgentProc({
        url,
        keyFile: a.keyFile,
        id: a.identity.id,
        name: `agent-${i + 1}`,
        ...(admission ? {} : { extraArgs: ['--no-admission'] }),
      }),
    );
  }
  const routerKey = await admitted(url, 'router');
  const router = spawnProc('router', [
    CLI,
    'router',
    '--broker',
    url,
    '--key',
    routerKey.keyFile,
    '--http-port',
    '0',
    '--log-level',
    'warn',
    ...(admission ? [] : ['--no-adaptive-concurrency']),
  ]);
  const routerLine = await router.waitLine('stdout', (l) => / serving http:\/\//.test(l), 30_000, 'its HTTP URL');
  const httpUrl = routerLine.match(/serving (http:\/\/\S+)/)![1]!;
  const app = await admitted(url, 'app');
  const mesh: Mesh = await connect({ brokerUrl: url, identity: app.identity, router: routerKey.identity.id });
  const send = (model: string, n: number) => {
    const inputs = sampleInputs(model, n % 8);
    const deadlineMs = SAMPLE_DEADLINES_MS[model] ?? 1_000;
    return viaHttp(n) ? kserveInfer(httpUrl, model, inputs, deadlineMs) : mesh.infer(model, inputs, { deadlineMs });
  };
  try {
    for (const model of ['kws', 'vad', 'ocr-cls', 'ocr-det']) await mesh.waitForModel(model, 30_000, 2);
    const counter = { n: 0 };
    // Warm-up: two seconds of the stream, not counted (the router's first minRTT window, the HTTP path's first JSON).
    await stream(send, rate, 2_000, counter, []);
    const busyCores: Record<string, ReturnType<typeof summary> & Record<string, unknown>> = {};
    let boundMs: number | undefined;
    for (const busy of busyList) {
      ctx.log(`contention: ${busy} busy core(s), ${rate} requests/s for ${phaseMs} ms, then ${recoveryWindowMs} ms without them`);
      const spinners = Array.from({ length: busy }, (_, i) => spawnProc(`busy-${i + 1}`, ['-e', 'for(;;){}']));
      await sleep(300);
      const phase: Outcome[] = [];
      const after: Outcome[] = [];
      let stoppedAt = Number.POSITIVE_INFINITY;
      // One stream across the phase and the recovery: the busy processes stop while it runs.
      const stopping = sleep(phaseMs).then(async () => {
        await Promise.all(spinners.map((s) => s.stop(200)));
        stoppedAt = performance.now();
      });
      const all: Outcome[] = [];
      await Promise.all([stream(send, rate, phaseMs + recoveryWindowMs, counter, all), stopping]);
      for (const o of all) (o.sentAt < stoppedAt ? phase : after).push(o);
      const s = summary(phase);
      // The bound is the 0-core phase's (the first phase's when 0 is not run).
      boundMs ??= Math.max(2 * (s.p99_ms ?? 0), (s.p99_ms ?? 0) + 10);
      const rec = summary(after);
      busyCores[String(busy)] = {
        ...s,
        recovery_ms: recoveryMs(after, stoppedAt, boundMs),
        recovery_p99_ms: rec.p99_ms,
        recovery_errors: rec.errors,
        recovery_errors_by_kind: rec.errors_by_kind,
        recovery_deadline_where: rec.deadline_where,
      };
      ctx.log(`  ${JSON.stringify(busyCores[String(busy)])}`);
    }
    return {
      bench: 'contention',
      quick: ctx.quick,
      admission,
      rate_per_s: rate,
      phase_ms: phaseMs,
      recovery_window_ms: recoveryWindowMs,
      recovery_bound_ms: boundMs === undefined ? null : round(boundMs),
      agents: agents.length,
      http_every: 10,
      cpus: os.cpus().length,
      loadavg_at_end: os.loadavg().map((l) => round(l)),
      router_concurrency: await routerConcurrency(httpUrl),
      busy_cores: busyCores,
    };
  } finally {
    await mesh.close();
  }
}

/** The router's adaptive concurrency limit and refusals, from its /metrics. */
async function routerConcurrency(httpUrl: string): Promise<Record<string, number> | null> {
  try {
    const text = await (await fetch(`${httpUrl}/metrics`)).text();
    const read = (name: string) => Number(text.match(new RegExp(`^${name} (\\S+)$`, 'm'))?.[1] ?? Number.NaN);
    return {
      limit: read('edge_mesh_router_concurrency_limit'),
      min_rtt_ms: round(read('edge_mesh_router_concurrency_min_rtt_seconds') * 1000),
      refused: read('edge_mesh_router_concurrency_refused_total'),
    };
  } catch {
    return null;
  }
}
