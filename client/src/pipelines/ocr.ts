/**
 * OCR from an image with PaddleOCR's PP-OCRv4 models (docs/pipelines.md):
 *
 *   resize + normalise (step) → detection → boxes and direction crops (step) → direction classifier
 *   → recognition crops (step) → recognition → CTC decode (step)
 *
 * The steps follow PaddleOCR's inference code (PaddlePaddle/PaddleOCR):
 * - detection input: `DetResizeForTest` with `limit_side_len` 960, `limit_type` max (each side rounded to a
 *   multiple of 32), `NormalizeImage` with ImageNet mean and std on x / 255, channels in OpenCV's BGR order,
 *   CHW (ppocr/data/imaug/operators.py);
 * - boxes: `DBPostProcess` (ppocr/postprocess/db_postprocess.py): probability > 0.3, a box's mean probability
 *   ≥ 0.6, grown by `unclip` with ratio 1.5 (offset = area × ratio / perimeter), boxes whose short side is
 *   under 3 + 2 dropped, scaled back to the image. Here each region is a connected component and its box is
 *   axis-aligned (PaddleOCR fits a rotated rectangle to the contour): enough for level text;
 * - reading order: `sorted_boxes` (tools/infer/predict_system.py): top to bottom, left to right within 10 px;
 * - direction: `TextClassifier.resize_norm_img` (tools/infer/predict_cls.py): 48 × 192, (x / 255 − 0.5) / 0.5,
 *   zero padding on the right; label 180 with score > 0.9 turns the crop by 180°;
 * - recognition: `TextRecognizer.resize_norm_img` (tools/infer/predict_rec.py): height 48, width
 *   48 × the batch's widest ratio (at least 320 / 48), each crop ceil(48 × w / h) wide, same normalisation,
 *   zero padding;
 * - decoding: `CTCLabelDecode` (ppocr/postprocess/rec_postprocess.py): argmax per step, repeats merged,
 *   index 0 the blank, index i the dictionary's line i − 1, a space as the last class (`use_space_char`);
 *   confidence the mean of the kept steps' probabilities.
 * Resizing is bilinear with OpenCV's half-pixel centres (`cv2.resize`, INTER_LINEAR).
 */
import { MeshError, type Tensor } from '@edge-mesh/protocol';
import type { Escalation, PipelineDefinition } from '../pipeline.ts';

const DET_LIMIT_SIDE = 960;
const DET_MEAN = [0.485, 0.456, 0.406] as const;
const DET_STD = [0.229, 0.224, 0.225] as const;
const DB_THRESH = 0.3;
const DB_BOX_THRESH = 0.6;
const DB_UNCLIP_RATIO = 1.5;
const DB_MIN_SIZE = 3;
const DB_MAX_CANDIDATES = 1000;
const REC_HEIGHT = 48;
const REC_MIN_WIDTH = 320;
const REC_MAX_WIDTH = 3_200;
const CLS_WIDTH = 192;
const CLS_THRESH = 0.9;
/** Images accepted: up to 4096 × 4096 RGB. */
export const MAX_IMAGE_SIDE = 4096;
/** Text boxes read per image at most. */
export const MAX_TEXT_BOXES = 64;

/** An RGB image as the pipeline takes it: uint8 [H, W, 3]. */
interface Rgb {
  h: number;
  w: number;
  px: Uint8Array;
}

function rgbOf(image: Tensor): Rgb {
  const [h, w, c] = image.shape;
  if (!(image.data instanceof Uint8Array) || c !== 3 || !h || !w) throw new MeshError('MESH_BAD_TENSOR', 'image must be uint8 [H, W, 3]');
  return { h, w, px: image.data };
}

/**
 * Bilinear resize of a region of `src` (x0, y0, cw, ch) to dw × dh, OpenCV's pixel-centre mapping,
 * written as CHW float32 in BGR order with `norm(channel, value)` into `out` at row stride `outW`.
 */
function resizeInto(
  src: Rgb,
  region: { x0: number; y0: number; w: number; h: number },
  dw: number,
  dh: number,
  out: Float32Array,
  outOffset: number,
  outW: number,
  outH: number,
  norm: (channel: number, value: number) => number,
  rotate180 = false,
): void {
  const sx = region.w / dw;
  const sy = region.h / dh;
  const plane = outW * outH;
  for (let y = 0; y < dh; y++) {
    const ty = rotate180 ? dh - 1 - y : y;
    let fy = (ty + 0.5) * sy - 0.5;
    if (fy < 0) fy = 0;
    const y0 = Math.min(Math.floor(fy), region.h - 1);
    const y1 = Math.min(y0 + 1, region.h - 1);
    const wy = fy - y0;
    for (let x = 0; x < dw; x++) {
      const tx = rotate180 ? dw - 1 - x : x;
      let fx = (tx + 0.5) * sx - 0.5;
      if (fx < 0) fx = 0;
      const x0 = Math.min(Math.floor(fx), region.w - 1);
      const x1 = Math.min(x0 + 1, region.w - 1);
      const wx = fx - x0;
      const i00 = ((region.y0 + y0) * src.w + region.x0 + x0) * 3;
      const i01 = ((region.y0 + y0) * src.w + region.x0 + x1) * 3;
      const i10 = ((region.y0 + y1) * src.w + region.x0 + x0) * 3;
      const i11 = ((region.y0 + y1) * src.w + region.x0 + x1) * 3;
      for (let c = 0; c < 3; c++) {
        const rgb = 2 - c; // BGR planes, as OpenCV reads images
        const top = src.px[i00 + rgb]! * (1 - wx) + src.px[i01 + rgb]! * wx;
        const bottom = src.px[i10 + rgb]! * (1 - wx) + src.px[i11 + rgb]! * wx;
        const v = Math.round(top * (1 - wy) + bottom * wy);
        out[outOffset + c * plane + y * outW + x] = norm(c, v);
      }
    }
  }
}

/** `DetResizeForTest` + `NormalizeImage` + `ToCHWImage`: image → the detector's [1, 3, h, w]. */
export function detectionInput(image: Tensor): Tensor {
  const src = rgbOf(image);
  const ratio = Math.max(src.h, src.w) > DET_LIMIT_SIDE ? DET_LIMIT_SIDE / Math.max(src.h, src.w) : 1;
  const h = Math.max(Math.round((src.h * ratio) / 32) * 32, 32);
  const w = Math.max(Math.round((src.w * ratio) / 32) * 32, 32);
  const data = new Float32Array(3 * h * w);
  // BGR planes: mean and std are applied in the channel order OpenCV gives (B first).
  resizeInto(src, { x0: 0, y0: 0, w: src.w, h: src.h }, w, h, data, 0, w, h, (c, v) => (v / 255 - DET_MEAN[c]!) / DET_STD[c]!);
  return { dtype: 'float32', shape: [1, 3, h, w], data };
}

export interface TextBox {
  x0: number;
  y0: number;
  x1: number;
  y1: number;
  score: number;
}

/** DB post-processing on the probability map [1, 1, h, w], boxes in the coordinates of an image srcW × srcH. */
export function findTextBoxes(prob: Tensor, srcW: number, srcH: number): TextBox[] {
  const [, , h, w] = prob.shape as [number, number, number, number];
  const p = prob.data as Float32Array;
  const label = new Int32Array(h * w);
  const boxes: TextBox[] = [];
  const stack = new Int32Array(h * w);
  let next = 0;
  for (let start = 0; start < h * w && next < DB_MAX_CANDIDATES; start++) {
    if (label[start] !== 0 || !(p[start]! > DB_THRESH)) continue;
    next++;
    let top = 0;
    stack[top++] = start;
    label[start] = next;
    let minX = w;
    let minY = h;
    let maxX = -1;
    let maxY = -1;
    while (top > 0) {
      const i = stack[--top]!;
      const x = i % w;
      const y = (i - x) / w;
      if (x < minX) minX = x;
      if (x > maxX) maxX = x;
      if (y < minY) minY = y;
      if (y > maxY) maxY = y;
      // 8-connected, as OpenCV's findContours joins diagonal neighbours.
      for (let dy = -1; dy <= 1; dy++) {
        const ny = y + dy;
        if (ny < 0 || ny >= h) continue;
        for (let dx = -1; dx <= 1; dx++) {
          const nx = x + dx;
          if (nx < 0 || nx >= w) continue;
          const j = ny * w + nx;
          if (label[j] === 0 && p[j]! > DB_THRESH) {
            label[j] = next;
            stack[top++] = j;
          }
        }
      }
    }
    const bw = maxX - minX + 1;
    const bh = maxY - minY + 1;
    if (Math.min(bw, bh) < DB_MIN_SIZE) continue;
    // box_score_fast: the mean probability inside the box.
    let sum = 0;
    for (let y = minY; y <= maxY; y++) for (let x = minX; x <= maxX; x++) sum += p[y * w + x]!;
    const score = sum / (bw * bh);
    if (score < DB_BOX_THRESH) continue;
    // unclip: grow by area × ratio / perimeter on every side.
    const grow = (bw * bh * DB_UNCLIP_RATIO) / (2 * (bw + bh));
    const ux0 = minX - grow;
    const uy0 = minY - grow;
    const ux1 = maxX + 1 + grow;
    const uy1 = maxY + 1 + grow;
    if (Math.min(ux1 - ux0, uy1 - uy0) < DB_MIN_SIZE + 2) continue;
    const clamp = (v: number, hi: number) => Math.max(0, Math.min(hi, Math.round(v)));
    const box = {
      x0: clamp((ux0 * srcW) / w, srcW),
      y0: clamp((uy0 * srcH) / h, srcH),
      x1: clamp((ux1 * srcW) / w, srcW),
      y1: clamp((uy1 * srcH) / h, srcH),
      score,
    };
    if (box.x1 - box.x0 >= 1 && box.y1 - box.y0 >= 1) boxes.push(box);
  }
  // sorted_boxes: by top edge, then left to right for boxes within 10 px of each other's top.
  boxes.sort((a, b) => a.y0 - b.y0 || a.x0 - b.x0);
  for (let i = 0; i < boxes.length - 1; i++) {
    for (let j = i; j >= 0; j--) {
      const a = boxes[j]!;
      const b = boxes[j + 1]!;
      if (Math.abs(b.y0 - a.y0) < 10 && b.x0 < a.x0) {
        boxes[j] = b;
        boxes[j + 1] = a;
      } else break;
    }
  }
  return boxes.slice(0, MAX_TEXT_BOXES);
}

const lineNorm = (_c: number, v: number) => (v / 255 - 0.5) / 0.5;

function boxRegion(b: { x0: number; y0: number; x1: number; y1: number }) {
  return { x0: b.x0, y0: b.y0, w: b.x1 - b.x0, h: b.y1 - b.y0 };
}

/** Boxes as int32 [B, 4] (x0, y0, x1, y1) and the direction classifier's batch [B, 3, 48, 192]. */
export function directionCrops(image: Tensor, prob: Tensor): { boxes: Tensor; crops: Tensor } {
  const src = rgbOf(image);
  const found = findTextBoxes(prob, src.w, src.h);
  const boxes = new Int32Array(found.length * 4);
  const plane = REC_HEIGHT * CLS_WIDTH;
  const crops = new Float32Array(found.length * 3 * plane);
  found.forEach((b, i) => {
    boxes.set([b.x0, b.y0, b.x1, b.y1], i * 4);
    const region = boxRegion(b);
    const dw = Math.min(CLS_WIDTH, Math.ceil((REC_HEIGHT * region.w) / region.h));
    resizeInto(src, region, dw, REC_HEIGHT, crops, i * 3 * plane, CLS_WIDTH, REC_HEIGHT, lineNorm);
  });
  return {
    boxes: { dtype: 'int32', shape: [found.length, 4], data: boxes },
    crops: { dtype: 'float32', shape: [found.length, 3, REC_HEIGHT, CLS_WIDTH], data: crops },
  };
}

/** The recogniser's batch [B, 3, 48, W], each crop turned by 180° where the classifier is sure it is upside down. */
export function recognitionCrops(image: Tensor, boxes: Tensor, direction: Tensor): Tensor {
  const src = rgbOf(image);
  const b = boxes.data as Int32Array;
  const count = boxes.shape[0]!;
  const d = direction.data as Float32Array;
  let maxRatio = REC_MIN_WIDTH / REC_HEIGHT;
  for (let i = 0; i < count; i++) maxRatio = Math.max(maxRatio, (b[i * 4 + 2]! - b[i * 4]!) / (b[i * 4 + 3]! - b[i * 4 + 1]!));
  const width = Math.min(REC_MAX_WIDTH, Math.floor(REC_HEIGHT * maxRatio));
  const plane = REC_HEIGHT * width;
  const out = new Float32Array(count * 3 * plane);
  for (let i = 0; i < count; i++) {
    const region = boxRegion({ x0: b[i * 4]!, y0: b[i * 4 + 1]!, x1: b[i * 4 + 2]!, y1: b[i * 4 + 3]! });
    const upsideDown = d[i * 2 + 1]! > d[i * 2]! && d[i * 2 + 1]! > CLS_THRESH;
    const dw = Math.min(width, Math.ceil((REC_HEIGHT * region.w) / region.h));
    resizeInto(src, region, dw, REC_HEIGHT, out, i * 3 * plane, width, REC_HEIGHT, lineNorm, upsideDown);
  }
  return { dtype: 'float32', shape: [count, 3, REC_HEIGHT, width], data: out };
}

export interface DecodedLine {
  text: string;
  confidence: number;
}

/** CTC greedy decoding of the recogniser's [B, T, C] with `dictionary` (the keys file's lines; a space is added last). */
export function ctcDecode(probs: Tensor, dictionary: readonly string[]): DecodedLine[] {
  const [count, steps, classes] = probs.shape as [number, number, number];
  const p = probs.data as Float32Array;
  const lines: DecodedLine[] = [];
  for (let n = 0; n < count; n++) {
    let text = '';
    let sum = 0;
    let kept = 0;
    let previous = -1;
    for (let t = 0; t < steps; t++) {
      const row = (n * steps + t) * classes;
      let best = 0;
      for (let c = 1; c < classes; c++) if (p[row + c]! > p[row + best]!) best = c;
      if (best !== 0 && best !== previous) {
        text += best - 1 < dictionary.length ? dictionary[best - 1] : ' ';
        sum += p[row + best]!;
        kept++;
      }
      previous = best;
    }
    lines.push({ text, confidence: kept ? sum / kept : 0 });
  }
  return lines;
}

/** The pipeline's text output (uint8 UTF-8, lines joined by "\n") back to a string. */
export function ocrText(outputs: Record<string, Tensor>): string {
  const t = outputs.text;
  if (!t || !(t.data instanceof Uint8Array)) throw new MeshError('MESH_BAD_TENSOR', 'no uint8 text output');
  return new TextDecoder().decode(t.data);
}

/** The mean step probability of each line of a recogniser output, for escalation rules. */
export function recognitionConfidence(probs: Tensor): number[] {
  return ctcDecode(probs, []).map((l) => l.confidence);
}

export interface OcrPipelineOptions {
  /** The recogniser's dictionary: the lines of PaddleOCR's ppocr_keys_v1.txt (6623 for PP-OCRv4 Chinese). */
  dictionary: readonly string[];
  name?: string;
  detModel?: string;
  clsModel?: string;
  recModel?: string;
  /** Lines under this confidence are left out of `text` (PaddleOCR's `drop_score` 0.5). */
  dropScore?: number;
  /** Ask a bigger recogniser when a line is unsure. */
  escalate?: Escalation;
}

/** The OCR pipeline: uint8 `image` [H, W, 3] RGB in; `text` (uint8 UTF-8), `confidence` [B] and `boxes` [B, 4] out. */
export function ocrPipeline(options: OcrPipelineOptions): PipelineDefinition {
  const { dictionary, name = 'ocr', detModel = 'ocr-det', clsModel = 'ocr-cls', recModel = 'ocr-rec', dropScore = 0.5, escalate } = options;
  const classes = dictionary.length + 2;
  const empty = (shape: number[]): Tensor => ({ dtype: 'float32', shape, data: new Float32Array(0) });
  return {
    name,
    version: '1',
    description: 'text lines from an RGB image (PaddleOCR PP-OCRv4 detection, direction, recognition)',
    inputs: { image: { dtype: 'uint8', shape: [null, null, 3], maxElements: MAX_IMAGE_SIDE * MAX_IMAGE_SIDE * 3 } },
    outputs: ['text', 'confidence', 'boxes'],
    stages: [
      { kind: 'step', name: 'det-input', inputs: ['image'], outputs: ['det_input'], run: (t) => ({ det_input: detectionInput(t.image!) }) },
      {
        kind: 'model',
        name: 'detection',
        model: detModel,
        inputs: { x: 'det_input' },
        outputs: { 'sigmoid_0.tmp_0': { as: 'prob', spec: { dtype: 'float32', shape: [1, 1, null, null] } } },
        check: (inputs, outputs) => {
          const [, , h, w] = inputs.x!.shape;
          const out = outputs['sigmoid_0.tmp_0']!;
          if (out.shape[2] !== h || out.shape[3] !== w)
            throw new MeshError('MESH_BAD_TENSOR', `map [${out.shape}] for input [${inputs.x!.shape}]`);
        },
      },
      {
        kind: 'step',
        name: 'boxes',
        inputs: ['image', 'prob'],
        outputs: ['boxes', 'cls_input'],
        run: (t) => {
          const { boxes, crops } = directionCrops(t.image!, t.prob!);
          return { boxes, cls_input: crops };
        },
      },
      {
        kind: 'model',
        name: 'direction',
        model: clsModel,
        inputs: { x: 'cls_input' },
        outputs: { 'softmax_0.tmp_0': { as: 'direction', spec: { dtype: 'float32', shape: [null, 2] } } },
        check: (inputs, outputs) => {
          if (outputs['softmax_0.tmp_0']!.shape[0] !== inputs.x!.shape[0]) throw new MeshError('MESH_BAD_TENSOR', 'one direction per crop');
        },
        skip: (inputs) => (inputs.x!.shape[0] === 0 ? { 'softmax_0.tmp_0': empty([0, 2]) } : undefined),
      },
      {
        kind: 'step',
        name: 'rec-input',
        inputs: ['image', 'boxes', 'direction'],
        outputs: ['rec_input'],
        run: (t) => ({ rec_input: recognitionCrops(t.image!, t.boxes!, t.direction!) }),
      },
      {
        kind: 'model',
        name: 'recognition',
        model: recModel,
        inputs: { x: 'rec_input' },
        outputs: { 'softmax_11.tmp_0': { as: 'rec', spec: { dtype: 'float32', shape: [null, null, classes] } } },
        check: (inputs, outputs) => {
          const out = outputs['softmax_11.tmp_0']!;
          // PP-OCRv4's recogniser gives one step per 8 pixels of width.
          if (out.shape[0] !== inputs.x!.shape[0] || out.shape[1]! > Math.ceil(inputs.x!.shape[3]! / 8) + 1) {
            throw new MeshError('MESH_BAD_TENSOR', `recognition [${out.shape}] for input [${inputs.x!.shape}]`);
          }
        },
        skip: (inputs) => (inputs.x!.shape[0] === 0 ? { 'softmax_11.tmp_0': empty([0, 0, classes]) } : undefined),
        ...(escalate ? { escalate } : {}),
      },
      {
        kind: 'step',
        name: 'decode',
        inputs: ['rec'],
        outputs: ['text', 'confidence'],
        run: (t) => {
          const lines = ctcDecode(t.rec!, dictionary);
          const kept = lines.filter((l) => l.confidence >= dropScore).map((l) => l.text);
          return {
            text: { dtype: 'uint8', ...utf8(kept.join('\n')) },
            confidence: { dtype: 'float32', shape: [lines.length], data: Float32Array.from(lines.map((l) => l.confidence)) },
          };
        },
      },
    ],
  };
}

function utf8(text: string): { shape: number[]; data: Uint8Array } {
  const data = new TextEncoder().encode(text);
  return { shape: [data.length], data };
}
