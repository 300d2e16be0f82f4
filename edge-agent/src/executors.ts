/**
 * Where each model runs: inline on the main thread (inline.ts) or on the worker pool (pool.ts).
 *
 * The rule (docs/agent.md, "Inline models"): a model runs inline when `inlineMaxMs` is above 0, every
 * input it declares has a fixed shape (first read from the file, so a model with a free dim never
 * gets a session on the main thread; then confirmed by the session's own metadata), and the p99 of
 * its warm-up runs on the main thread is within `inlineMaxMs`. Every other model runs on the worker
 * pool, which is started only when some model needs it: an agent whose models all run inline has no
 * worker thread.
 */
import type { Logger } from 'pino';
import type { Executor, StackingCounters } from './executor.ts';
import type { InlineExecutor } from './inline.ts';
import { declaredInputs, declaresFixedShapes } from './onnx-inputs.ts';
import { WorkerPool } from './pool.ts';
import type { LoadedModel, WorkerModelSpec } from './worker-protocol.ts';

export interface ExecutorOptions {
  workers: number;
  intraOpThreads: number;
  warmupRuns: number;
  /** Nice value added to worker threads while they load (docs/agent.md, "Starting without starving the neighbours"). */
  loadNice: number;
  pipelineDepth: number;
  /** 0 turns inline execution off. */
  inlineMaxMs: number;
  inlineBatchMax: number;
  /** Where stacked inline runs are counted (a fresh count when absent). */
  stacking?: StackingCounters;
}

export interface Executors {
  /** Every model as loaded, in the order given. */
  loaded: LoadedModel[];
  /** The executor of each model. */
  executorOf: ReadonlyMap<string, Executor>;
  /** Names of the models that run inline. */
  inline: string[];
  /** Worker threads running now. */
  workerThreads(): number;
  /** Jobs that can run at once: one per worker thread, and one more when models run inline. */
  lanes(): number;
  close(): Promise<void>;
}

/** Why a model cannot run inline, judged from the file alone; undefined for a candidate. */
async function fileVerdict(spec: WorkerModelSpec): Promise<string | undefined> {
  try {
    return declaresFixedShapes(await declaredInputs(spec.path)) ? undefined : 'inputs without a fixed shape';
  } catch (err) {
    return `inputs not readable from the file: ${(err as Error).message}`;
  }
}

export async function openExecutors(specs: WorkerModelSpec[], options: ExecutorOptions, logger: Logger): Promise<Executors> {
  const { inlineMaxMs } = options;
  const pool = new WorkerPool({
    size: options.workers,
    intraOpThreads: options.intraOpThreads,
    warmupRuns: options.warmupRuns,
    loadNice: options.loadNice,
    pipelineDepth: options.pipelineDepth,
    logger,
    models: [],
  });
  let inline: InlineExecutor | undefined;
  const inlineLoaded = new Map<string, LoadedModel>();
  try {
    const candidates: WorkerModelSpec[] = [];
    if (inlineMaxMs > 0) {
      for (const spec of specs) {
        const reason = await fileVerdict(spec);
        if (reason) logger.info({ model: spec.name, reason }, 'model runs on the worker pool');
        else candidates.push(spec);
      }
    }
    // When some model surely needs the pool, its workers start (a thread, a V8 isolate, onnxruntime)
    // while this thread measures the candidates, instead of after.
    if (candidates.length < specs.length) pool.boot();
    if (candidates.length > 0) {
      const { loadInline } = await import('./inline.ts');
      const result = await loadInline(candidates, options);
      inline = result.executor;
      for (const m of result.loaded) inlineLoaded.set(m.name, m);
      for (const p of result.probes) {
        if (p.inline) {
          logger.info({ model: p.name, p99Ms: round3(p.p99Ms!), inlineMaxMs }, 'model runs inline');
          const b = p.batching;
          if (b?.on)
            logger.info(
              { model: p.name, rowMs: round3(b.rowMs!), aloneMs: round3(b.aloneMs), batchMax: options.inlineBatchMax },
              'model runs stacked when requests wait together',
            );
          else if (b) logger.info({ model: p.name, reason: b.reason }, 'model runs one request at a time');
        } else
          logger.info(
            { model: p.name, reason: p.reason, ...(p.p99Ms !== undefined ? { p99Ms: round3(p.p99Ms) } : {}) },
            'model runs on the worker pool',
          );
      }
    }
  } catch (err) {
    await Promise.all([pool.close(), inline?.close()]);
    throw err;
  }

  const pooled = specs.filter((s) => !inlineLoaded.has(s.name));
  const poolLoaded = new Map<string, LoadedModel>();
  if (pooled.length > 0) {
    try {
      for (const m of await pool.start(pooled)) poolLoaded.set(m.name, m);
    } catch (err) {
      await Promise.all([pool.close(), inline?.close()]);
      throw err;
    }
  }

  const executorOf = new Map<string, Executor>();
  const loaded: LoadedModel[] = [];
  for (const spec of specs) {
    const m = inlineLoaded.get(spec.name) ?? poolLoaded.get(spec.name);
    // The pool resolves with every model or rejects; a model in neither map would be a bug here.
    if (!m) continue;
    loaded.push(m);
    executorOf.set(spec.name, inlineLoaded.has(spec.name) ? inline! : pool);
  }
  return {
    loaded,
    executorOf,
    inline: [...inlineLoaded.keys()],
    workerThreads: () => pool.size,
    lanes: () => pool.size + (inline ? 1 : 0),
    async close() {
      await Promise.all([pool.close(), inline?.close()]);
    },
  };
}

const round3 = (ms: number) => Math.round(ms * 1000) / 1000;

/** The same executors, whose close() runs once however often it is called (a slot's owner and the agent's shutdown both close). */
export function closingOnce(executors: Executors): Executors {
  let closing: Promise<void> | undefined;
  return { ...executors, close: () => (closing ??= executors.close()) };
}

/**
 * One executor per model, for an agent with a memory budget (deploy.ts): each can be closed alone, which ends its
 * worker threads (or releases its inline session) and so frees that model's memory. The cost is a worker pool per
 * model instead of one for all. Sessions are never released one by one inside a shared worker (worker.mjs: creating
 * and releasing sessions repeatedly leaks).
 */
export async function openExecutorsEach(
  specs: WorkerModelSpec[],
  options: ExecutorOptions,
  logger: Logger,
): Promise<{ all: Executors; each: Map<string, Executors> }> {
  const each = new Map<string, Executors>();
  try {
    for (const spec of specs) each.set(spec.name, closingOnce(await openExecutors([spec], options, logger)));
  } catch (err) {
    await Promise.all([...each.values()].map((e) => e.close()));
    throw err;
  }
  const list = [...each.values()];
  return {
    each,
    all: {
      loaded: list.flatMap((e) => e.loaded),
      executorOf: new Map(list.flatMap((e) => [...e.executorOf])),
      inline: list.flatMap((e) => e.inline),
      workerThreads: () => list.reduce((n, e) => n + e.workerThreads(), 0),
      lanes: () => list.reduce((n, e) => n + e.lanes(), 0),
      async close() {
        await Promise.all(list.map((e) => e.close()));
      },
    },
  };
}
