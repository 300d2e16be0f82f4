/**
 * Bounded per-model queues in front of the executors (the worker pool, and the main thread for
 * models that run inline). A full queue refuses at once (MESH_BUSY); a job whose deadline has passed
 * is dropped when it reaches the head or at the next sweep (MESH_DEADLINE_EXCEEDED); when an executor
 * can take a job, it gets the earliest deadline among the queue heads of the models it runs.
 */
import { MeshError, type ModelLoad, type Tensor } from '@edge-mesh/protocol';
import type { Executor, JobResult } from './executor.ts';
import type { PaidJob } from './payments.ts';
import { joinUnits, type UnitRun, unitInputs } from './units.ts';

export interface Job {
  key: string;
  id: Uint8Array;
  senderId: string;
  model: string;
  inputs: Record<string, Tensor>;
  /** Absolute deadline, epoch ms. */
  deadline: number;
  /** performance.now() when the request arrived. */
  receivedAt: number;
  startedAt?: number;
  cancelled?: boolean;
  /** Set when the request pays on a lane: its receipt is signed when it finishes. */
  paid?: PaidJob;
  /** Set when the model runs in units (units.ts): one run per unit, the job keeping its place between them. */
  units?: UnitRun;
  /** The model name and version the request asked for, when `model` is a deployed version's slot (deploy.ts). */
  served?: { name: string; version?: string };
}

export type FinishCallback = (job: Job, err: MeshError | undefined, result?: JobResult) => void;

interface ModelState {
  executor: Executor;
  queue: Job[];
  inFlight: number;
  serviceMs: number;
  served: number;
  failed: number;
}

/** Weight of the newest run in the service-time EWMA. */
const SERVICE_EWMA_ALPHA = 0.2;

export class Scheduler {
  private readonly models = new Map<string, ModelState>();
  /** The models each executor runs. */
  private readonly lanes = new Map<Executor, ModelState[]>();
  private readonly byKey = new Map<string, Job>();
  private draining = false;
  /** Called after each unit of a job that runs in units, while more remain and it is neither cancelled nor late. */
  onProgress: (job: Job) => void = () => {};

  constructor(
    private readonly queueLimit: number,
    private readonly onFinish: FinishCallback,
    private readonly now: () => number = Date.now,
  ) {}

  /** Serves `name` on `executor`; `latencyMs` is the first service-time estimate. */
  addModel(name: string, latencyMs: number, executor: Executor): void {
    const state: ModelState = { executor, queue: [], inFlight: 0, serviceMs: latencyMs, served: 0, failed: 0 };
    this.models.set(name, state);
    const lane = this.lanes.get(executor);
    if (lane) lane.push(state);
    else {
      this.lanes.set(executor, [state]);
      executor.onIdle = () => this.dispatch(executor);
    }
  }

  /**
   * Stops serving `name` (docs/deployment.md): true once it holds no queued or running job, false (nothing done)
   * while it still does, so the caller retries after the work drains.
   */
  /** No job of the model is queued or running (the memory budget evicts only such a model, deploy.ts). */
  isIdle(name: string): boolean {
    const state = this.models.get(name);
    return !state || (state.queue.length === 0 && state.inFlight === 0);
  }

  removeModel(name: string): boolean {
    const state = this.models.get(name);
    if (!state) return true;
    if (state.queue.length > 0 || state.inFlight > 0) return false;
    this.models.delete(name);
    const lane = this.lanes.get(state.executor);
    if (lane) lane.splice(lane.indexOf(state), 1);
    return true;
  }

  /** Queues a job or throws MESH_BUSY / MESH_DEADLINE_EXCEEDED / MESH_SHUTTING_DOWN. */
  submit(job: Job): void {
    const state = this.models.get(job.model);
    if (!state) throw new MeshError('MESH_UNKNOWN_MODEL', `model ${job.model} is not served here`);
    if (this.draining) throw new MeshError('MESH_SHUTTING_DOWN', 'agent is draining');
    if (job.deadline <= this.now()) throw new MeshError('MESH_DEADLINE_EXCEEDED', 'deadline passed before the request was queued');
    if (state.queue.length >= this.queueLimit) {
      throw new MeshError('MESH_BUSY', `queue for ${job.model} is full (${this.queueLimit})`);
    }
    if (this.byKey.has(job.key)) throw new MeshError('MESH_BAD_REQUEST', 'duplicate request id');
    this.byKey.set(job.key, job);
    state.queue.push(job);
    this.dispatch(state.executor);
  }

  /** Cancels a queued job at once, or marks a running one so its result is discarded. */
  cancel(key: string, senderId: string): boolean {
    const job = this.byKey.get(key);
    if (!job || job.senderId !== senderId) return false;
    if (job.cancelled) return true;
    job.cancelled = true;
    // Units done when the cancel arrived: the one running now is not counted (docs/settlement.md).
    if (job.units) job.units.atCancel = job.units.done;
    const state = this.models.get(job.model)!;
    const index = state.queue.indexOf(job);
    // Queued, never started or between two units: it ends now. Running: when the run returns.
    if (index >= 0) {
      state.queue.splice(index, 1);
      this.finish(job, new MeshError('MESH_CANCELLED', 'cancelled by sender'));
    }
    return true;
  }

  /** Drops every queued job whose deadline has passed; called by the heartbeat. */
  sweep(): void {
    const now = this.now();
    for (const state of this.models.values()) {
      if (!state.queue.some((j) => j.deadline <= now)) continue;
      const keep: Job[] = [];
      for (const job of state.queue) {
        if (job.deadline <= now) this.finish(job, new MeshError('MESH_DEADLINE_EXCEEDED', 'deadline passed while queued'));
        else keep.push(job);
      }
      state.queue = keep;
    }
  }

  startDraining(): void {
    this.draining = true;
  }

  get pending(): number {
    return this.byKey.size;
  }

  loadReport(): { queued: number; inFlight: number; models: Record<string, ModelLoad> } {
    let queued = 0;
    let inFlight = 0;
    const models: Record<string, ModelLoad> = {};
    for (const [name, s] of this.models) {
      queued += s.queue.length;
      inFlight += s.inFlight;
      models[name] = {
        queued: s.queue.length,
        inFlight: s.inFlight,
        serviceMs: Math.round(s.serviceMs * 1000) / 1000,
        served: s.served,
        failed: s.failed,
      };
    }
    return { queued, inFlight, models };
  }

  /**
   * The queue a reply carries (docs/protocol.md, `res`): requests held, queued and running, across
   * models, and that as work, Σ (queued + running) × the model's service time plus `extraExecMs` each.
   * Cheap enough for every reply: one pass over the models, no allocation but the result.
   */
  queueClaim(extraExecMs = 0): { rif: number; workMs: number } {
    let rif = 0;
    let workMs = 0;
    for (const s of this.models.values()) {
      const held = s.queue.length + s.inFlight;
      rif += held;
      workMs += held * (s.serviceMs + extraExecMs);
    }
    return { rif, workMs: Math.round(workMs * 1000) / 1000 };
  }

  private dispatch(executor: Executor): void {
    const lane = this.lanes.get(executor)!;
    while (executor.freeCapacity > 0) {
      const next = this.takeNext(lane);
      if (!next) return;
      const [job, state] = next;
      job.startedAt ??= performance.now();
      state.inFlight++;
      const units = job.units;
      executor.run(job.model, units ? unitInputs(job.inputs, units.done) : job.inputs, (err, result) => {
        state.inFlight--;
        if (err) state.failed++;
        else {
          state.served++;
          // Service time as a sender sees it: the run plus the hand-off to and from the executor.
          state.serviceMs += SERVICE_EWMA_ALPHA * (result!.execMs + executor.handoffMs - state.serviceMs);
        }
        if (units && !err) {
          units.parts.push(result!.outputs);
          units.done++;
          units.execMs += result!.execMs;
        }
        if (job.cancelled) this.finish(job, new MeshError('MESH_CANCELLED', 'cancelled by sender'));
        else if (!err && job.deadline < this.now())
          this.finish(job, new MeshError('MESH_DEADLINE_EXCEEDED', 'finished after the deadline'));
        else if (units && !err && units.done < units.total) {
          this.onProgress(job);
          // The next unit goes first in its model's queue: the executor calls onIdle after this callback.
          if (!job.cancelled) state.queue.unshift(job);
        } else if (units && !err) {
          let joined: JobResult;
          try {
            joined = { outputs: joinUnits(units.parts), execMs: units.execMs };
          } catch (joinErr) {
            this.finish(job, joinErr as MeshError);
            return;
          }
          this.finish(job, undefined, joined);
        } else this.finish(job, err, result);
      });
    }
  }

  private takeNext(lane: ModelState[]): [Job, ModelState] | undefined {
    const now = this.now();
    let best: ModelState | undefined;
    for (const state of lane) {
      while (state.queue.length > 0 && state.queue[0]!.deadline <= now) {
        this.finish(state.queue.shift()!, new MeshError('MESH_DEADLINE_EXCEEDED', 'deadline passed while queued'));
      }
      const head = state.queue[0];
      if (head && (!best || head.deadline < best.queue[0]!.deadline)) best = state;
    }
    return best ? [best.queue.shift()!, best] : undefined;
  }

  private finish(job: Job, err: MeshError | undefined, result?: JobResult): void {
    this.byKey.delete(job.key);
    this.onFinish(job, err, result);
  }
}
