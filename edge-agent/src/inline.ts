/**
 * Models that run inline: on the agent's main thread, with no worker in between. For a model that
 * runs in a few hundredths of a millisecond, the hop to a worker thread and back costs more than the
 * run, and the worker's V8 isolate costs about 10 MB (docs/agent.md, "Inline models").
 *
 * `session.run` blocks the thread it runs on, so only a model whose every run is known to be short
 * may run here: its inputs have fixed shapes (the agent refuses any other size, so every request
 * costs what the warm-up measured) and the p99 of its warm-up runs is within `inlineMaxMs`. Loaded
 * only when some model may run inline (executors.ts): it brings onnxruntime onto the main thread.
 *
 * The executor keeps the event loop turning under load: onnxruntime-node runs each `session.run` in
 * a setImmediate callback, so the runs handed over in one turn all run in that turn's check phase,
 * and a run handed over from there waits for the next turn, after timers and I/O. The executor takes
 * jobs while the p99s of those not yet finished add up to less than its slice (inlineMaxMs, at most
 * 1 ms), and always one, so inline runs hold the loop for about a slice plus one run per turn at most.
 */
import { MeshError, type Tensor } from '@edge-mesh/protocol';
import type { InferenceSession } from 'onnxruntime-node';
import type { Executor, JobCallback } from './executor.ts';
import { createSession, fixedShapes, fromResults, toFeeds, warmupFeeds } from './ort-session.mjs';
import type { LoadedModel, WorkerModelSpec } from './worker-protocol.ts';

/** Runs timed after the first: enough for a p99 that tolerates one stray slow run. */
export const INLINE_PROBE_RUNS = 100;
/**
 * The timed runs stop after this long (once `warmupRuns` are done), so a model allowed inline by a large
 * bound does not take seconds to measure; the p99 of fewer runs is their maximum, which is stricter.
 */
export const INLINE_PROBE_BUDGET_MS = 250;
/**
 * Inline work per event-loop turn, at most, in p99 milliseconds: inlineMaxMs, or this when the bound is
 * set higher, so that even then the loop turns about a thousand times a second under load.
 */
export const INLINE_SLICE_MAX_MS = 1;

/** Weight of the newest sample in the hand-off EWMA. */
const HANDOFF_EWMA_ALPHA = 0.1;

interface InlineModel {
  session: InferenceSession;
  /** p99 of the warm-up runs: what one run of it may hold the event loop. */
  p99Ms: number;
}

/**
 * Runs `feeds` and measures the time the run itself took. The run starts in a setImmediate callback
 * queued by `session.run`; the mark queued just before it fires right before it, so waiting for the
 * check phase (timers, I/O, other callbacks) is not counted. Should a run ever start at once, the
 * measurement falls back to the whole call.
 */
function timedRun(session: InferenceSession, feeds: InferenceSession.FeedsType): Promise<[InferenceSession.ReturnType, number]> {
  let started = performance.now();
  setImmediate(() => {
    started = performance.now();
  });
  return session.run(feeds).then((results) => [results, performance.now() - started]);
}

/** Involuntary context switches of the process so far (getrusage). */
const preemptions = () => process.resourceUsage().involuntaryContextSwitches;

const p99Of = (sorted: number[]) => sorted[Math.max(0, Math.ceil(0.99 * sorted.length) - 1)]!;

export interface InlineProbe {
  name: string;
  /** Loaded here and kept: the model runs inline. */
  inline: boolean;
  /** Why it does not run inline. */
  reason?: string;
  /** p99 of the timed warm-up runs (absent when the warm-up did not get that far). */
  p99Ms?: number;
}

export class InlineExecutor implements Executor {
  handoffMs = 0.01;
  onIdle: () => void = () => {};
  private running = 0;
  /** Sum of the p99s of the jobs handed to onnxruntime and not finished. */
  private committedMs = 0;
  private closing = false;
  /** Called when the last run finishes while closing. */
  private drained: (() => void) | undefined;

  constructor(
    private readonly models: ReadonlyMap<string, InlineModel>,
    /** Inline work per event-loop turn, in p99 milliseconds. */
    private readonly sliceMs: number,
  ) {}

  get freeCapacity(): number {
    if (this.closing) return 0;
    return this.running === 0 || this.committedMs < this.sliceMs ? 1 : 0;
  }

  /**
   * Hands `inputs` to onnxruntime. The run's time is measured as timedRun does (from a mark queued just
   * before onnxruntime's own setImmediate), written out here so that a run allocates no more than its
   * promise and the two callbacks.
   */
  run(model: string, inputs: Record<string, Tensor>, callback: JobCallback): void {
    const m = this.models.get(model);
    if (!m || this.closing) throw new MeshError('MESH_INTERNAL', `model ${model} does not run inline here`);
    const alone = this.running === 0;
    this.running++;
    this.committedMs += m.p99Ms;
    const sentAt = performance.now();
    let started = sentAt;
    setImmediate(() => {
      started = performance.now();
    });
    let running: Promise<InferenceSession.ReturnType>;
    try {
      running = m.session.run(toFeeds(inputs));
    } catch (err) {
      running = Promise.reject(err);
    }
    running.then(
      (results) => {
        const execMs = performance.now() - started;
        if (this.finished(m)) return;
        if (alone) {
          const handoff = Math.max(0, performance.now() - sentAt - execMs);
          this.handoffMs += HANDOFF_EWMA_ALPHA * (handoff - this.handoffMs);
        }
        callback(undefined, { outputs: fromResults(results), execMs });
        this.onIdle();
      },
      (err: unknown) => {
        if (this.finished(m)) return;
        const message = err instanceof Error ? err.message : String(err);
        callback(new MeshError('MESH_INFERENCE_FAILED', message, { details: { execMs: performance.now() - sentAt } }));
        this.onIdle();
      },
    );
  }

  /** Books a run of `m` as finished; true when the executor is closing (the result is dropped). */
  private finished(m: InlineModel): boolean {
    this.running--;
    this.committedMs = this.running === 0 ? 0 : this.committedMs - m.p99Ms;
    if (!this.closing) return false;
    if (this.running === 0) this.drained?.();
    return true;
  }

  /** Takes no more jobs, lets those running finish (their results are dropped), then releases the sessions. */
  async close(): Promise<void> {
    this.closing = true;
    if (this.running > 0) {
      await new Promise<void>((resolve) => {
        const before = this.drained;
        this.drained = () => {
          before?.();
          resolve();
        };
      });
    }
    await Promise.allSettled([...this.models.values()].map((m) => m.session.release()));
  }
}

export interface InlineOptions {
  intraOpThreads: number;
  warmupRuns: number;
  /** Bound on the p99 of a model's warm-up runs; also the executor's slice per turn, up to INLINE_SLICE_MAX_MS. */
  inlineMaxMs: number;
}

/**
 * Creates a session on this thread for each candidate (inputs declared fixed in the file) and keeps
 * those whose session reports fixed shapes and whose warm-up p99 is within the bound; the others are
 * released and left to the worker pool. Timing stops early once the p99 is known to be over the bound,
 * or after INLINE_PROBE_BUDGET_MS. A run the OS preempted is timed again, so that a busy machine does not
 * send a tiny model to the pool by chance (it still can, once as many retries as runs are spent).
 */
export async function loadInline(
  candidates: WorkerModelSpec[],
  options: InlineOptions,
): Promise<{ executor: InlineExecutor | undefined; loaded: LoadedModel[]; probes: InlineProbe[] }> {
  const { intraOpThreads, warmupRuns, inlineMaxMs } = options;
  const kept = new Map<string, InlineModel>();
  const loaded: LoadedModel[] = [];
  const probes: InlineProbe[] = [];
  for (const spec of candidates) {
    let created: Awaited<ReturnType<typeof createSession>>;
    try {
      created = await createSession(spec, intraOpThreads);
    } catch (err) {
      probes.push({ name: spec.name, inline: false, reason: `no session on the main thread: ${(err as Error).message}` });
      continue;
    }
    const { session, provider, inputs, outputs } = created;
    const refuse = async (probe: Omit<InlineProbe, 'name' | 'inline'>) => {
      probes.push({ name: spec.name, inline: false, ...probe });
      await session.release();
    };
    if (!fixedShapes(inputs)) {
      await refuse({ reason: 'onnxruntime reports inputs without a fixed shape' });
      continue;
    }
    const runs = Math.max(warmupRuns, INLINE_PROBE_RUNS);
    // The p99 is over the bound as soon as more runs than this exceed it.
    const allowedOver = runs - Math.ceil(0.99 * runs);
    const times: number[] = [];
    let over = 0;
    try {
      const feeds = warmupFeeds(inputs, spec.warmup);
      // The first run pays for lazy allocations; it is not part of the measurement.
      await session.run(feeds);
      const started = performance.now();
      let retries = runs;
      while (times.length < runs && over <= allowedOver) {
        if (times.length >= warmupRuns && performance.now() - started > INLINE_PROBE_BUDGET_MS) break;
        const switches = preemptions();
        const [, ms] = await timedRun(session, feeds);
        // A run during which the OS took the CPU away measured the machine's load, not the model: run it
        // again (a bounded number of times, so a loaded machine still gets a decision).
        if (preemptions() !== switches && retries-- > 0) continue;
        times.push(ms);
        if (ms > inlineMaxMs) over++;
      }
    } catch (err) {
      await refuse({ reason: `warm-up failed on the main thread: ${(err as Error).message}` });
      continue;
    }
    times.sort((a, b) => a - b);
    const p99Ms = p99Of(times);
    if (p99Ms > inlineMaxMs) {
      await refuse({ reason: `warm-up p99 above inlineMaxMs (${inlineMaxMs} ms)`, p99Ms });
      continue;
    }
    kept.set(spec.name, { session, p99Ms });
    loaded.push({ name: spec.name, inputs, outputs, provider, latencyMs: times[Math.floor(times.length / 2)] ?? 0 });
    probes.push({ name: spec.name, inline: true, p99Ms });
  }
  const sliceMs = Math.min(inlineMaxMs, INLINE_SLICE_MAX_MS);
  return { executor: kept.size > 0 ? new InlineExecutor(kept, sliceMs) : undefined, loaded, probes };
}
