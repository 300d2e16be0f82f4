/**
 * `mesh.pipeline(name, inputs, { deadlineMs })` (docs/pipelines.md): the pipelines this client knows, each
 * model stage sent through the SDK's own `infer`, so it is routed, paid and receipted like any request.
 */
import { type PipelineDefinition, type PipelineResult, runPipeline, validatePipeline, wakeWordPipeline } from '@edge-mesh/client';
import { MeshError, type Tensor } from '@edge-mesh/protocol';

export interface PipelineOptions {
  /** Time budget from now for every stage together, ms (default: the client's default deadline). */
  deadlineMs?: number;
  /** Return every stage's tensors too (`tensors`). */
  intermediates?: boolean;
}

export type PipelineRunResult = PipelineResult;

type Infer = (
  model: string,
  inputs: Record<string, Tensor>,
  options: { deadlineMs: number; excludeAgents?: ReadonlySet<string>; checkOutputs?: (outputs: Record<string, Tensor>) => void },
) => Promise<{ outputs: Record<string, Tensor>; agentId: string; requestId: string; timings: { execMs: number; queueMs: number } }>;

export function createPipelines(extra: readonly PipelineDefinition[], infer: Infer, defaultDeadlineMs: number) {
  const byName = new Map<string, PipelineDefinition>();
  for (const def of [wakeWordPipeline(), ...extra]) byName.set(def.name, validatePipeline(def));
  return {
    list: (): PipelineDefinition[] => [...byName.values()],
    run(
      name: string,
      inputs: Record<string, Tensor>,
      { deadlineMs = defaultDeadlineMs, intermediates = false }: PipelineOptions = {},
    ): Promise<PipelineResult> {
      const def = byName.get(name);
      if (!def) {
        return Promise.reject(
          new MeshError('MESH_UNKNOWN_MODEL', `no pipeline ${name}; known: ${[...byName.keys()].join(', ')}`, {
            details: { pipeline: name },
          }),
        );
      }
      return runPipeline(def, inputs, {
        deadlineMs,
        intermediates,
        infer: async (model, stageInputs, { check, ...options }) => {
          // The stage's check runs before the answer is accepted, so outputs it refuses are not paid.
          const r = await infer(model, stageInputs, { ...options, ...(check ? { checkOutputs: check } : {}) });
          return { outputs: r.outputs, agentId: r.agentId, requestId: r.requestId, execMs: r.timings.execMs, queueMs: r.timings.queueMs };
        },
      });
    },
  };
}
