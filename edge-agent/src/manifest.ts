/**
 * The models folder: `manifest.json` beside the `.onnx` files it names.
 *
 * {
 *   "models": [
 *     { "name": "kws", "version": "1", "file": "hello_deepa.onnx", "sha256": "<hex>",
 *       "priceMicros": 10, "notes": "openWakeWord classifier",
 *       "warmup": { "sr": { "shape": [], "fill": 16000 } } }
 *   ]
 * }
 *
 * `warmup` is optional: per input, a concrete shape for the warm-up runs (free dims default to 1)
 * and a fill value (default: small pseudo-random values), for models whose inputs need a sane value.
 */
import { createHash } from 'node:crypto';
import { createReadStream } from 'node:fs';
import { readFile } from 'node:fs/promises';
import path from 'node:path';
import { MeshError } from '@edge-mesh/protocol';
import { checkManifest } from './manifest.generated.ts';
import type { Manifest } from './manifest-schema.ts';

export type { Manifest, ManifestEntry } from './manifest-schema.ts';

export const MANIFEST_FILE = 'manifest.json';

/** Reads and validates `manifest.json` in a models folder; lists every problem in one error. */
export async function readManifest(modelsDir: string): Promise<Manifest> {
  const file = path.join(modelsDir, MANIFEST_FILE);
  let parsed: unknown;
  try {
    parsed = JSON.parse(await readFile(file, 'utf8'));
  } catch (cause) {
    throw new MeshError('MESH_CONFIG', `cannot read model manifest ${file}: ${(cause as Error).message}`, { cause });
  }
  if (!checkManifest.Check(parsed)) {
    // Describing the problems loads TypeBox (protocol's validate.ts): only a bad manifest pays for it.
    const problems = [...checkManifest.Errors(parsed)].slice(0, 10).map((e) => `${e.path || '/'}: ${e.message}`);
    throw new MeshError('MESH_CONFIG', `invalid model manifest ${file}: ${problems.join('; ')}`);
  }
  const seen = new Set<string>();
  for (const entry of parsed.models) {
    if (seen.has(entry.name)) throw new MeshError('MESH_CONFIG', `invalid model manifest ${file}: model ${entry.name} is listed twice`);
    seen.add(entry.name);
    if (path.isAbsolute(entry.file) || entry.file.split(/[\\/]/).includes('..')) {
      throw new MeshError('MESH_CONFIG', `invalid model manifest ${file}: file ${entry.file} must stay inside the models folder`);
    }
  }
  return parsed;
}

/** Streams a file through sha256 (model files can be larger than is comfortable to read at once). */
export async function sha256File(file: string): Promise<string> {
  const hash = createHash('sha256');
  for await (const chunk of createReadStream(file)) hash.update(chunk as Buffer);
  return hash.digest('hex');
}
