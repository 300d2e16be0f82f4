/**
 * A fixed pool of inference workers. Each worker holds a session for every model, so any idle
 * worker can take any job; a worker that dies is replaced and its job fails with a coded error.
 */
import { Worker } from 'node:worker_threads';
import type { Logger } from 'pino';
import { MeshError, type Tensor, type TypedArray } from '../protocol/index.ts';
import type { FromWorker, LoadedModel, ToWorker, WorkerModelSpec } from './worker-protocol.ts';

const WORKER_URL = new URL('./worker.mjs', import.meta.url);

export interface JobResult {
  outputs: Record<string, Tensor>;
  execMs: number;
}

type JobCallback = (err: MeshError | undefined, result?: JobResult) => void;

interface Slot {
  worker: Worker;
  busyJob: number | undefined;
  callback: JobCallback | undefined;
}

export interface PoolOptions {
  size: number;
  models: WorkerModelSpec[];
  intraOpThreads: number;
  warmupRuns: number;
  logger: Logger;
}

export class WorkerPool {
  private readonly slots: Slot[] = [];
  private readonly idle: Slot[] = [];
  private nextJob = 1;
  private closing = false;
  /** Called when a worker becomes idle, so the scheduler can hand it the next job. */
  onIdle: () => void = () => {};

  constructor(private readonly options: PoolOptions) {}

  /** Starts every worker and resolves with the models as loaded, latency the median across workers. */
  async start(): Promise<LoadedModel[]> {
    const results = await Promise.all(Array.from({ length: this.options.size }, () => this.spawn()));
    const first = results[0]!;
    return first.map((model, i) => {
      const latencies = results.map((r) => r[i]!.latencyMs).sort((a, b) => a - b);
      return { ...model, latencyMs: latencies[Math.floor(latencies.length / 2)]! };
    });
  }

  get size(): number {
    return this.slots.length;
  }

  get idleCount(): number {
    return this.idle.length;
  }

  /** Runs a job on an idle worker; the caller checks `idleCount` first. Input buffers are transferred. */
  run(model: string, inputs: Record<string, Tensor>, callback: JobCallback): void {
    const slot = this.idle.pop();
    if (!slot) throw new MeshError('MESH_INTERNAL', 'no idle worker');
    const job = this.nextJob++;
    slot.busyJob = job;
    slot.callback = callback;
    const transfer = new Set<ArrayBuffer>();
    for (const t of Object.values(inputs)) if ((t.data as TypedArray).buffer instanceof ArrayBuffer) transfer.add(t.data.buffer as ArrayBuffer);
    const message: ToWorker = { type: 'run', job, model, inputs };
    slot.worker.postMessage(message, [...transfer]);
  }

  async close(): Promise<void> {
    this.closing = true;
    await Promise.all(this.slots.map((s) => s.worker.terminate()));
    this.slots.length = 0;
    this.idle.length = 0;
  }

  private spawn(): Promise<LoadedModel[]> {
    const { models, intraOpThreads, warmupRuns, logger } = this.options;
    return new Promise((resolve, reject) => {
      const worker = new Worker(WORKER_URL);
      const slot: Slot = { worker, busyJob: undefined, callback: undefined };
      let ready = false;
      worker.on('message', (message: FromWorker) => {
        switch (message.type) {
          case 'ready':
            ready = true;
            this.slots.push(slot);
            this.idle.push(slot);
            resolve(message.models);
            this.onIdle();
            return;
          case 'fatal':
            reject(new MeshError('MESH_INFERENCE_FAILED', `worker could not load models: ${message.message}`));
            void worker.terminate();
            return;
          case 'done':
          case 'failed': {
            if (slot.busyJob !== message.job) return;
            const callback = slot.callback!;
            slot.busyJob = undefined;
            slot.callback = undefined;
            this.idle.push(slot);
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
      const init: ToWorker = { type: 'init', models, intraOpThreads, warmupRuns };
      worker.postMessage(init);
    });
  }

  private replace(slot: Slot, exitCode: number): void {
    const index = this.slots.indexOf(slot);
    if (index >= 0) this.slots.splice(index, 1);
    const idleIndex = this.idle.indexOf(slot);
    if (idleIndex >= 0) this.idle.splice(idleIndex, 1);
    slot.callback?.(new MeshError('MESH_INFERENCE_FAILED', `inference worker exited with code ${exitCode}`));
    this.options.logger.warn({ exitCode }, 'replacing inference worker');
    this.spawn().catch((err) => this.options.logger.error({ err }, 'could not replace inference worker'));
  }
}
