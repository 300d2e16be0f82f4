/**
 * A fixed pool of inference workers for the models that do not run inline (executors.ts). Each worker
 * holds a session for every such model, so any worker can take any job; a worker that dies is
 * replaced and its jobs fail with a coded error.
 *
 * A worker may hold `pipelineDepth` jobs: while it computes one, the next already waits in its
 * message queue, so it never idles through the hand-off (about 0.2 ms here, four times a
 * wake-word run). Jobs go to the worker holding the fewest.
 */
import { Worker } from 'node:worker_threads';
import { MeshError, type Tensor, type TypedArray } from '@edge-mesh/protocol';
import type { Logger } from 'pino';
import type { Executor, JobCallback } from './executor.ts';
import type { FromWorker, LoadedModel, LoadPriority, RunJob, ToWorker, WorkerModelSpec } from './worker-protocol.ts';

const WORKER_URL = new URL('./worker.mjs', import.meta.url);

/**
 * A worker thread gets no TypeScript loader, so it runs the built packages even when the agent itself
 * runs from source (the tests run with the `@edge-mesh/source` condition): without that condition,
 * the worker's imports resolve to dist/. Undefined when there is nothing to drop: the worker then
 * inherits node's flags as they are (flags passed explicitly must be ones a worker accepts).
 */
export function workerExecArgv(execArgv: readonly string[]): string[] | undefined {
  const out: string[] = [];
  for (let i = 0; i < execArgv.length; i++) {
    const arg = execArgv[i]!;
    if (arg === '--conditions=@edge-mesh/source' || arg === '-C=@edge-mesh/source') continue;
    if ((arg === '--conditions' || arg === '-C') && execArgv[i + 1] === '@edge-mesh/source') {
      i++;
      continue;
    }
    out.push(arg);
  }
  return out.length === execArgv.length ? undefined : out;
}

interface SlotJob {
  callback: JobCallback;
  sentAt: number;
  /** Sent to a worker that held nothing, so its round trip measures the hand-off alone. */
  alone: boolean;
}

interface Slot {
  worker: Worker;
  jobs: Map<number, SlotJob>;
  /** Jobs not yet posted: everything dispatched in one event-loop turn goes in one message. */
  outbox: RunJob[];
  transfer: ArrayBuffer[];
}

/**
 * How long `close` waits for a worker to finish the run it is in before terminating it. Terminating a
 * thread while onnxruntime runs on it aborts the process when the run returns (node-addon-api cannot
 * throw into a terminating thread), so a worker is asked to exit between jobs and only forced after this.
 */
const CLOSE_GRACE_MS = 5_000;

/** Weight of the newest sample in the hand-off EWMA. */
const HANDOFF_EWMA_ALPHA = 0.1;

export interface PoolOptions {
  size: number;
  models: WorkerModelSpec[];
  intraOpThreads: number;
  warmupRuns: number;
  /** Nice value added to each worker thread while it loads and warms its models (0: none; docs/agent.md). */
  loadNice?: number;
  /** Jobs one worker may hold at once (1 = no pipelining). */
  pipelineDepth: number;
  logger: Logger;
}

/** A worker thread started and listened to, its models not yet sent (see `boot`). */
interface Spawned {
  worker: Worker;
  loaded: Promise<LoadedModel[]>;
}

/** Asks `worker` to exit between jobs and resolves once it has; terminates it after CLOSE_GRACE_MS. */
function stopWorker(worker: Worker): Promise<void> {
  // A worker that has exited has no thread id left.
  if (worker.threadId < 0) return Promise.resolve();
  return new Promise((resolve) => {
    const force = setTimeout(() => void worker.terminate(), CLOSE_GRACE_MS);
    worker.once('exit', () => {
      clearTimeout(force);
      resolve();
    });
    const close: ToWorker = { type: 'close' };
    worker.postMessage(close);
  });
}

export class WorkerPool implements Executor {
  private readonly slots: Slot[] = [];
  /** Workers booted ahead of `start`. */
  private booted: Spawned[] = [];
  /** Every worker thread not yet exited, ready or not. */
  private readonly threads = new Set<Worker>();
  /** The priority each worker reported when its models were loaded, in the order they were ready. */
  readonly loadPriorities: LoadPriority[] = [];
  private models: WorkerModelSpec[];
  private held = 0;
  private nextJob = 1;
  private closing = false;
  private flushQueued = false;
  /** Time a job spends outside the runtime between dispatch and result (EWMA, ms). */
  handoffMs = 0.1;
  /** `run` transfers the input buffers to a worker. */
  readonly transfersInputs = true;
  /** Called when a worker frees a place, so the scheduler can hand it the next job. */
  onIdle: () => void = () => {};

  constructor(private readonly options: PoolOptions) {
    this.models = options.models;
  }

  /**
   * Starts the worker threads now, before their models are known: each loads worker.mjs and onnxruntime
   * while the agent decides which models run inline (executors.ts); `start` then sends them their models.
   */
  boot(): void {
    while (this.booted.length < this.options.size) this.booted.push(this.spawn());
  }

  /**
   * Starts every worker (or those booted) with `models` (default: the options' models) and resolves with the
   * models as loaded, latency the median across workers.
   */
  async start(models: WorkerModelSpec[] = this.options.models): Promise<LoadedModel[]> {
    this.models = models;
    this.boot();
    const spawned = this.booted;
    this.booted = [];
    for (const { worker } of spawned) this.init(worker);
    const results = await Promise.all(spawned.map((s) => s.loaded));
    const first = results[0]!;
    return first.map((model, i) => {
      const latencies = results.map((r) => r[i]!.latencyMs).sort((a, b) => a - b);
      return { ...model, latencyMs: latencies[Math.floor(latencies.length / 2)]! };
    });
  }

  get size(): number {
    return this.slots.length;
  }

  /** Workers: jobs that run at the same time. */
  get parallelism(): number {
    return this.slots.length;
  }

  /** Places left for jobs across all workers. */
  get freeCapacity(): number {
    return this.slots.length * this.options.pipelineDepth - this.held;
  }

  /** Runs a job on the least-loaded worker; the caller checks `freeCapacity` first. Input buffers are transferred. */
  run(model: string, inputs: Record<string, Tensor>, callback: JobCallback): void {
    let slot: Slot | undefined;
    for (const s of this.slots) if (!slot || s.jobs.size < slot.jobs.size) slot = s;
    if (!slot || slot.jobs.size >= this.options.pipelineDepth) throw new MeshError('MESH_INTERNAL', 'no free worker');
    const job = this.nextJob++;
    slot.jobs.set(job, { callback, sentAt: performance.now(), alone: slot.jobs.size === 0 });
    this.held++;
    const transfer: ArrayBuffer[] = [];
    for (const t of Object.values(inputs)) {
      const buffer = (t.data as TypedArray).buffer;
      if (buffer instanceof ArrayBuffer && !transfer.includes(buffer)) transfer.push(buffer);
    }
    if (slot.jobs.size === 1) {
      // An idle worker gets its job at once: batching would only add latency.
      const message: ToWorker = { type: 'run', jobs: [{ job, model, inputs }] };
      slot.worker.postMessage(message, transfer);
      return;
    }
    slot.outbox.push({ job, model, inputs });
    slot.transfer.push(...transfer);
    if (!this.flushQueued) {
      this.flushQueued = true;
      // The check phase of this same loop turn: jobs for busy workers that arrived together cross
      // in one message, which cuts the agent's hand-off cost under load.
      setImmediate(this.flush);
    }
  }

  private readonly flush = () => {
    this.flushQueued = false;
    for (const slot of this.slots) {
      if (slot.outbox.length === 0) continue;
      const message: ToWorker = { type: 'run', jobs: slot.outbox };
      slot.worker.postMessage(message, slot.transfer);
      slot.outbox = [];
      slot.transfer = [];
    }
  };

  /** Stops every worker between jobs: jobs running finish (their results are dropped), jobs waiting are dropped. */
  async close(): Promise<void> {
    this.closing = true;
    this.booted = [];
    await Promise.all([...this.threads].map((w) => stopWorker(w)));
    this.slots.length = 0;
    this.held = 0;
  }

  /** A worker thread with its listeners; it loads its models once `init` sends them. */
  private spawn(): Spawned {
    const { logger } = this.options;
    const execArgv = workerExecArgv(process.execArgv);
    const worker = new Worker(WORKER_URL, execArgv ? { execArgv } : {});
    this.threads.add(worker);
    const loaded = new Promise<LoadedModel[]>((resolve, reject) => {
      const slot: Slot = { worker, jobs: new Map(), outbox: [], transfer: [] };
      let ready = false;
      worker.on('message', (message: FromWorker) => {
        switch (message.type) {
          case 'ready':
            ready = true;
            if (message.priority) this.loadPriorities.push(message.priority);
            this.slots.push(slot);
            resolve(message.models);
            this.onIdle();
            return;
          case 'fatal':
            reject(new MeshError('MESH_INFERENCE_FAILED', `worker could not load models: ${message.message}`));
            void worker.terminate();
            return;
          case 'done':
          case 'failed': {
            // A closing pool drops results, as it did when it terminated its workers at once.
            if (this.closing) return;
            const entry = slot.jobs.get(message.job);
            if (!entry) return;
            slot.jobs.delete(message.job);
            this.held--;
            const { callback } = entry;
            if (entry.alone) {
              const handoff = Math.max(0, performance.now() - entry.sentAt - message.execMs);
              this.handoffMs += HANDOFF_EWMA_ALPHA * (handoff - this.handoffMs);
            }
            if (message.type === 'done') callback(undefined, { outputs: message.outputs, execMs: message.execMs });
            else callback(new MeshError('MESH_INFERENCE_FAILED', message.message, { details: { execMs: message.execMs } }));
            this.onIdle();
            return;
          }
        }
      });
      worker.on('error', (err) => {
        logger.error({ err }, 'inference worker crashed');
        if (!ready) reject(new MeshError('MESH_INFERENCE_FAILED', `worker failed to start: ${err.message}`, { cause: err }));
      });
      worker.on('exit', (code) => {
        this.threads.delete(worker);
        if (!ready || this.closing) return;
        this.replace(slot, code);
      });
    });
    // A worker closed before it got its models rejects a promise no one awaits.
    loaded.catch(() => {});
    return { worker, loaded };
  }

  private init(worker: Worker): void {
    const { intraOpThreads, warmupRuns, loadNice = 0 } = this.options;
    const init: ToWorker = { type: 'init', models: this.models, intraOpThreads, warmupRuns, loadNice };
    worker.postMessage(init);
  }

  private replace(slot: Slot, exitCode: number): void {
    const index = this.slots.indexOf(slot);
    if (index >= 0) this.slots.splice(index, 1);
    this.held -= slot.jobs.size;
    slot.outbox = [];
    slot.transfer = [];
    for (const { callback } of slot.jobs.values())
      callback(new MeshError('MESH_INFERENCE_FAILED', `inference worker exited with code ${exitCode}`));
    slot.jobs.clear();
    this.options.logger.warn({ exitCode }, 'replacing inference worker');
    const { worker, loaded } = this.spawn();
    this.init(worker);
    loaded.catch((err) => this.options.logger.error({ err }, 'could not replace inference worker'));
  }
}
