/**
 * `npm run bench -- contention [--quick]`: the mesh's parts as separate processes (a broker and two agents with
 * every model, as `npm start` runs them) under a steady stream of requests, with 0, 1 and 2 cores held busy by
 * another process (a `node -e 'for(;;){}'` per core). After each busy phase the busy processes stop and the stream
 * goes on for a recovery window, to see whether latency comes back.
 *
 * The stream is open loop: one request every 1000/rate ms whatever the answers do, from an SDK client in this
 * process, with the sample app's model mix and deadlines (demo/src/sample-app.ts): an OCR detection every 20th
 * request, the rest wake-word, voice activity and OCR classification in turn.
 *
 * Last line: { busy_cores: { "0": { requests, errors, p50_ms, p99_ms, errors_by_code, recovery_p99_ms }, "1": …, "2": … } }
 * (docs/benchmarks.md, "contention").
 */
import os from 'node:os';
import { round, summarize } from '@edge-mesh/client';
import { ensureModelsFolder, SAMPLE_DEADLINES_MS, sampleInputs } from '@edge-mesh/demo';
import { connect, type Mesh, MeshError } from '@edge-mesh/sdk';
import {
  admitted,
  assertBuilt,
  type BenchContext,
  type BenchResult,
  MODELS_DIR,
  type Proc,
  sleep,
  spawnProc,
  startAgentProc,
  startBrokerProc,
} from './lib.ts';

interface Window {
  latencies: number[];
  errors: Record<string, number>;
  requests: number;
}

const emptyWindow = (): Window => ({ latencies: [], errors: {}, requests: 0 });

/** The sample app's mix: an OCR detection every 20th request, else wake-word, voice activity, OCR classification in turn. */
function modelFor(n: number): string {
  if (n % 20 === 19) return 'ocr-det';
  return (['kws', 'vad', 'ocr-cls'] as const)[n % 3]!;
}

/** Sends `rate` requests a second for `ms`, open loop; each outcome lands in the window current when it was sent. */
async function stream(mesh: Mesh, rate: number, ms: number, window: () => Window, counter: { n: number }): Promise<void> {
  const inFlight = new Set<Promise<void>>();
  const started = performance.now();
  const gapMs = 1000 / rate;
  for (let i = 0; performance.now() - started < ms; i++) {
    const due = started + i * gapMs;
    const wait = due - performance.now();
    if (wait > 0) await sleep(wait);
    const w = window();
    const model = modelFor(counter.n++);
    w.requests++;
    const t0 = performance.now();
    const p = mesh
      .infer(model, sampleInputs(model, counter.n % 8), { deadlineMs: SAMPLE_DEADLINES_MS[model] ?? 1_000 })
      .then(
        () => void w.latencies.push(performance.now() - t0),
        (err: unknown) => {
          const code = err instanceof MeshError ? err.code : 'OTHER';
          w.errors[code] = (w.errors[code] ?? 0) + 1;
        },
      )
      .finally(() => inFlight.delete(p));
    inFlight.add(p);
  }
  await Promise.all(inFlight);
}

function summary(w: Window) {
  const s = w.latencies.length ? summarize(w.latencies) : undefined;
  const errors = Object.values(w.errors).reduce((a, b) => a + b, 0);
  return { requests: w.requests, errors, p50_ms: s ? round(s.p50) : null, p99_ms: s ? round(s.p99) : null, errors_by_code: w.errors };
}

export async function run(ctx: BenchContext): Promise<BenchResult> {
  assertBuilt();
  const rate = Number(ctx.args.rate ?? 40);
  const phaseMs = Number(ctx.args['phase-ms'] ?? (ctx.quick ? 6_000 : 30_000));
  const recoveryMs = Number(ctx.args['recovery-ms'] ?? 2_000);
  const busyList = String(ctx.args.busy ?? '0,1,2')
    .split(',')
    .map(Number);
  await ensureModelsFolder(MODELS_DIR);
  const { url } = await startBrokerProc();
  const agents: Proc[] = [];
  for (let i = 0; i < 2; i++) {
    const a = await admitted(url, 'agent');
    agents.push(await startAgentProc({ url, keyFile: a.keyFile, id: a.identity.id, name: `agent-${i + 1}` }));
  }
  const app = await admitted(url, 'app');
  const mesh = await connect({ brokerUrl: url, identity: app.identity });
  try {
    for (const model of ['kws', 'vad', 'ocr-cls', 'ocr-det']) await mesh.waitForModel(model, 30_000, 2);
    const counter = { n: 0 };
    // Warm-up: a second of the stream, not counted.
    await stream(mesh, rate, 1_000, emptyWindow, counter);
    const busyCores: Record<string, ReturnType<typeof summary> & { recovery_p99_ms: number | null; recovery_errors: number }> = {};
    for (const busy of busyList) {
      ctx.log(`contention: ${busy} busy core(s), ${rate} requests/s for ${phaseMs} ms`);
      const spinners = Array.from({ length: busy }, (_, i) => spawnProc(`busy-${i + 1}`, ['-e', 'for(;;){}']));
      await sleep(300);
      const phase = emptyWindow();
      await stream(mesh, rate, phaseMs, () => phase, counter);
      await Promise.all(spinners.map((s) => s.stop(200)));
      // The recovery window starts as the busy processes are gone.
      const after = emptyWindow();
      await stream(mesh, rate, recoveryMs, () => after, counter);
      const rec = summary(after);
      busyCores[String(busy)] = { ...summary(phase), recovery_p99_ms: rec.p99_ms, recovery_errors: rec.errors };
      ctx.log(`  ${JSON.stringify(busyCores[String(busy)])}`);
    }
    return {
      bench: 'contention',
      quick: ctx.quick,
      rate_per_s: rate,
      phase_ms: phaseMs,
      recovery_ms: recoveryMs,
      agents: agents.length,
      cpus: os.cpus().length,
      busy_cores: busyCores,
    };
  } finally {
    await mesh.close();
  }
}
