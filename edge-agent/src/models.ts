/**
 * The models an agent serves: which execution providers to try, each file checked against its
 * manifest hash, the status's description of each model once loaded, and requests' inputs checked
 * against what the model takes.
 */
import { existsSync } from 'node:fs';
import { createRequire } from 'node:module';
import os from 'node:os';
import path from 'node:path';
import type { MeshLogger } from '@edge-mesh/client';
import { type Hardware, MeshError, type ModelInfo, type Tensor } from '@edge-mesh/protocol';
import { type ManifestEntry, sha256File } from './manifest.ts';
import type { LoadedModel } from './worker-protocol.ts';

/** What the status says about the device. */
export function hardwareSummary(): Hardware {
  const cpus = os.cpus();
  return {
    platform: os.platform(),
    arch: os.arch(),
    cpus: cpus.length,
    cpuModel: (cpus[0]?.model ?? 'unknown').slice(0, 128),
    memoryMb: Math.round(os.totalmem() / 2 ** 20),
  };
}

/**
 * The execution providers to try, best first. onnxruntime-node loads CUDA and TensorRT from
 * provider libraries beside its binding; the npm build for linux-x64 lists them but ships none,
 * and the linux-arm64 build is CPU only, so look for the files instead of failing noisily.
 */
export function availableProviders(requested: 'auto' | string[], logger: MeshLogger): string[] {
  if (requested !== 'auto') return requested.includes('cpu') ? requested : [...requested, 'cpu'];
  const require = createRequire(import.meta.url);
  const bindingDir = path.join(path.dirname(require.resolve('onnxruntime-node')), '..', 'bin', 'napi-v6', process.platform, process.arch);
  const found: string[] = [];
  for (const provider of ['tensorrt', 'cuda']) {
    if (existsSync(path.join(bindingDir, `libonnxruntime_providers_${provider}.so`))) found.push(provider);
  }
  if (found.length === 0) logger.info({ bindingDir }, 'no CUDA or TensorRT provider in this onnxruntime build; using CPU');
  return [...found, 'cpu'];
}

/** Checks each model file against its manifest hash; mismatching or missing files are refused. */
export async function verifyModels(modelsDir: string, entries: ManifestEntry[], logger: MeshLogger): Promise<ManifestEntry[]> {
  const accepted: ManifestEntry[] = [];
  for (const entry of entries) {
    const file = path.join(modelsDir, entry.file);
    let actual: string;
    try {
      actual = await sha256File(file);
    } catch (err) {
      logger.error({ model: entry.name, file, err: (err as Error).message }, 'model file unreadable; refusing the model');
      continue;
    }
    if (actual !== entry.sha256) {
      logger.error({ model: entry.name, file, expected: entry.sha256, actual }, 'model file does not match its sha256; refusing the model');
      continue;
    }
    accepted.push(entry);
  }
  if (accepted.length === 0) {
    throw new MeshError('MESH_MODEL_INTEGRITY', `no model in ${modelsDir} passed its sha256 check`, { details: { modelsDir } });
  }
  return accepted;
}

/** Input names, dtypes and fixed dims must match the model's own metadata; throws MESH_BAD_INPUT. */
export function checkInputs(model: LoadedModel, inputs: Record<string, Tensor>): void {
  const names = Object.keys(inputs);
  for (const info of model.inputs) {
    const tensor = inputs[info.name];
    if (!tensor) throw new MeshError('MESH_BAD_INPUT', `model ${model.name} needs input ${info.name}; got ${names.join(', ') || 'none'}`);
    if (tensor.dtype !== info.dtype) {
      throw new MeshError('MESH_BAD_INPUT', `input ${info.name} of ${model.name} must be ${info.dtype}, got ${tensor.dtype}`);
    }
    if (tensor.shape.length !== info.shape.length) {
      throw new MeshError(
        'MESH_BAD_INPUT',
        `input ${info.name} of ${model.name} must have rank ${info.shape.length}, got [${tensor.shape.join(',')}]`,
      );
    }
    info.shape.forEach((dim, i) => {
      if (typeof dim === 'number' && tensor.shape[i] !== dim) {
        throw new MeshError(
          'MESH_BAD_INPUT',
          `input ${info.name} of ${model.name} must have dim ${i} = ${dim}, got [${tensor.shape.join(',')}]`,
        );
      }
    });
  }
  if (names.length !== model.inputs.length) {
    const extra = names.filter((n) => !model.inputs.some((i) => i.name === n));
    throw new MeshError('MESH_BAD_INPUT', `model ${model.name} has no input named ${extra.join(', ')}`);
  }
}

/** The status's entry for each model: the manifest's facts and what loading it measured. */
export function describeModels(entries: ManifestEntry[], loaded: ReadonlyMap<string, LoadedModel>): ModelInfo[] {
  return entries.map((entry) => {
    const m = loaded.get(entry.name);
    if (!m) throw new MeshError('MESH_INTERNAL', `model ${entry.name} passed its checks but no worker loaded it`);
    return {
      name: entry.name,
      version: entry.version,
      sha256: entry.sha256,
      priceMicros: entry.priceMicros,
      latencyMs: Math.round(m.latencyMs * 1000) / 1000,
      inputs: m.inputs,
      outputs: m.outputs,
      ...(entry.notes ? { notes: entry.notes } : {}),
    };
  });
}
