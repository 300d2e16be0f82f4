/**
 * Plausible, deterministic inputs for the catalog models (see `models.ts`), for smoke tests,
 * warm-ups with real-looking data and the load generator.
 *
 *   const inputs = sampleInputs('ocr-det', 7); // { x: { dtype: 'float32', shape: [1,3,320,320], data } }
 *
 * Same (model, seed) gives the same values. Results are cached per (model, seed) and every call
 * returns fresh typed arrays, so callers may mutate or transfer them.
 */

import { mulberry32 } from '@edge-mesh/client';
import { MeshError, type Tensor } from '@edge-mesh/protocol';

export const SAMPLE_MODELS = ['kws', 'vad', 'ocr-cls', 'ocr-det'] as const;
export type SampleModel = (typeof SAMPLE_MODELS)[number];

export function isSampleModel(model: string): model is SampleModel {
  return (SAMPLE_MODELS as readonly string[]).includes(model);
}

// ---------------------------------------------------------------------------------------------
// Seeded randomness

export { mulberry32 };

interface Rng {
  next: () => number;
  range: (lo: number, hi: number) => number;
  int: (lo: number, hiInclusive: number) => number;
  gauss: () => number;
}

function makeRng(model: string, seed: number): Rng {
  // FNV-1a of the model name, mixed with the seed, so models with the same seed differ.
  let h = 0x811c9dc5;
  for (let i = 0; i < model.length; i++) h = Math.imul(h ^ model.charCodeAt(i), 0x01000193);
  const next = mulberry32((h ^ Math.imul(seed | 0, 0x9e3779b1)) >>> 0);
  let spare: number | null = null;
  const gauss = (): number => {
    if (spare !== null) {
      const s = spare;
      spare = null;
      return s;
    }
    const u = Math.max(next(), 1e-12);
    const v = next();
    const r = Math.sqrt(-2 * Math.log(u));
    spare = r * Math.sin(2 * Math.PI * v);
    return r * Math.cos(2 * Math.PI * v);
  };
  return {
    next,
    range: (lo, hi) => lo + (hi - lo) * next(),
    int: (lo, hi) => lo + Math.floor(next() * (hi - lo + 1)),
    gauss,
  };
}

// ---------------------------------------------------------------------------------------------
// kws: openWakeWord speech embeddings

export const KWS_INPUT = 'onnx::Flatten_0';
const KWS_FRAMES = 25;
const KWS_DIM = 96;

/**
 * 25 frames × 96-d embeddings as Google's speech_embedding model (openWakeWord's feature
 * extractor) produces them: a linear output layer whose values sit around 0 with a spread of
 * about 15-20 across dimensions (roughly −50…50). Each dimension has its own offset and scale,
 * a slow AR(1) drift over time (frames are 80 ms apart and overlap heavily), and a smooth
 * "word" bump in the middle frames so the window looks like an utterance rather than silence.
 */
function kwsSample(rng: Rng): Record<string, Tensor> {
  const data = new Float32Array(KWS_FRAMES * KWS_DIM);
  const wordCenter = rng.range(9, 16);
  const wordWidth = rng.range(3, 6);
  for (let d = 0; d < KWS_DIM; d++) {
    const offset = rng.gauss() * 12;
    const scale = rng.range(3, 9);
    const wordShift = rng.gauss() * 10;
    const rho = rng.range(0.75, 0.92);
    let ar = rng.gauss();
    for (let t = 0; t < KWS_FRAMES; t++) {
      ar = rho * ar + Math.sqrt(1 - rho * rho) * rng.gauss();
      const z = (t - wordCenter) / wordWidth;
      const bump = Math.exp(-0.5 * z * z);
      const v = offset + scale * ar + wordShift * bump;
      data[t * KWS_DIM + d] = Math.max(-60, Math.min(60, v));
    }
  }
  return { [KWS_INPUT]: { dtype: 'float32', shape: [1, KWS_FRAMES, KWS_DIM], data } };
}

// ---------------------------------------------------------------------------------------------
// vad: 32 ms of 16 kHz audio

const VAD_SAMPLES = 512;
const VAD_RATE = 16000;

/**
 * A voiced, vowel-like chunk: a glottal-ish harmonic series (f0 90-240 Hz with slight vibrato)
 * shaped by three formant resonances, an amplitude envelope, plus breath noise. Peaks stay
 * well inside [-1, 1].
 */
function vadSample(rng: Rng): Record<string, Tensor> {
  const input = new Float32Array(VAD_SAMPLES);
  const f0 = rng.range(90, 240);
  const vibratoHz = rng.range(4, 7);
  const vibrato = rng.range(0.005, 0.02);
  const formants = [
    { f: rng.range(500, 850), bw: 90 },
    { f: rng.range(1000, 1800), bw: 120 },
    { f: rng.range(2300, 3000), bw: 180 },
  ];
  const harmonics: { k: number; amp: number; phase: number }[] = [];
  for (let k = 1; k * f0 < 4000; k++) {
    const fk = k * f0;
    let gain = 0;
    for (const { f, bw } of formants) gain += 1 / (1 + ((fk - f) / bw) ** 2);
    harmonics.push({ k, amp: (gain + 0.05) / Math.sqrt(k), phase: rng.range(0, 2 * Math.PI) });
  }
  const norm = harmonics.reduce((s, h) => s + h.amp, 0);
  const peak = rng.range(0.25, 0.6);
  const noise = rng.range(0.005, 0.02);
  const onset = rng.range(0, 0.4);
  let phase = 0;
  for (let i = 0; i < VAD_SAMPLES; i++) {
    const t = i / VAD_RATE;
    phase += (2 * Math.PI * f0 * (1 + vibrato * Math.sin(2 * Math.PI * vibratoHz * t))) / VAD_RATE;
    let v = 0;
    for (const h of harmonics) v += h.amp * Math.sin(h.k * phase + h.phase);
    const x = i / VAD_SAMPLES;
    const env = Math.min(1, 0.3 + Math.max(0, x - onset) * 4) * (0.85 + 0.15 * Math.sin(2 * Math.PI * 20 * t));
    const s = (peak * env * v) / norm + noise * rng.gauss();
    input[i] = Math.max(-1, Math.min(1, s));
  }
  return {
    input: { dtype: 'float32', shape: [1, VAD_SAMPLES], data: input },
    state: { dtype: 'float32', shape: [2, 1, 128], data: new Float32Array(2 * 128) },
    sr: { dtype: 'int64', shape: [], data: BigInt64Array.of(BigInt(VAD_RATE)) },
  };
}

// ---------------------------------------------------------------------------------------------
// Synthetic text images (grayscale, 0 = black, 255 = white)

interface Gray {
  w: number;
  h: number;
  px: Float32Array;
}

function fillRect(img: Gray, x0: number, y0: number, x1: number, y1: number, value: number): void {
  const xa = Math.max(0, Math.floor(x0));
  const ya = Math.max(0, Math.floor(y0));
  const xb = Math.min(img.w, Math.ceil(x1));
  const yb = Math.min(img.h, Math.ceil(y1));
  for (let y = ya; y < yb; y++) img.px.fill(value, y * img.w + xa, y * img.w + Math.max(xa, xb));
}

/** A stroke of thickness `th`: squares stamped along the segment. */
function stroke(img: Gray, x0: number, y0: number, x1: number, y1: number, th: number, value: number): void {
  const steps = Math.max(1, Math.ceil(Math.hypot(x1 - x0, y1 - y0)));
  const r = th / 2;
  for (let s = 0; s <= steps; s++) {
    const x = x0 + ((x1 - x0) * s) / steps;
    const y = y0 + ((y1 - y0) * s) / steps;
    fillRect(img, x - r, y - r, x + r, y + r, value);
  }
}

/**
 * One glyph in the box (x, y, w, h): a few strokes chosen like the parts of CJK characters and
 * Latin letters (verticals, horizontals, diagonals, a frame), so the line has the dense,
 * high-contrast texture text detectors respond to.
 */
function glyph(img: Gray, rng: Rng, x: number, y: number, w: number, h: number, th: number, ink: number): void {
  const parts = rng.int(2, 4);
  for (let p = 0; p < parts; p++) {
    switch (rng.int(0, 5)) {
      case 0: {
        const gx = x + rng.range(0.15, 0.85) * w;
        stroke(img, gx, y + rng.range(0, 0.3) * h, gx, y + rng.range(0.7, 1) * h, th, ink);
        break;
      }
      case 1: {
        const gy = y + rng.range(0.1, 0.9) * h;
        stroke(img, x + rng.range(0, 0.3) * w, gy, x + rng.range(0.7, 1) * w, gy, th, ink);
        break;
      }
      case 2:
        stroke(img, x + rng.range(0, 0.3) * w, y + h, x + rng.range(0.6, 1) * w, y, th, ink);
        break;
      case 3:
        stroke(img, x + rng.range(0, 0.3) * w, y, x + rng.range(0.6, 1) * w, y + h, th, ink);
        break;
      case 4: {
        const x0 = x + 0.1 * w;
        const x1 = x + 0.9 * w;
        const y0 = y + rng.range(0, 0.4) * h;
        const y1 = y + h;
        stroke(img, x0, y0, x1, y0, th, ink);
        stroke(img, x0, y1, x1, y1, th, ink);
        stroke(img, x0, y0, x0, y1, th, ink);
        stroke(img, x1, y0, x1, y1, th, ink);
        break;
      }
      default: {
        const gy = y + h * rng.range(0.35, 0.65);
        stroke(img, x, gy, x + w, gy, th, ink);
        stroke(img, x + w / 2, y, x + w / 2, y + h, th, ink);
      }
    }
  }
}

/** A line of words starting at (x, y) with glyph height `h`; returns the x where it ended. */
function textLine(img: Gray, rng: Rng, x: number, y: number, maxX: number, h: number, ink: number): number {
  const th = Math.max(1.5, h / 7);
  let cx = x;
  while (cx < maxX) {
    const letters = rng.int(2, 7);
    for (let i = 0; i < letters; i++) {
      const gw = h * rng.range(0.55, 0.95);
      if (cx + gw > maxX) return cx;
      glyph(img, rng, cx, y, gw, h, th, ink + rng.range(-15, 15));
      cx += gw + h * rng.range(0.12, 0.25);
    }
    cx += h * rng.range(0.5, 0.9);
  }
  return cx;
}

/** Light paper: a soft gradient plus a little noise. */
function paper(w: number, h: number, rng: Rng): Gray {
  const px = new Float32Array(w * h);
  const base = rng.range(225, 245);
  const gx = rng.range(-10, 10) / w;
  const gy = rng.range(-10, 10) / h;
  for (let y = 0; y < h; y++) {
    for (let x = 0; x < w; x++) px[y * w + x] = base + gx * x + gy * y + 4 * (rng.next() - 0.5);
  }
  return { w, h, px };
}

// ---------------------------------------------------------------------------------------------
// ocr-cls: one text line, 48×192, PaddleOCR cls normalization

const CLS_H = 48;
const CLS_W = 192;

function ocrClsSample(rng: Rng): Record<string, Tensor> {
  const img = paper(CLS_W, CLS_H, rng);
  const textW = Math.round(CLS_W * rng.range(0.75, 1));
  const gh = rng.range(24, 32);
  const ink = rng.range(20, 60);
  textLine(img, rng, rng.range(2, 6), (CLS_H - gh) / 2, textW - 2, gh, ink);
  // PaddleOCR resizes the line to height 48 keeping its aspect, then pads the rest with zeros
  // after normalizing: (x / 255 - 0.5) / 0.5 in [-1, 1].
  const plane = CLS_H * CLS_W;
  const data = new Float32Array(3 * plane);
  const tint = [rng.range(-6, 6), rng.range(-6, 6), rng.range(-6, 6)];
  for (let c = 0; c < 3; c++) {
    const off = c * plane;
    const t = tint[c] ?? 0;
    for (let y = 0; y < CLS_H; y++) {
      for (let x = 0; x < textW; x++) {
        const v = Math.max(0, Math.min(255, (img.px[y * CLS_W + x] ?? 255) + t));
        data[off + y * CLS_W + x] = (v / 255 - 0.5) / 0.5;
      }
    }
  }
  return { x: { dtype: 'float32', shape: [1, 3, CLS_H, CLS_W], data } };
}

// ---------------------------------------------------------------------------------------------
// ocr-det: a 320×320 document, ImageNet normalization as PaddleOCR det does

const DET_SIZE = 320;
const IMAGENET_MEAN = [0.485, 0.456, 0.406] as const;
const IMAGENET_STD = [0.229, 0.224, 0.225] as const;

/** Text regions drawn on the last generated document (x0, y0, x1, y1), for tests. */
export interface TextBox {
  x0: number;
  y0: number;
  x1: number;
  y1: number;
}

function ocrDetDocument(rng: Rng): { img: Gray; boxes: TextBox[] } {
  const img = paper(DET_SIZE, DET_SIZE, rng);
  const boxes: TextBox[] = [];
  const margin = rng.int(14, 28);
  let y = margin + rng.int(0, 10);
  // A heading, then paragraphs of body text.
  let first = true;
  while (y < DET_SIZE - margin - 12) {
    const h = first ? rng.range(18, 24) : rng.range(11, 16);
    if (y + h > DET_SIZE - margin) break;
    const x0 = margin + (first ? 0 : rng.int(0, 1) * rng.int(0, 20));
    const maxX = first ? DET_SIZE * rng.range(0.5, 0.75) : DET_SIZE - margin - rng.int(0, 1) * rng.int(0, 90);
    const ink = rng.range(15, 60);
    const x1 = textLine(img, rng, x0, y, maxX, h, ink);
    if (x1 > x0 + h) boxes.push({ x0, y0: y, x1, y1: y + h });
    y += h * (first ? 2.2 : rng.range(1.6, 2.1));
    if (!first && rng.next() < 0.2) y += h; // paragraph break
    first = false;
  }
  return { img, boxes };
}

function ocrDetSample(rng: Rng): { tensors: Record<string, Tensor>; boxes: TextBox[] } {
  const { img, boxes } = ocrDetDocument(rng);
  const plane = DET_SIZE * DET_SIZE;
  const data = new Float32Array(3 * plane);
  for (let c = 0; c < 3; c++) {
    const mean = IMAGENET_MEAN[c] ?? 0;
    const invStd = 1 / (IMAGENET_STD[c] ?? 1);
    const off = c * plane;
    for (let i = 0; i < plane; i++) {
      const v = img.px[i] ?? 255;
      data[off + i] = ((v < 0 ? 0 : Math.min(v, 255)) / 255 - mean) * invStd;
    }
  }
  return { tensors: { x: { dtype: 'float32', shape: [1, 3, DET_SIZE, DET_SIZE], data } }, boxes };
}

// ---------------------------------------------------------------------------------------------
// Public API with a small per-(model, seed) cache

interface CachedSample {
  tensors: Record<string, Tensor>;
  boxes: TextBox[];
}

const CACHE_LIMIT = 32;
const cache = new Map<string, CachedSample>();

function generate(model: SampleModel, seed: number): CachedSample {
  const rng = makeRng(model, seed);
  switch (model) {
    case 'kws':
      return { tensors: kwsSample(rng), boxes: [] };
    case 'vad':
      return { tensors: vadSample(rng), boxes: [] };
    case 'ocr-cls':
      return { tensors: ocrClsSample(rng), boxes: [] };
    case 'ocr-det':
      return ocrDetSample(rng);
  }
}

function cached(model: string, seed: number): CachedSample {
  if (!isSampleModel(model)) {
    throw new MeshError('MESH_UNKNOWN_MODEL', `no sample inputs for model ${model}; known: ${SAMPLE_MODELS.join(', ')}`);
  }
  if (!Number.isFinite(seed)) throw new MeshError('MESH_BAD_REQUEST', `seed must be a finite number, got ${seed}`);
  const key = `${model}\u0000${seed}`;
  let hit = cache.get(key);
  if (hit) {
    cache.delete(key); // refresh LRU position
  } else {
    hit = generate(model, seed);
    if (cache.size >= CACHE_LIMIT) {
      const oldest = cache.keys().next().value;
      if (oldest !== undefined) cache.delete(oldest);
    }
  }
  cache.set(key, hit);
  return hit;
}

function copyTensor(t: Tensor): Tensor {
  return { dtype: t.dtype, shape: [...t.shape], data: t.data.slice() };
}

/**
 * Plausible inputs for `model` (one of SAMPLE_MODELS), deterministic from `seed`.
 * Throws MESH_UNKNOWN_MODEL for other names.
 */
export function sampleInputs(model: string, seed = 1): Record<string, Tensor> {
  const out: Record<string, Tensor> = {};
  for (const [name, t] of Object.entries(cached(model, seed).tensors)) out[name] = copyTensor(t);
  return out;
}

/** The text boxes drawn into `sampleInputs('ocr-det', seed)` (pixel coordinates, 320×320). */
export function sampleTextBoxes(seed = 1): TextBox[] {
  return cached('ocr-det', seed).boxes.map((b) => ({ ...b }));
}
