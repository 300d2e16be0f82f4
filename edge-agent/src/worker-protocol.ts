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
  /** `loadNice`: how much to raise the worker thread's nice value while it loads and warms its models (0: not at all). */
  | { type: 'init'; models: WorkerModelSpec[]; intraOpThreads: number; warmupRuns: number; loadNice: number }
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

/**
 * The worker thread's nice value (os.getPriority) before, while and after it loaded its models; `after` equals
 * `before` unless the system refused to raise the priority again (docs/agent.md, "Starting without starving the neighbours").
 */
export interface LoadPriority {
  before: number;
  during: number;
  after: number;
}

export type FromWorker =
  | { type: 'ready'; models: LoadedModel[]; priority: LoadPriority | undefined }
  | { type: 'fatal'; message: string }
  | { type: 'done'; job: number; outputs: Record<string, Tensor>; execMs: number }
  | { type: 'failed'; job: number; message: string; execMs: number };
