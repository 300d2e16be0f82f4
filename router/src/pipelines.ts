/**
 * Pipelines behind the router's KServe API (docs/pipelines.md): `POST /v2/models/{pipeline}/infer` runs a
 * pipeline as Triton runs an ensemble model, each model stage forwarded through this router's request engine
 * (its own selection, retries, hedges and deadline), the steps between them here. Metadata, readiness and the
 * repository index show a pipeline as a model whose inputs and outputs are the pipeline's.
 *
 *   startRouter({ ..., pipelines: [wakeWordPipeline(), ocrPipeline({ dictionary })] })
 */
import { createHash } from 'node:crypto';
import { checkPipelineInputs, type PipelineDefinition, runPipeline, validatePipeline } from '@edge-mesh/client';
import type { ModelInfo, Tensor } from '@edge-mesh/protocol';
import type { RouterInferResult, RouterPipelines } from './handle.ts';

type StageInfer = (
  model: string,
  inputs: Record<string, Tensor>,
  options: { deadlineMs: number; excludeAgents?: ReadonlySet<string> },
) => Promise<RouterInferResult>;

const modelsOf = (def: PipelineDefinition): string[] => def.stages.flatMap((s) => (s.kind === 'model' ? [s.model] : []));

export function createRouterPipelines(
  definitions: readonly PipelineDefinition[],
  infer: StageInfer,
  served: () => readonly ModelInfo[],
): RouterPipelines {
  const byName = new Map(definitions.map((d) => [d.name, validatePipeline(d)] as const));
  const hashes = new Map(
    [...byName.values()].map((d) => [
      d.name,
      createHash('sha256')
        .update(
          JSON.stringify({
            name: d.name,
            version: d.version,
            stages: d.stages.map((s) => [s.kind, s.name, s.kind === 'model' ? s.model : '']),
          }),
        )
        .digest('hex'),
    ]),
  );
  return {
    has: (name) => byName.has(name),
    check: (name, inputs) => void checkPipelineInputs(byName.get(name)!, inputs),
    names: () => [...byName.keys()],
    ready(name) {
      const def = byName.get(name);
      if (!def) return false;
      const live = new Set(served().map((m) => m.name));
      return modelsOf(def).every((m) => live.has(m));
    },
    info(name) {
      const def = byName.get(name);
      if (!def) return undefined;
      const models = served();
      const stage = (m: string) => models.find((x) => x.name === m);
      let priceMicros = 0;
      let latencyMs = 0;
      for (const m of modelsOf(def)) {
        priceMicros += stage(m)?.priceMicros ?? 0;
        latencyMs += stage(m)?.latencyMs ?? 0;
      }
      const output = (t: string) => {
        for (const s of def.stages) {
          if (s.kind !== 'model') continue;
          const o = Object.values(s.outputs).find((x) => x.as === t);
          if (o) return { dtype: o.spec.dtype, shape: o.spec.shape.map((d) => d ?? '') };
        }
        return {
          dtype: t === 'confidence' || t === 'score' ? 'float32' : t === 'boxes' ? 'int32' : 'uint8',
          shape: [''] as (number | string)[],
        };
      };
      return {
        name,
        version: def.version,
        sha256: hashes.get(name)!,
        priceMicros,
        latencyMs,
        inputs: Object.entries(def.inputs).map(([n, spec]) => ({ name: n, dtype: spec.dtype, shape: spec.shape.map((d) => d ?? '') })),
        outputs: def.outputs.map((n) => ({ name: n, ...output(n) })),
        notes: `pipeline of ${modelsOf(def).join(', ')}${def.description ? `: ${def.description}` : ''}`.slice(0, 1024),
      };
    },
    async run(name, inputs, deadlineMs) {
      const def = byName.get(name)!;
      const startedAt = performance.now();
      let attempts = 0;
      let hedged = false;
      let queueMs = 0;
      let execMs = 0;
      const tried: string[] = [];
      const result = await runPipeline(def, inputs, {
        deadlineMs,
        infer: async (model, stageInputs, options) => {
          const r = await infer(model, stageInputs, options);
          attempts += r.attempts;
          hedged ||= r.hedged;
          queueMs += r.timings.queueMs;
          execMs += r.timings.execMs;
          tried.push(...r.tried);
          return { ...r, execMs: r.timings.execMs, queueMs: r.timings.queueMs };
        },
      });
      const last = result.stages.at(-1);
      return {
        requestId: last?.requestId ?? '',
        model: name,
        agentId: result.stages.map((s) => s.agentId).join(','),
        outputs: result.outputs,
        tried,
        attempts,
        hedged,
        timings: { totalMs: performance.now() - startedAt, queueMs, execMs, predictedMs: 0 },
        stages: result.stages.map(({ stage, model, agentId, requestId }) => ({ stage, model, agentId, requestId })),
        pipeline: result,
      };
    },
  };
}
