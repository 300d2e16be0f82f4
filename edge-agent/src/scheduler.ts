/**
 * Bounded per-model queues in front of the executors (the worker pool, and the main thread for
 * models that run inline). A full queue refuses at once (MESH_BUSY), unless the newcomer's sender holds at least
 * two fewer of its places than the sender holding the most: then that sender's latest job makes room, answered
 * MESH_BUSY (`displacedBy`). A job whose deadline has passed is dropped when it reaches the head or at the next
 * sweep (MESH_DEADLINE_EXCEEDED); when an executor can take a job, it gets the earliest deadline among the queue
 * heads of the models it runs.
 *
 * Admission (docs/operations.md, "Overload"): a job that the queue cannot serve before its deadline is refused at once
 * with MESH_OVERLOADED instead of being queued to expire. The estimate is the agent's own: the work that would go
 * before the job on its executor, in the order takeNext serves (`admit` says how), shared by the executor's parallel
 * runs, plus one service time of the job's model. A job is also refused when the queued work it would overtake could
 * no longer meet its deadlines with it ahead. The service time here is the median of the model's last
 * runs, not the EWMA the load report carries: a run that measured long because the process lost the CPU for a while
 * must not refuse the requests after it. Only the deadline is the sender's; whatever it claims, the
 * estimate comes from this agent's queue and clock.
 */
import { MeshError, type ModelLoad, type Tensor } from '@edge-mesh/protocol';
import type { Executor, JobResult } from './executor.ts';
import type { PaidJob } from './payments.ts';
import { largestHolder } from './shares.ts';
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
  /** When a job of the model last started, this.now() ms. */
  lastStartAt: number;
  /** The last runs' service times (a ring), and their median: the service time admission uses. */
  recent: number[];
  recentNext: number;
  admitMs: number;
  /** Jobs in units with a unit running and more to come: each goes back to the head of the queue after its unit. */
  unitJobs: Job[];
}

/**
 * Which queued job a job of `senderId` takes the place of in a full queue, if any: the latest-deadline job of the sender
 * holding the most of the queue, when that sender holds at least two more than `senderId` does. So one sender that
 * filled a model's queue (a flood with long deadlines) cannot refuse everyone else: each newcomer takes a place from
 * it until the senders' shares differ by at most one. A job that starts running is no longer in the queue.
 */
export function displacedBy(queue: readonly Job[], senderId: string): Job | undefined {
  const held = new Map<string, number>();
  for (const j of queue) held.set(j.senderId, (held.get(j.senderId) ?? 0) + 1);
  const largest = largestHolder(held, (n) => n);
  if (!largest || (held.get(senderId) ?? 0) + 1 >= largest.size) return undefined;
  const top = largest.key;
  let victim: Job | undefined;
  // A job that runs in units and has started (units.ts: it waits in the queue between units) is not given up: its
  // units done would be lost unpaid.
  for (const j of queue) if (j.senderId === top && !(j.units && j.units.done > 0) && (!victim || j.deadline >= victim.deadline)) victim = j;
  return victim;
}

/** Runs whose median is admission's service time. */
const ADMIT_RUNS = 15;

/** A model that started no job for this long takes one that would start at once, whatever its estimate (admit). */
const PROBE_AFTER_MS = 1_000;

/** Weight of the newest run in the service-time EWMA. */
const SERVICE_EWMA_ALPHA = 0.2;

/** Where noteRun sorts a copy of the last runs: one array for every model, so a run allocates nothing here. */
const sortedRuns = new Float64Array(ADMIT_RUNS);

/** Adds a run's service time to the model's last runs and updates their median (an insertion sort of at most ADMIT_RUNS). */
function noteRun(state: ModelState, ms: number): void {
  state.recent[state.recentNext] = ms;
  state.recentNext = (state.recentNext + 1) % ADMIT_RUNS;
  const n = state.recent.length;
  for (let i = 0; i < n; i++) {
    const v = state.recent[i]!;
    let j = i;
    for (; j > 0 && sortedRuns[j - 1]! > v; j--) sortedRuns[j] = sortedRuns[j - 1]!;
    sortedRuns[j] = v;
  }
  state.admitMs = sortedRuns[n >> 1]!;
}

/** The work a job holds on its model's executor: one service time, or one a unit still to run (after the running one). */
function workMs(state: ModelState, job: Job, running: boolean): number {
  const units = job.units;
  return state.admitMs * (units ? units.total - units.done - (running ? 1 : 0) : 1);
}

/** A model's `k`th job in the order its queue serves them: the jobs in units coming back first, then the queue. */
const pending = (state: ModelState, k: number): Job =>
  k < state.unitJobs.length ? state.unitJobs[k]! : state.queue[k - state.unitJobs.length]!;

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
    /** Refuse what the queue cannot serve in time (admit); false queues it to expire there. */
    private readonly admission = true,
  ) {}

  /**
   * Serves `name` on `executor`; `latencyMs` is the first service-time estimate. When `name` is already served (a
   * model reloaded beside the running one, reload.ts), its queued jobs move to the new executor and the old one
   * keeps only the jobs running on it.
   */
  addModel(name: string, latencyMs: number, executor: Executor): void {
    const state: ModelState = {
      executor,
      queue: [],
      inFlight: 0,
      serviceMs: latencyMs,
      served: 0,
      failed: 0,
      lastStartAt: 0,
      recent: [],
      recentNext: 0,
      admitMs: latencyMs,
      unitJobs: [],
    };
    const old = this.models.get(name);
    if (old) {
      state.queue = old.queue;
      old.queue = [];
      state.served = old.served;
      state.failed = old.failed;
      this.retired.set(old, name);
    }
    this.models.set(name, state);
    const lane = this.lanes.get(executor);
    if (lane) lane.push(state);
    else {
      this.lanes.set(executor, [state]);
      executor.onIdle = () => this.dispatch(executor);
    }
    if (state.queue.length > 0) this.dispatch(executor);
  }

  /**
   * Stops taking requests for `name` (MESH_UNKNOWN_MODEL from now on); its queued and running jobs still run on
   * its executor. Returns whether it was served.
   */
  removeModel(name: string): boolean {
    const state = this.models.get(name);
    if (!state) return false;
    this.models.delete(name);
    this.retired.set(state, name);
    return true;
  }

  /** Whether `executor` still has work: a model served on it, or jobs queued or running on it. */
  inUse(executor: Executor): boolean {
    this.pruneRetired();
    return (this.lanes.get(executor) ?? []).length > 0;
  }

  /** Whether a removed or replaced `name` still has jobs queued or running on its old executor. */
  retiredBusy(name: string): boolean {
    this.pruneRetired();
    for (const [state, model] of this.retired) if (model === name && (state.queue.length > 0 || state.inFlight > 0)) return true;
    return false;
  }

  /** States of removed or replaced models, kept in their executor's lane until their jobs are done. */
  private readonly retired = new Map<ModelState, string>();

  private pruneRetired(): void {
    for (const state of this.retired.keys()) {
      if (state.queue.length > 0 || state.inFlight > 0) continue;
      this.retired.delete(state);
      const lane = this.lanes.get(state.executor);
      if (!lane) continue;
      lane.splice(lane.indexOf(state), 1);
      if (lane.length === 0) this.lanes.delete(state.executor);
    }
  }

  /** No job of the model is queued or running (the memory budget evicts only such a model, deploy.ts). */
  isIdle(name: string): boolean {
    const state = this.models.get(name);
    return !state || (state.queue.length === 0 && state.inFlight === 0);
  }

  /**
   * Stops serving `name` (docs/deployment.md): true once it holds no queued or running job, false (nothing done)
   * while it still does, so the caller retries after the work drains.
   */
  removeIdleModel(name: string): boolean {
    const state = this.models.get(name);
    if (!state) return true;
    if (state.queue.length > 0 || state.inFlight > 0) return false;
    this.models.delete(name);
    const lane = this.lanes.get(state.executor);
    if (lane) lane.splice(lane.indexOf(state), 1);
    return true;
  }

  /** Whether the job `key` is queued or running here. */
  holds(key: string): boolean {
    return this.byKey.has(key);
  }

  /** Queues a job or throws MESH_BUSY / MESH_OVERLOADED / MESH_DEADLINE_EXCEEDED / MESH_SHUTTING_DOWN. */
  submit(job: Job): void {
    const state = this.models.get(job.model);
    if (!state) throw new MeshError('MESH_UNKNOWN_MODEL', `model ${job.model} is not served here`);
    if (this.draining) throw new MeshError('MESH_SHUTTING_DOWN', 'agent is draining');
    if (job.deadline <= this.now()) throw new MeshError('MESH_DEADLINE_EXCEEDED', 'deadline passed before the request was queued');
    let displaced: Job | undefined;
    if (state.queue.length >= this.queueLimit) {
      displaced = displacedBy(state.queue, job.senderId);
      if (!displaced) throw new MeshError('MESH_BUSY', `queue for ${job.model} is full (${this.queueLimit})`);
    }
    if (this.admission) this.admit(job, state);
    if (this.byKey.has(job.key)) throw new MeshError('MESH_BAD_REQUEST', 'duplicate request id');
    if (displaced) {
      state.queue.splice(state.queue.indexOf(displaced), 1);
      this.finish(
        displaced,
        new MeshError(
          'MESH_BUSY',
          `queue for ${job.model} is full (${this.queueLimit}) and you held the most of it: your latest job made room`,
        ),
      );
    }
    this.byKey.set(job.key, job);
    state.queue.push(job);
    this.dispatch(state.executor);
  }

  /**
   * What a job of `model` would take here, ms from now (see the file comment): the held work on its executor over
   * the executor's parallelism, plus one service time of its model.
   */
  estimateMs(model: string): number {
    const state = this.models.get(model);
    return state ? this.waitMs(state) + state.admitMs : Number.POSITIVE_INFINITY;
  }

  /** The wait before a job of this model would start: 0 when a run slot is free and nothing waits for it. */
  private waitMs(state: ModelState): number {
    const executor = state.executor;
    const parallelism = Math.max(1, executor.parallelism ?? 1);
    let heldMs = 0;
    let queued = 0;
    let running = 0;
    for (const s of this.lanes.get(executor)!) {
      heldMs += s.queue.length * s.admitMs + s.inFlight * s.admitMs * 0.5;
      queued += s.queue.length;
      running += s.inFlight;
    }
    return queued === 0 && running < parallelism && executor.freeCapacity > 0 ? 0 : heldMs / parallelism;
  }

  /**
   * Refuses (MESH_OVERLOADED) a job whose estimate would pass its deadline, or that would make queued work it overtakes
   * pass theirs (docs/operations.md, "Overload"). The estimate follows the order takeNext serves in: each model's queue
   * first in, first out (a job in units whose unit runs now comes back at its head), and between the heads of the models
   * on one executor the earliest deadline, a tie to the model listed first. So before the job go: the runs under way
   * (half a service time each), its own model's queue, and of each other model's queue the jobs that merge ahead of it.
   * The rest of those queues it overtakes: each is checked against its own deadline with a bound on when it ends (all
   * held work and this job's over the parallel runs, plus its own work). The service time is only measured on runs, so
   * a model that has not started a job for PROBE_AFTER_MS takes one anyway when it would start at once: an estimate
   * that grew under a passing load cannot refuse everything for ever.
   */
  private admit(job: Job, state: ModelState): void {
    const now = this.now();
    const remainingMs = job.deadline - now;
    const executor = state.executor;
    const parallelism = Math.max(1, executor.parallelism ?? 1);
    const lane = this.lanes.get(executor)!;
    const ownAt = lane.indexOf(state);
    const ownMs = workMs(state, job, false);
    let heldMs = 0;
    let aheadMs = 0;
    let queued = 0;
    let running = 0;
    // The least time any overtaken job would have left at the bound on its end.
    let overtakenSlackMs = Number.POSITIVE_INFINITY;
    for (let at = 0; at < lane.length; at++) {
      const s = lane[at]!;
      const runningMs = s.inFlight * s.admitMs * 0.5;
      heldMs += runningMs;
      aheadMs += runningMs;
      queued += s.queue.length;
      running += s.inFlight;
      let pendingMs = 0;
      for (const j of s.unitJobs) pendingMs += workMs(s, j, true);
      for (const j of s.queue) pendingMs += workMs(s, j, false);
      heldMs += pendingMs;
      if (s === state) {
        aheadMs += pendingMs;
        continue;
      }
      // Merge this model's jobs with the job's own model's (then the job itself) by takeNext's rule: count those that
      // go before the job; the others it overtakes.
      const goesFirst = (other: Job, than: Job) => other.deadline < than.deadline || (other.deadline === than.deadline && at < ownAt);
      const ownLength = state.unitJobs.length + state.queue.length;
      let o = 0;
      let overtaken = false;
      for (let k = 0; k < s.unitJobs.length + s.queue.length; k++) {
        const other = pending(s, k);
        const work = workMs(s, other, k < s.unitJobs.length);
        while (!overtaken && o < ownLength && !goesFirst(other, pending(state, o))) o++;
        // Once the job goes before one of them, it goes before the rest of that queue too (first in, first out).
        overtaken ||= o === ownLength && !goesFirst(other, job);
        if (overtaken) overtakenSlackMs = Math.min(overtakenSlackMs, other.deadline - now - work * (1 - 1 / parallelism));
        else aheadMs += work;
      }
    }
    const idle = queued === 0 && running < parallelism && executor.freeCapacity > 0;
    const waitMs = idle ? 0 : aheadMs / parallelism;
    const estimatedMs = waitMs + ownMs;
    const overtakes = (heldMs + ownMs) / parallelism > overtakenSlackMs;
    if (estimatedMs <= remainingMs && !overtakes) return;
    if (idle && now - state.lastStartAt >= PROBE_AFTER_MS) return;
    const why =
      estimatedMs > remainingMs
        ? `${Math.floor(remainingMs)} ms left before its deadline`
        : 'and going first it would make queued work of another model miss its deadline';
    throw new MeshError(
      'MESH_OVERLOADED',
      `${job.model} would take about ${Math.ceil(estimatedMs)} ms here (queue ${state.queue.length}), ${why}`,
      { details: { estimatedMs: Math.ceil(estimatedMs), remainingMs: Math.floor(remainingMs) } },
    );
  }

  /** Cancels a queued job at once, or marks a running one so its result is discarded. */
  cancel(key: string, senderId: string): boolean {
    const job = this.byKey.get(key);
    if (!job || job.senderId !== senderId) return false;
    if (job.cancelled) return true;
    job.cancelled = true;
    // Units done when the cancel arrived: the one running now is not counted (docs/settlement.md).
    if (job.units) job.units.atCancel = job.units.done;
    let state = this.models.get(job.model);
    if (!state?.queue.includes(job)) {
      for (const retired of this.retired.keys()) if (retired.queue.includes(job)) state = retired;
    }
    const index = state ? state.queue.indexOf(job) : -1;
    // Queued, never started or between two units: it ends now. Running: when the run returns.
    if (index >= 0) {
      state!.queue.splice(index, 1);
      this.finish(job, new MeshError('MESH_CANCELLED', 'cancelled by sender'));
    }
    return true;
  }

  /** Drops every queued job whose deadline has passed; called by the heartbeat. */
  sweep(): void {
    const now = this.now();
    for (const state of [...this.models.values(), ...this.retired.keys()]) {
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
      state.lastStartAt = this.now();
      const units = job.units;
      if (units && units.total - units.done > 1) state.unitJobs.push(job);
      // A paid request's input hash is taken lazily, off the request's path, unless the run takes the inputs away.
      if (executor.transfersInputs) job.paid?.inputHash();
      executor.run(job.model, units ? unitInputs(job.inputs, units.done) : job.inputs, (err, result) => {
        state.inFlight--;
        const unitAt = units ? state.unitJobs.indexOf(job) : -1;
        if (unitAt >= 0) state.unitJobs.splice(unitAt, 1);
        if (err) state.failed++;
        else {
          state.served++;
          // Service time as the queue sees it: the job's run (its share of a stacked one, which clears that many jobs)
          // plus the hand-off to and from the executor.
          const ms = (result!.shareMs ?? result!.execMs) + executor.handoffMs;
          state.serviceMs += SERVICE_EWMA_ALPHA * (ms - state.serviceMs);
          noteRun(state, ms);
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
