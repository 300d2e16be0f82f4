/** Messages between the agent's event loop and its inference worker threads. */
import type { Tensor, TensorInfo } from '@edge-mesh/protocol';
import type { ManifestEntry } from './manifest.ts';

export interface WorkerModelSpec {
  name: string;
  path: string;
  providers: string[];
  warmup: ManifestEntry['warmup'];
}

export type ToWorker =
  | { type: 'init'; models: WorkerModelSpec[]; intraOpThreads: number; warmupRuns: number }
  | { type: 'run'; jobs: RunJob[] }
  /** Exit once the job running (if any) is done; jobs still waiting are dropped. */
  | { type: 'close' };

export interface RunJob {
  job: number;
  model: string;
  inputs: Record<string, Tensor>;
}

export interface LoadedModel {
  name: string;
  inputs: TensorInfo[];
  outputs: TensorInfo[];
  /** Execution provider the session was created with. */
  provider: string;
  /** Median execution time of the warm-up runs. */
  latencyMs: number;
}

export type FromWorker =
  | { type: 'ready'; models: LoadedModel[] }
  | { type: 'fatal'; message: string }
  | { type: 'done'; job: number; outputs: Record<string, Tensor>; execMs: number }
  | { type: 'failed'; job: number; message: string; execMs: number };
