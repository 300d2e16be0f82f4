/**
 * Wake-word detection from raw 16 kHz audio with openWakeWord's three models (docs/pipelines.md):
 *
 *   pcm → melspectrogram model → scale and window (step) → embedding model → last 16 (step) → classifier → decide (step)
 *
 * The steps between the models follow openWakeWord's own feature code (dscripka/openWakeWord,
 * openwakeword/utils.py, `AudioFeatures._get_melspectrogram` and `_get_embeddings`; model.py feeds the
 * classifier `get_features(16)`, the last 16 embeddings):
 * - the audio is 16-bit PCM, given to the melspectrogram model as float32 of the same values;
 * - the melspectrogram is squeezed to [frames, 32] and scaled `x / 10 + 2`;
 * - windows of 76 frames start every 8 frames, only whole windows kept, batched as [W, 76, 32, 1];
 * - the embedding model gives [W, 1, 1, 96]; the classifier reads the last 16 as [1, 16, 96] and gives a
 *   score in [0, 1]; openWakeWord's default threshold for a detection is 0.5.
 * Every step is plain float32 arithmetic in a fixed order, so the same audio gives the same bits as running
 * the three models in one process.
 */
import { MeshError, type Tensor } from '@edge-mesh/protocol';
import type { Escalation, PipelineDefinition } from '../pipeline.ts';

export const WAKEWORD_SAMPLE_RATE = 16_000;
export const MEL_BINS = 32;
export const EMBEDDING_WINDOW = 76;
export const EMBEDDING_STEP = 8;
export const EMBEDDING_DIM = 96;
export const CLASSIFIER_FRAMES = 16;
/** Mel frames needed for 16 embeddings: 76 + 8 × 15. */
export const MIN_MEL_FRAMES = EMBEDDING_WINDOW + EMBEDDING_STEP * (CLASSIFIER_FRAMES - 1);
/** Audio accepted per request: up to 10 s. */
export const MAX_AUDIO_SAMPLES = 10 * WAKEWORD_SAMPLE_RATE;
/** Embedding windows of the longest audio: (1001 frames − 76) / 8 + 1. */
const MAX_WINDOWS = Math.floor((MAX_AUDIO_SAMPLES / 160 + 1 - EMBEDDING_WINDOW) / EMBEDDING_STEP) + 1;

export interface WakeWordPipelineOptions {
  name?: string;
  melModel?: string;
  embeddingModel?: string;
  classifierModel?: string;
  /** The classifier's input and output names (hey_jarvis_v0.1: `x.1` and `53`). */
  classifierInput?: string;
  classifierOutput?: string;
  /** Score at or above which `detected` is 1 (openWakeWord's default 0.5). */
  threshold?: number;
  /** Ask a bigger classifier when the score is unsure. */
  escalate?: Escalation;
}

/** int16 PCM [1, N] → float32 of the same values, as openWakeWord's `x.astype(np.float32)`. */
export function pcmToFloat(audio: Tensor): Tensor {
  if (!(audio.data instanceof Int16Array)) throw new MeshError('MESH_BAD_TENSOR', 'audio must be int16 PCM');
  return { dtype: 'float32', shape: [1, audio.data.length], data: Float32Array.from(audio.data) };
}

/**
 * The melspectrogram model's output [1, 1, F, 32] (or any shape ending in F × 32) → the embedding model's
 * batch [W, 76, 32, 1] of scaled windows.
 */
export function melWindows(mel: Tensor): Tensor {
  const data = mel.data as Float32Array;
  const frames = data.length / MEL_BINS;
  if (!Number.isInteger(frames) || frames < MIN_MEL_FRAMES) {
    throw new MeshError(
      'MESH_BAD_INPUT',
      `the audio gives ${Math.floor(frames)} mel frames; 16 embeddings need ${MIN_MEL_FRAMES} (about 2 s at 16 kHz)`,
    );
  }
  const scaled = new Float32Array(data.length);
  for (let i = 0; i < data.length; i++) scaled[i] = Math.fround(Math.fround(data[i]! / 10) + 2);
  const windows = Math.floor((frames - EMBEDDING_WINDOW) / EMBEDDING_STEP) + 1;
  const size = EMBEDDING_WINDOW * MEL_BINS;
  const out = new Float32Array(windows * size);
  for (let w = 0; w < windows; w++) {
    const from = w * EMBEDDING_STEP * MEL_BINS;
    out.set(scaled.subarray(from, from + size), w * size);
  }
  return { dtype: 'float32', shape: [windows, EMBEDDING_WINDOW, MEL_BINS, 1], data: out };
}

/** The embedding model's [W, 1, 1, 96] → the classifier's [1, 16, 96] (the last 16). */
export function lastEmbeddings(embeddings: Tensor): Tensor {
  const data = embeddings.data as Float32Array;
  const count = data.length / EMBEDDING_DIM;
  if (!Number.isInteger(count) || count < CLASSIFIER_FRAMES) {
    throw new MeshError('MESH_BAD_INPUT', `${count} embeddings; the classifier needs ${CLASSIFIER_FRAMES}`);
  }
  const from = (count - CLASSIFIER_FRAMES) * EMBEDDING_DIM;
  return { dtype: 'float32', shape: [1, CLASSIFIER_FRAMES, EMBEDDING_DIM], data: data.slice(from) };
}

/** The wake-word pipeline: int16 `audio` [1, N] in; `score` [1, 1], `detected` uint8 [1] out. */
export function wakeWordPipeline(options: WakeWordPipelineOptions = {}): PipelineDefinition {
  const {
    name = 'wakeword',
    melModel = 'oww-melspectrogram',
    embeddingModel = 'oww-embedding',
    classifierModel = 'oww-hey-jarvis',
    classifierInput = 'x.1',
    classifierOutput = '53',
    threshold = 0.5,
    escalate,
  } = options;
  return {
    name,
    version: '1',
    description: `wake word (${classifierModel}) from int16 16 kHz PCM, at least ~2 s (openWakeWord's three models)`,
    inputs: { audio: { dtype: 'int16', shape: [1, null], maxElements: MAX_AUDIO_SAMPLES } },
    outputs: ['score', 'detected'],
    stages: [
      { kind: 'step', name: 'pcm', inputs: ['audio'], outputs: ['samples'], run: (t) => ({ samples: pcmToFloat(t.audio!) }) },
      {
        kind: 'model',
        name: 'melspectrogram',
        model: melModel,
        inputs: { input: 'samples' },
        // 16 kHz, 10 ms hop: at most N / 160 + 1 frames.
        outputs: { output: { as: 'mel', spec: { dtype: 'float32', shape: [1, 1, null, MEL_BINS], maxElements: 1_001 * MEL_BINS } } },
        check: (inputs, outputs) => {
          const frames = outputs.output!.shape[2]!;
          const samples = inputs.input!.shape[1]!;
          if (frames > Math.floor(samples / 160) + 1) throw new MeshError('MESH_BAD_TENSOR', `${frames} mel frames for ${samples} samples`);
        },
      },
      { kind: 'step', name: 'windows', inputs: ['mel'], outputs: ['windows'], run: (t) => ({ windows: melWindows(t.mel!) }) },
      {
        kind: 'model',
        name: 'embedding',
        model: embeddingModel,
        inputs: { input_1: 'windows' },
        outputs: {
          conv2d_19: {
            as: 'embeddings',
            spec: { dtype: 'float32', shape: [null, 1, 1, EMBEDDING_DIM], maxElements: MAX_WINDOWS * EMBEDDING_DIM },
          },
        },
        check: (inputs, outputs) => {
          // One embedding per window: fewer or more would shift which 16 the classifier reads.
          if (outputs.conv2d_19!.shape[0] !== inputs.input_1!.shape[0]) {
            throw new MeshError('MESH_BAD_TENSOR', `${outputs.conv2d_19!.shape[0]} embeddings for ${inputs.input_1!.shape[0]} windows`);
          }
        },
      },
      {
        kind: 'step',
        name: 'last-16',
        inputs: ['embeddings'],
        outputs: ['features'],
        run: (t) => ({ features: lastEmbeddings(t.embeddings!) }),
      },
      {
        kind: 'model',
        name: 'classifier',
        model: classifierModel,
        inputs: { [classifierInput]: 'features' },
        outputs: { [classifierOutput]: { as: 'score', spec: { dtype: 'float32', shape: [1, 1] } } },
        check: (_inputs, outputs) => {
          const score = (outputs[classifierOutput]!.data as Float32Array)[0]!;
          if (!(score >= 0 && score <= 1)) throw new MeshError('MESH_BAD_TENSOR', `score ${score} is outside [0, 1]`);
        },
        ...(escalate ? { escalate } : {}),
      },
      {
        kind: 'step',
        name: 'decide',
        inputs: ['score'],
        outputs: ['detected'],
        run: (t) => ({
          detected: { dtype: 'uint8', shape: [1], data: Uint8Array.of((t.score!.data as Float32Array)[0]! >= threshold ? 1 : 0) },
        }),
      },
    ],
  };
}
