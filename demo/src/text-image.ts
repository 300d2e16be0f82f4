/// <reference path="./opentype.d.ts" />
/**
 * Text drawn into an RGB image, deterministically, for the OCR pipeline's tests, benchmark and camera-hub
 * example: DejaVu Sans (npm `dejavu-fonts-ttf`, the Bitstream Vera licence) parsed by opentype.js, each glyph
 * outline flattened to line segments and filled with the non-zero winding rule at 4 × 4 samples per pixel.
 *
 *   const image = textImage(['EDGE MESH 2026']); // { dtype: 'uint8', shape: [H, W, 3], data }
 */
import { readFileSync } from 'node:fs';
import path from 'node:path';
import type { Tensor } from '@edge-mesh/protocol';
import opentype, { type Font, type PathCommand } from 'opentype.js';
import { resolvePackageDir } from './models.ts';

let font: Font | undefined;
function dejaVuSans(): Font {
  if (!font) {
    const bytes = readFileSync(path.join(resolvePackageDir('dejavu-fonts-ttf'), 'ttf', 'DejaVuSans.ttf'));
    font = opentype.parse(bytes.buffer.slice(bytes.byteOffset, bytes.byteOffset + bytes.byteLength) as ArrayBuffer);
  }
  return font;
}

/**
 * Glyph by glyph with each one's advance width (no shaping: opentype.js 2.0 cannot apply DejaVu's ccmp
 * lookups, and Latin text needs none); returns the outline's commands and the line's width.
 */
function layout(f: Font, text: string, x: number, y: number, fontSize: number): { commands: PathCommand[]; width: number } {
  const commands: PathCommand[] = [];
  let pen = x;
  for (const ch of text) {
    const glyph = f.charToGlyph(ch);
    commands.push(...glyph.getPath(pen, y, fontSize).commands);
    pen += ((glyph.advanceWidth ?? 0) * fontSize) / f.unitsPerEm;
  }
  return { commands, width: pen - x };
}

type Edge = [x0: number, y0: number, x1: number, y1: number];

/** The outline as line segments: quadratic and cubic curves cut into 8 pieces each. */
function edgesOf(commands: readonly PathCommand[]): Edge[] {
  const edges: Edge[] = [];
  let x = 0;
  let y = 0;
  let sx = 0;
  let sy = 0;
  const to = (nx: number, ny: number) => {
    edges.push([x, y, nx, ny]);
    x = nx;
    y = ny;
  };
  for (const c of commands) {
    if (c.type === 'M') {
      x = sx = c.x!;
      y = sy = c.y!;
    } else if (c.type === 'L') to(c.x!, c.y!);
    else if (c.type === 'Q' || c.type === 'C') {
      const [x0, y0] = [x, y];
      for (let i = 1; i <= 8; i++) {
        const t = i / 8;
        const u = 1 - t;
        if (c.type === 'Q') to(u * u * x0 + 2 * u * t * c.x1! + t * t * c.x!, u * u * y0 + 2 * u * t * c.y1! + t * t * c.y!);
        else
          to(
            u * u * u * x0 + 3 * u * u * t * c.x1! + 3 * u * t * t * c.x2! + t * t * t * c.x!,
            u * u * u * y0 + 3 * u * u * t * c.y1! + 3 * u * t * t * c.y2! + t * t * t * c.y!,
          );
      }
    } else if (c.type === 'Z') to(sx, sy);
  }
  return edges;
}

export interface TextImageOptions {
  /** Glyph size in pixels (default 32). */
  fontSize?: number;
  /** Space around the text, pixels (default 24). */
  margin?: number;
  /** Line spacing as a multiple of the size (default 1.6). */
  lineHeight?: number;
  /** Ink and paper grey levels (default 20 and 245). */
  ink?: number;
  paper?: number;
}

/** Lines of text, dark on light, as a uint8 RGB image [H, W, 3]. */
export function textImage(lines: readonly string[], options: TextImageOptions = {}): Tensor {
  const { fontSize = 32, margin = 24, lineHeight = 1.6, ink = 20, paper = 245 } = options;
  const f = dejaVuSans();
  const width = Math.ceil(Math.max(...lines.map((l) => layout(f, l, 0, 0, fontSize).width)) + 2 * margin);
  const height = Math.ceil(lines.length * fontSize * lineHeight + 2 * margin);
  const coverage = new Float32Array(width * height);
  const S = 4;
  lines.forEach((line, i) => {
    const baseline = margin + fontSize * (i * lineHeight + 1);
    const edges = edgesOf(layout(f, line, margin, baseline, fontSize).commands);
    const crossings: { x: number; dir: number }[] = [];
    for (let sy = 0; sy < height * S; sy++) {
      const yc = (sy + 0.5) / S;
      crossings.length = 0;
      for (const [x0, y0, x1, y1] of edges) {
        if (y0 === y1 || yc < Math.min(y0, y1) || yc >= Math.max(y0, y1)) continue;
        crossings.push({ x: x0 + ((yc - y0) * (x1 - x0)) / (y1 - y0), dir: y1 > y0 ? 1 : -1 });
      }
      if (crossings.length === 0) continue;
      crossings.sort((a, b) => a.x - b.x);
      const row = Math.floor(sy / S) * width;
      let winding = 0;
      for (let k = 0; k < crossings.length - 1; k++) {
        winding += crossings[k]!.dir;
        if (winding === 0) continue;
        const from = Math.max(0, Math.ceil(crossings[k]!.x * S - 0.5));
        const to = Math.min(width * S - 1, Math.floor(crossings[k + 1]!.x * S - 0.5));
        for (let sx = from; sx <= to; sx++) coverage[row + Math.floor(sx / S)]! += 1 / (S * S);
      }
    }
  });
  const data = new Uint8Array(width * height * 3);
  for (let i = 0; i < width * height; i++) {
    const v = Math.round(paper + (ink - paper) * Math.min(1, coverage[i]!));
    data.fill(v, i * 3, i * 3 + 3);
  }
  return { dtype: 'uint8', shape: [height, width, 3], data };
}
