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
 *
 * Flush order. A model that passed the batching probe runs the jobs handed over from the first read of the broker
 * connection in a turn in one stacked run. mqtt.js handles a read's packets one per nextTick, and Node runs microtasks
 * only once the nextTick queue is empty, so the flush the first job queues as a microtask runs after the read's last
 * request was handed over; it calls `session.run`, whose setImmediate then runs in this turn's check phase, where a
 * run handed over from the handler itself would have run too. A read holds at most 64 KiB over TCP and 16 KiB over TLS
 * (one or two wake-word requests), so the jobs of the turn's later reads, which come before that run starts, are
 * stacked together in one more run, handed over in the check phase (it runs in the next turn's). The connection holds
 * its writes until a setImmediate it queues two microtasks after the first request (connection.ts, `holdWrites`),
 * which is after this flush's, so the replies of the first read's run and its PUBACKs leave in one write. A job handed
 * over after an await (a paid request, admitted asynchronously) misses that: its reply leaves in a write of its own.
 */
import { readFile } from 'node:fs/promises';
import { MeshError, type Tensor, type TensorInfo, type TypedArray } from '@edge-mesh/protocol';
import type { InferenceSession } from 'onnxruntime-node';
import { type Executor, type JobCallback, type JobResult, newStackingCounters, type StackingCounters } from './executor.ts';
import { createSession, fixedShapes, fromResults, toFeeds, warmupFeeds } from './ort-session.mjs';
import { rebatchOnnx } from './rebatch.ts';
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
  /** Present when it passed the batching probe (probeBatching): the jobs handed over from one read run stacked. */
  stack?: StackedSession;
  /** Jobs of this turn's first read, run together by the flush the first queued as a microtask. */
  pending?: PendingJob[];
  /** The first read's runs wait for this turn's check phase: jobs of later reads go to `later`. */
  opening?: boolean;
  /** Jobs of this turn's later reads, run together in its check phase. */
  later?: PendingJob[];
}

interface StackedSession {
  /** The same model with a batch dimension. */
  session: InferenceSession;
  /** Most jobs in one stacked run. */
  max: number;
  /**
   * What a job in a stacked run may hold the event loop, ms: its share of a run alone (both timed by the probe) applied
   * to the warm-up's p99. The executor's slice counts stacked jobs at this, so a turn can stack more of them.
   */
  rowP99Ms: number;
}

interface PendingJob {
  inputs: Record<string, Tensor>;
  callback: JobCallback;
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

/**
 * The jobs' inputs stacked: each input's rows in job order. Every job's tensors have the model's fixed shape, one row
 * (the agent checked them); a job whose tensor has another length makes this throw, and the jobs run one by one.
 */
export function stackRows(rows: readonly Record<string, Tensor>[]): Record<string, Tensor> {
  const first = rows[0]!;
  const stacked: Record<string, Tensor> = {};
  for (const name of Object.keys(first)) {
    const t = first[name]!;
    const rowLength = t.data.length;
    const data = new (t.data.constructor as new (length: number) => TypedArray)(rowLength * rows.length);
    for (let i = 0; i < rows.length; i++) {
      const row = rows[i]![name];
      if (!row || row.data.length !== rowLength || row.dtype !== t.dtype)
        throw new MeshError('MESH_INTERNAL', `input ${name} differs between the stacked jobs`);
      data.set(row.data as never, i * rowLength);
    }
    stacked[name] = { dtype: t.dtype, shape: [rows.length, ...t.shape.slice(1)], data };
  }
  return stacked;
}

/** Row `i` of `count` of each output of a stacked run, copied (a job's outputs share no memory with another's). */
export function rowOf(outputs: Record<string, Tensor>, i: number, count: number): Record<string, Tensor> {
  const row: Record<string, Tensor> = {};
  for (const name of Object.keys(outputs)) {
    const t = outputs[name]!;
    if (t.shape[0] !== count || t.data.length % count !== 0)
      throw new MeshError('MESH_INTERNAL', `output ${name} has ${t.shape[0]} rows, not ${count}`);
    const rowLength = t.data.length / count;
    row[name] = { dtype: t.dtype, shape: [1, ...t.shape.slice(1)], data: t.data.slice(i * rowLength, (i + 1) * rowLength) };
  }
  return row;
}

/** Rows in the batching probe's isolation and cost runs. */
export const BATCH_PROBE_ROWS = 4;
/** A stacked run is used when a row of it costs at most this share of a run of one row. */
export const BATCH_ROW_SHARE_MAX = 0.75;
/** How far a stacked row's output may be from its own run's: relative, and relative to the largest output of the row. */
const ROW_TOLERANCE = 1e-4;
const FLOATS = new Set(['float32', 'float64']);
const NUMERIC = new Set(['float32', 'float64', 'int8', 'uint8', 'int16', 'uint16', 'int32', 'uint32', 'int64', 'uint64']);
/** The scales of the probe's rows, in turn: a model that mixes rows shows it most where their magnitudes differ. */
const ROW_SCALES = [1, 1e-3, 1e3, 0.5, 30, 1e-2];
/** What the isolation runs put in one row: values no other row's outputs may notice. */
const PERTURBATIONS = [1e6, -1e6, 0, Number.NaN];

/** Row `r` of the probe: float inputs only (their values cannot be out of a model's range), `fill` in place of data. */
function probeRow(inputs: readonly TensorInfo[], r: number, fill?: number): Record<string, Tensor> {
  const row: Record<string, Tensor> = {};
  const scale = ROW_SCALES[r % ROW_SCALES.length]!;
  for (const info of inputs) {
    const shape = info.shape as number[];
    const length = shape.reduce((a, b) => a * b, 1);
    const data = info.dtype === 'float64' ? new Float64Array(length) : new Float32Array(length);
    for (let i = 0; i < length; i++) data[i] = fill ?? Math.sin(i * 0.37 + r * 1.91) * scale;
    row[info.name] = { dtype: info.dtype as Tensor['dtype'], shape, data };
  }
  return row;
}

/** Where `mine` (a stacked row) differs from `own` (the row's own run), or undefined when every value agrees. */
function outputsDiffer(own: Record<string, Tensor>, mine: Record<string, Tensor>): string | undefined {
  for (const name of Object.keys(own)) {
    const a = own[name]!;
    const b = mine[name];
    if (!b || b.dtype !== a.dtype || b.data.length !== a.data.length || b.shape.join() !== a.shape.join())
      return `output ${name} has another shape or type`;
    let largest = 0;
    for (const x of a.data) if (typeof x !== 'bigint' && Number.isFinite(x)) largest = Math.max(largest, Math.abs(x));
    for (let i = 0; i < a.data.length; i++) {
      const x = a.data[i]!;
      const y = b.data[i]!;
      const same =
        typeof x === 'bigint' || typeof y === 'bigint'
          ? x === y
          : x === y || (Number.isNaN(x) && Number.isNaN(y)) || Math.abs(x - y) <= ROW_TOLERANCE * Math.max(Math.abs(x), largest * 1e-2);
      if (!same) return `output ${name} differs at ${i}: ${x} alone, ${y} stacked`;
    }
  }
  return undefined;
}

/** The raw bytes of every output, for a bit-for-bit comparison. */
const bytesOf = (t: Tensor) => Buffer.from(t.data.buffer, t.data.byteOffset, t.data.byteLength);

export interface BatchProbe {
  /** The session with a batch dimension, when stacked runs are used. */
  batched?: InferenceSession;
  /** Why not, when not. */
  reason?: string;
  /** What a row of a stacked run of BATCH_PROBE_ROWS cost, ms (median). */
  rowMs?: number;
  /** What a run alone cost, timed in turns with the stacked runs, ms (median). */
  aloneMs?: number;
}

/**
 * Whether the model's runs may be stacked (docs/agent.md, "Batching inline runs"):
 * - every input a float tensor and every output a numeric one, each with a leading dimension of 1 (rebatch.ts makes
 *   it `N`), and the model with that batch dimension loads;
 * - at 2, BATCH_PROBE_ROWS and `batchMax` rows of different scales, a stacked run gives each row the outputs its own
 *   run gives (within ROW_TOLERANCE);
 * - isolation: with the first or the last row replaced by ±1e6, 0 or NaN, every other row's outputs stay the same to
 *   the bit (same rows, same kernels: any change is one row reaching another). A model that normalises by a peak or
 *   a mean over the whole tensor fails here, whatever its tolerance;
 * - a row of a stacked run of BATCH_PROBE_ROWS costs at most BATCH_ROW_SHARE_MAX of a run alone, the two timed in turns.
 */
export async function probeBatching(
  spec: WorkerModelSpec,
  intraOpThreads: number,
  session: InferenceSession,
  inputs: readonly TensorInfo[],
  outputs: readonly TensorInfo[],
  batchMax: number,
): Promise<BatchProbe> {
  if (!inputs.every((i) => FLOATS.has(i.dtype))) return { reason: 'an input that is not a float tensor' };
  if (!outputs.every((o) => NUMERIC.has(o.dtype))) return { reason: 'an output that is not a numeric tensor' };
  const rebatched = rebatchOnnx(await readFile(spec.path));
  if (!rebatched.ok) return { reason: `no batch dimension can be given: ${rebatched.reason}` };
  let batched: InferenceSession;
  try {
    batched = (await createSession(spec, intraOpThreads, rebatched.bytes)).session;
  } catch (err) {
    return { reason: `the model with a batch dimension does not load: ${(err as Error).message}` };
  }
  const refuse = async (reason: string, rowMs?: number, aloneMs?: number): Promise<BatchProbe> => {
    await batched.release();
    return { reason, ...(rowMs !== undefined ? { rowMs } : {}), ...(aloneMs !== undefined ? { aloneMs } : {}) };
  };
  const stackedRun = async (rows: Record<string, Tensor>[]) => {
    const out = fromResults(await batched.run(toFeeds(stackRows(rows))));
    return rows.map((_, r) => rowOf(out, r, rows.length));
  };
  try {
    const own: Record<string, Tensor>[] = [];
    const sizes = [...new Set([2, BATCH_PROBE_ROWS, batchMax])].filter((n) => n >= 2 && n <= batchMax);
    const rows = Array.from({ length: Math.max(...sizes) }, (_, r) => probeRow(inputs, r));
    for (const row of rows) own.push(fromResults(await session.run(toFeeds(row))));
    for (const n of sizes) {
      const got = await stackedRun(rows.slice(0, n));
      for (let r = 0; r < n; r++) {
        const differs = outputsDiffer(own[r]!, got[r]!);
        if (differs) return await refuse(`a stacked run of ${n} does not give row ${r} its own outputs: ${differs}`);
      }
    }
    const base = rows.slice(0, BATCH_PROBE_ROWS);
    const reference = await stackedRun(base);
    for (const j of [0, BATCH_PROBE_ROWS - 1]) {
      for (const fill of PERTURBATIONS) {
        const got = await stackedRun(base.map((row, r) => (r === j ? probeRow(inputs, r, fill) : row)));
        for (let r = 0; r < base.length; r++) {
          if (r === j) continue;
          for (const name of Object.keys(reference[r]!)) {
            if (!bytesOf(reference[r]![name]!).equals(bytesOf(got[r]![name]!)))
              return await refuse(`row ${j} set to ${fill} changed row ${r}'s output ${name}: the rows are not independent`);
          }
        }
      }
    }
    // Stacked and single runs in turns, so that both meet the same load on a busy machine; medians of 31 each.
    const feeds = toFeeds(stackRows(base));
    const single = toFeeds(base[0]!);
    const stackedTimes: number[] = [];
    const aloneTimes: number[] = [];
    for (let i = 0; i < 31; i++) {
      stackedTimes.push((await timedRun(batched, feeds))[1]);
      aloneTimes.push((await timedRun(session, single))[1]);
    }
    const median = (xs: number[]) => xs.sort((a, b) => a - b)[xs.length >> 1]!;
    const rowMs = median(stackedTimes) / base.length;
    const inTurnsMs = median(aloneTimes);
    if (rowMs > BATCH_ROW_SHARE_MAX * inTurnsMs)
      return await refuse(`a row of a stacked run costs ${rowMs.toFixed(4)} ms, a run alone ${inTurnsMs.toFixed(4)} ms`, rowMs, inTurnsMs);
    return { batched, rowMs, aloneMs: inTurnsMs };
  } catch (err) {
    return refuse(`a stacked run failed: ${(err as Error).message}`);
  }
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
  /** For a model that runs inline: whether its runs are stacked, and why not (probeBatching). */
  batching?: { on: boolean; reason?: string; rowMs?: number; aloneMs: number };
}

export class InlineExecutor implements Executor {
  handoffMs = 0.01;
  onIdle: () => void = () => {};
  /**
   * A job's callback threw (a bug in the caller): by default rethrown from a microtask, so that it surfaces as the
   * process's uncaught exception, after every other job of its run was answered.
   */
  onCallbackError: (err: unknown) => void = (err) =>
    queueMicrotask(() => {
      throw err;
    });
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
    /** Stacked runs made, the requests they carried, and those that failed and were run one by one. */
    readonly stacking: StackingCounters = newStackingCounters(),
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
    const stack = m.stack;
    if (!stack) {
      const alone = this.running === 0;
      this.running++;
      this.committedMs += m.p99Ms;
      this.runOne(m, inputs, callback, alone, m.p99Ms);
      return;
    }
    // A stacked job's `alone` is taken at its flush (flush), where it runs.
    this.running++;
    this.committedMs += stack.rowP99Ms;
    if (m.opening) {
      // A later read of this turn: stacked with the turn's other later reads, in its check phase ("Flush order" above).
      m.later ??= [];
      m.later.push({ inputs, callback });
      if (m.later.length === 1) {
        setImmediate(() => {
          const jobs = m.later!;
          m.later = undefined;
          this.flush(m, stack, jobs);
        });
      }
      return;
    }
    // The first read of this turn: its jobs run together once the read is handled. mqtt.js takes a read's packets one per
    // nextTick, so a microtask queued by the first job runs after the last; onnxruntime runs in this turn's check phase
    // either way, so the first job waits for nothing it did not before.
    m.pending ??= [];
    m.pending.push({ inputs, callback });
    if (m.pending.length === 1) {
      queueMicrotask(() => {
        // Until this read's runs start, the jobs of later reads wait for one run together in the check phase. The mark
        // is queued before the runs' own setImmediates, so it clears right before they start.
        m.opening = true;
        setImmediate(() => (m.opening = false));
        const jobs = m.pending!;
        m.pending = undefined;
        this.flush(m, stack, jobs);
      });
    }
  }

  /** One job in one run of the model's own session (running and committedMs already count it, at `costMs`). */
  private runOne(m: InlineModel, inputs: Record<string, Tensor>, callback: JobCallback, alone: boolean, costMs: number): void {
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
        if (this.finished(costMs)) return;
        if (alone) {
          const handoff = Math.max(0, performance.now() - sentAt - execMs);
          this.handoffMs += HANDOFF_EWMA_ALPHA * (handoff - this.handoffMs);
        }
        this.answer(callback, undefined, { outputs: fromResults(results), execMs });
        this.onIdle();
      },
      (err: unknown) => {
        if (this.finished(costMs)) return;
        const message = err instanceof Error ? err.message : String(err);
        this.answer(callback, new MeshError('MESH_INFERENCE_FAILED', message, { details: { execMs: performance.now() - sentAt } }));
        this.onIdle();
      },
    );
  }

  /** Calls a job's callback; a throw (a bug in the caller) goes to onCallbackError, so the executor goes on. */
  private answer(callback: JobCallback, err: MeshError | undefined, result?: JobResult): void {
    try {
      callback(err, result);
    } catch (thrown) {
      this.onCallbackError(thrown);
    }
  }

  /**
   * Runs jobs gathered for a stacked run: one alone as any job, more in runs of at most `stack.max` rows of the batched
   * session, each job given its own rows of every output. A stacked run that fails is run again job by job, so that
   * one job's failure is its own.
   */
  private flush(m: InlineModel, stack: StackedSession, jobs: PendingJob[]): void {
    if (this.closing) {
      for (let i = 0; i < jobs.length; i++) this.finished(stack.rowP99Ms);
      return;
    }
    for (let from = 0; from < jobs.length; from += stack.max) {
      const chunk = jobs.slice(from, from + stack.max);
      // Alone on the executor now (not when it was handed over: another inline model's run may have been queued since),
      // so its hand-off measures the executor's own.
      if (chunk.length === 1) this.runAloneAfterAll(m, stack, chunk[0]!, this.running === 1);
      else this.runStacked(m, stack, chunk);
    }
  }

  /**
   * A job booked as stacked that runs alone after all: booked again at the price of a run alone. `alone`: nothing else
   * runs on the executor (its hand-off then measures the executor's own).
   */
  private runAloneAfterAll(m: InlineModel, stack: StackedSession, job: PendingJob, alone = false): void {
    this.committedMs += m.p99Ms - stack.rowP99Ms;
    this.runOne(m, job.inputs, job.callback, alone, m.p99Ms);
  }

  private runStacked(m: InlineModel, stack: StackedSession, jobs: PendingJob[]): void {
    // Each job again on its own: the jobs still count as running, so they are run, not booked anew.
    const retry = () => {
      this.stacking.fallbacks++;
      if (this.closing) {
        for (let i = 0; i < jobs.length; i++) this.finished(stack.rowP99Ms);
        return;
      }
      for (const job of jobs) this.runAloneAfterAll(m, stack, job);
    };
    let started = performance.now();
    setImmediate(() => {
      started = performance.now();
    });
    let running: Promise<InferenceSession.ReturnType>;
    try {
      running = stack.session.run(toFeeds(stackRows(jobs.map((j) => j.inputs))));
    } catch (err) {
      running = Promise.reject(err);
    }
    running.then(
      (results) => {
        const execMs = performance.now() - started;
        let rows: Record<string, Tensor>[];
        try {
          const outputs = fromResults(results);
          rows = jobs.map((_, i) => rowOf(outputs, i, jobs.length));
        } catch {
          return retry();
        }
        this.stacking.runs++;
        this.stacking.requests += jobs.length;
        // Every job is booked before any callback runs: a callback that throws must not strand the jobs after it.
        for (let i = 0; i < jobs.length; i++) this.finished(stack.rowP99Ms);
        if (this.closing) return;
        const shareMs = execMs / jobs.length;
        for (let i = 0; i < jobs.length; i++) this.answer(jobs[i]!.callback, undefined, { outputs: rows[i]!, execMs, shareMs });
        this.onIdle();
      },
      () => retry(),
    );
  }

  /** Books a job that counted `costMs` as finished; true when the executor is closing (the result is dropped). */
  private finished(costMs: number): boolean {
    this.running--;
    this.committedMs = this.running === 0 ? 0 : this.committedMs - costMs;
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
    await Promise.allSettled(
      [...this.models.values()].flatMap((m) => [m.session.release(), ...(m.stack ? [m.stack.session.release()] : [])]),
    );
  }
}

export interface InlineOptions {
  intraOpThreads: number;
  warmupRuns: number;
  /** Bound on the p99 of a model's warm-up runs; also the executor's slice per turn, up to INLINE_SLICE_MAX_MS. */
  inlineMaxMs: number;
  /** Most jobs in one stacked run; 1 turns stacking off (no probe). */
  inlineBatchMax: number;
  /** Where the executor counts its stacked runs. */
  stacking?: StackingCounters;
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
  const { intraOpThreads, warmupRuns, inlineMaxMs, inlineBatchMax } = options;
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
    const aloneMs = times[Math.floor(times.length / 2)] ?? 0;
    const model: InlineModel = { session, p99Ms };
    let batching: InlineProbe['batching'];
    if (inlineBatchMax > 1) {
      const probe = await probeBatching(spec, intraOpThreads, session, inputs, outputs, inlineBatchMax);
      if (probe.batched) {
        const share = probe.aloneMs! > 0 ? Math.min(1, probe.rowMs! / probe.aloneMs!) : 1;
        model.stack = { session: probe.batched, max: inlineBatchMax, rowP99Ms: share * p99Ms };
      }
      batching = {
        on: probe.batched !== undefined,
        aloneMs: probe.aloneMs ?? aloneMs,
        ...(probe.reason ? { reason: probe.reason } : {}),
        ...(probe.rowMs !== undefined ? { rowMs: probe.rowMs } : {}),
      };
    }
    kept.set(spec.name, model);
    loaded.push({ name: spec.name, inputs, outputs, provider, latencyMs: aloneMs });
    probes.push({ name: spec.name, inline: true, p99Ms, ...(batching ? { batching } : {}) });
  }
  const sliceMs = Math.min(inlineMaxMs, INLINE_SLICE_MAX_MS);
  return { executor: kept.size > 0 ? new InlineExecutor(kept, sliceMs, options.stacking) : undefined, loaded, probes };
}
