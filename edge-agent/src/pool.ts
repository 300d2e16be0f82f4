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
import type { FromWorker, LoadedModel, RunJob, ToWorker, WorkerModelSpec } from './worker-protocol.ts';

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

/** Weight of the newest sample in the hand-off EWMA. */
const HANDOFF_EWMA_ALPHA = 0.1;

export interface PoolOptions {
  size: number;
  models: WorkerModelSpec[];
  intraOpThreads: number;
  warmupRuns: number;
  /** Jobs one worker may hold at once (1 = no pipelining). */
  pipelineDepth: number;
  logger: Logger;
}

/** A worker thread started and listened to, its models not yet sent (see `boot`). */
interface Spawned {
  worker: Worker;
  loaded: Promise<LoadedModel[]>;
}

export class WorkerPool implements Executor {
  private readonly slots: Slot[] = [];
  /** Workers booted ahead of `start`. */
  private booted: Spawned[] = [];
  private models: WorkerModelSpec[];
  private held = 0;
  private nextJob = 1;
  private closing = false;
  private flushQueued = false;
  /** Time a job spends outside the runtime between dispatch and result (EWMA, ms). */
  handoffMs = 0.1;
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

  async close(): Promise<void> {
    this.closing = true;
    const booted = this.booted.map((s) => s.worker);
    this.booted = [];
    await Promise.all([...this.slots.map((s) => s.worker), ...booted].map((w) => w.terminate()));
    this.slots.length = 0;
    this.held = 0;
  }

  /** A worker thread with its listeners; it loads its models once `init` sends them. */
  private spawn(): Spawned {
    const { logger } = this.options;
    const execArgv = workerExecArgv(process.execArgv);
    const worker = new Worker(WORKER_URL, execArgv ? { execArgv } : {});
    const loaded = new Promise<LoadedModel[]>((resolve, reject) => {
      const slot: Slot = { worker, jobs: new Map(), outbox: [], transfer: [] };
      let ready = false;
      worker.on('message', (message: FromWorker) => {
        switch (message.type) {
          case 'ready':
            ready = true;
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
        if (!ready || this.closing) return;
        this.replace(slot, code);
      });
    });
    // A worker closed before it got its models rejects a promise no one awaits.
    loaded.catch(() => {});
    return { worker, loaded };
  }

  private init(worker: Worker): void {
    const { intraOpThreads, warmupRuns } = this.options;
    const init: ToWorker = { type: 'init', models: this.models, intraOpThreads, warmupRuns };
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
