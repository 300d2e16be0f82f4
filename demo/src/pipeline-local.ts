/**
 * A pipeline's stages run in this process with onnxruntime-node, no mesh: the baseline the `pipeline`
 * benchmark compares the mesh with, and what tests check the mesh's answers against.
 *
 *   const local = await localStages(modelsDir, ['oww-melspectrogram', 'oww-embedding', 'oww-hey-jarvis']);
 *   const result = await runPipeline(wakeWordPipeline(), { audio }, { deadlineMs: 5_000, infer: local.infer });
 *   await local.close();
 */
import path from 'node:path';
import { readManifest } from '@edge-mesh/agent';
import type { StageInfer } from '@edge-mesh/client';
import { MeshError, type Tensor } from '@edge-mesh/protocol';
import type { InferenceSession } from 'onnxruntime-node';

export interface LocalStages {
  infer: StageInfer;
  /** One model run, inputs and outputs as mesh tensors. */
  run(model: string, inputs: Record<string, Tensor>): Promise<Record<string, Tensor>>;
  close(): Promise<void>;
}

/** Sessions for `models` (names in the folder's manifest), one thread each, as an agent's worker holds them. */
export async function localStages(modelsDir: string, models: readonly string[]): Promise<LocalStages> {
  const ort = await import('onnxruntime-node');
  const manifest = await readManifest(modelsDir);
  const sessions = new Map<string, InferenceSession>();
  for (const name of models) {
    const entry = manifest.models.find((m) => m.name === name);
    if (!entry) throw new MeshError('MESH_UNKNOWN_MODEL', `model ${name} is not in ${modelsDir}`);
    sessions.set(name, await ort.InferenceSession.create(path.join(modelsDir, entry.file), { intraOpNumThreads: 1, interOpNumThreads: 1 }));
  }
  let requests = 0;
  const run = async (model: string, inputs: Record<string, Tensor>) => {
    const session = sessions.get(model);
    if (!session) throw new MeshError('MESH_UNKNOWN_MODEL', `no local session for ${model}`);
    const feeds: Record<string, InstanceType<typeof ort.Tensor>> = {};
    for (const [name, t] of Object.entries(inputs)) feeds[name] = new ort.Tensor(t.dtype as 'float32', t.data as Float32Array, t.shape);
    const out = await session.run(feeds);
    const outputs: Record<string, Tensor> = {};
    for (const [name, t] of Object.entries(out))
      outputs[name] = { dtype: t.type as Tensor['dtype'], shape: [...t.dims], data: t.data as Float32Array };
    return outputs;
  };
  return {
    run,
    infer: async (model, inputs) => ({ outputs: await run(model, inputs), agentId: 'local', requestId: `local-${++requests}` }),
    async close() {
      for (const s of sessions.values()) await s.release();
    },
  };
}
