/**
 * What the scheduler hands jobs to. Each model runs on one executor, chosen when the agent starts
 * (executors.ts): the worker pool (pool.ts) or, for a tiny fixed-shape model, the main thread
 * itself (inline.ts). The scheduler keeps one earliest-deadline-first choice per executor.
 */
import type { MeshError, Tensor } from '@edge-mesh/protocol';

export interface JobResult {
  outputs: Record<string, Tensor>;
  /** Time onnxruntime took for the run, as the executor measured it: what the job waited for its outputs. */
  execMs: number;
  /**
   * When the run carried other jobs too (a stacked run, inline.ts): this job's share of it, execMs over the jobs in
   * the run. What the job cost the executor, so what the scheduler's service time and queue estimates count.
   */
  shareMs?: number;
}

export type JobCallback = (err: MeshError | undefined, result?: JobResult) => void;

export interface Executor {
  /** Jobs it takes now; the scheduler hands it one only while this is above zero. */
  readonly freeCapacity: number;
  /** Runs one job; `callback` is called once with the result or a coded error. Input buffers may be transferred. */
  run(model: string, inputs: Record<string, Tensor>, callback: JobCallback): void;
  /**
   * Whether `run` takes the input buffers away (the pool transfers them to a worker): what is still to be read from
   * them, the paid request's input hash, is read before (scheduler.ts, `dispatch`).
   */
  readonly transfersInputs?: boolean;
  /** Jobs it runs at the same time (the pool's workers; 1 inline); absent: 1. The scheduler's admission divides queued work by it. */
  readonly parallelism?: number;
  /** Time a job spends outside the runtime between dispatch and result (EWMA, ms). */
  readonly handoffMs: number;
  /** Set by the scheduler: called whenever the executor can take a job again. */
  onIdle: () => void;
}

/** What an executor that stacks jobs (inline.ts) counts: AgentCounters.stacked. */
export interface StackingCounters {
  /** Stacked runs made. */
  runs: number;
  /** Requests they carried. */
  requests: number;
  /** Stacked runs that failed and whose requests were run again one by one. */
  fallbacks: number;
}

export const newStackingCounters = (): StackingCounters => ({ runs: 0, requests: 0, fallbacks: 0 });
