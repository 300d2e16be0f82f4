/**
 * A simulation worker thread: takes (world config, policy names) tasks and answers each policy's
 * figures, so the benchmark runs seeds on both cores. Also exports `runTask` for a single thread.
 */
import { parentPort } from 'node:worker_threads';
import { runSim, type SimResult } from './engine.ts';
import { OURS } from './ours.ts';
import { BASELINES } from './policies.ts';
import type { PolicyFactory } from './types.ts';
import { buildWorld, type SimConfig } from './world.ts';

export const FACTORIES: Record<string, PolicyFactory> = { ...BASELINES, ...OURS };

export interface Task {
  id: number;
  cfg: Partial<SimConfig>;
  policies: string[];
}

export interface TaskResult {
  id: number;
  offeredLoad: number;
  results: SimResult[];
}

export function runTask(task: Task): TaskResult {
  const world = buildWorld(task.cfg);
  return {
    id: task.id,
    offeredLoad: world.offeredLoad,
    results: task.policies.map((p) => {
      const make = FACTORIES[p];
      if (!make) throw new Error(`unknown policy ${p}`);
      return runSim(world, make);
    }),
  };
}

parentPort?.on('message', (task: Task) => {
  parentPort!.postMessage(runTask(task));
});
