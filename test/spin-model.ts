/**
 * `spin`, an ONNX model written here as a protobuf (onnx.proto of the ONNX specification): 128 MatMuls in a
 * chain with one 1024 × 1024 weight (the identity), input x and output y, [1, 1024] float32. A run takes
 * about 6 ms on this project's 2-core test machine (one intra-op thread); `depth` makes it longer. Used by test/inline.test.ts, by the queue tests of test/mesh.test.ts (small requests that queue
 * on any broker) and, run in units, by test/payments-progress.test.ts.
 */
import { createHash } from 'node:crypto';
import { writeFile } from 'node:fs/promises';
import path from 'node:path';

/** Protobuf wire encoding, the little of it an ONNX ModelProto needs (also used by ./scale-model.ts). */
export function varint(n: number): Buffer {
  const out: number[] = [];
  while (n >= 0x80) {
    out.push((n % 128) | 0x80);
    n = Math.floor(n / 128);
  }
  out.push(n);
  return Buffer.from(out);
}

export const lenField = (field: number, payload: Buffer) => Buffer.concat([varint(field * 8 + 2), varint(payload.length), payload]);
export const varintField = (field: number, n: number) => Buffer.concat([varint(field * 8), varint(n)]);
export const stringField = (field: number, s: string) => lenField(field, Buffer.from(s));

export const SPIN_WIDTH = 1024;
export const SPIN_DEPTH = 128;

/** ModelProto { ir_version 8, opset_import { version 17 }, graph { node × depth, initializer W, input x, output y } }. */
export function spinModel(depth = SPIN_DEPTH): Buffer {
  const n = SPIN_WIDTH;
  const weight = new Float32Array(n * n);
  for (let i = 0; i < n; i++) weight[i * n + i] = 1;
  // TypeProto { tensor_type { elem_type FLOAT, shape { dim { dim_value } ... } } }
  const type = (dims: number[]) =>
    lenField(1, Buffer.concat([varintField(1, 1), lenField(2, Buffer.concat(dims.map((d) => lenField(1, varintField(1, d)))))]));
  const valueInfo = (name: string, dims: number[]) => Buffer.concat([stringField(1, name), lenField(2, type(dims))]);
  const name = (i: number) => (i === 0 ? 'x' : i === depth ? 'y' : `h${i}`);
  const nodes = Array.from({ length: depth }, (_, i) =>
    lenField(1, Buffer.concat([stringField(1, name(i)), stringField(1, 'W'), stringField(2, name(i + 1)), stringField(4, 'MatMul')])),
  );
  // TensorProto { dims, data_type FLOAT, name, raw_data (little-endian) }
  const initializer = lenField(
    5,
    Buffer.concat([varintField(1, n), varintField(1, n), varintField(2, 1), stringField(8, 'W'), lenField(9, Buffer.from(weight.buffer))]),
  );
  const graph = Buffer.concat([
    ...nodes,
    stringField(2, 'spin'),
    initializer,
    lenField(11, valueInfo('x', [1, n])),
    lenField(12, valueInfo('y', [1, n])),
  ]);
  return Buffer.concat([varintField(1, 8), lenField(8, varintField(2, 17)), lenField(7, graph)]);
}

/**
 * `n` rows of spin input: row i a distinct vector (spin multiplies by the identity, so each output row equals its
 * input row); `seed` makes the rows of different calls differ.
 */
export function spinInputs(seed: number, n = 1): { x: { dtype: 'float32'; shape: number[]; data: Float32Array } } {
  return {
    x: {
      dtype: 'float32',
      shape: [n, SPIN_WIDTH],
      data: Float32Array.from({ length: n * SPIN_WIDTH }, (_, i) => Math.sin(i * 0.37 + seed)),
    },
  };
}

/** Writes spin (`depth` MatMuls long) and a manifest of it alone into `dir`: a models folder for an agent. */
export async function writeSpinFolder(dir: string, depth = SPIN_DEPTH): Promise<void> {
  await writeFile(path.join(dir, 'manifest.json'), JSON.stringify({ models: [await writeSpinModel(dir, {}, depth)] }));
}

/** Writes `spin.onnx` into `dir` and returns its manifest entry (name `spin`, price 1 µ$ unless `extra` says otherwise). */
export async function writeSpinModel(dir: string, extra: Record<string, unknown> = {}, depth = SPIN_DEPTH) {
  return writeModel(dir, 'spin', spinModel(depth), `${depth} MatMuls of [1,${SPIN_WIDTH}] by an identity weight`, extra);
}

/** Writes `NAME.onnx` into `dir` and returns its manifest entry (version 1, price 1 µ$ unless `extra` says otherwise). */
async function writeModel(dir: string, name: string, bytes: Buffer, notes: string, extra: Record<string, unknown>) {
  await writeFile(path.join(dir, `${name}.onnx`), bytes);
  return {
    name,
    version: '1',
    file: `${name}.onnx`,
    sha256: createHash('sha256').update(bytes).digest('hex'),
    priceMicros: 1,
    notes,
    ...extra,
  };
}

/**
 * A model that flattens its input, [d0, d1, …] float32 → [d0, d1 × …]: a stand-in for a model that answers with the
 * wrong shape (a dishonest stage agent serves it under another model's name in test/pipelines-paid.test.ts).
 */
export function flattenModel(input: string, output: string, dims: number[]): Buffer {
  const type = (shape: number[]) =>
    lenField(1, Buffer.concat([varintField(1, 1), lenField(2, Buffer.concat(shape.map((d) => lenField(1, varintField(1, d)))))]));
  const valueInfo = (name: string, shape: number[]) => Buffer.concat([stringField(1, name), lenField(2, type(shape))]);
  const flat = [dims[0]!, dims.slice(1).reduce((a, b) => a * b, 1)];
  const node = lenField(1, Buffer.concat([stringField(1, input), stringField(2, output), stringField(4, 'Flatten')]));
  const graph = Buffer.concat([
    node,
    stringField(2, 'flatten'),
    lenField(11, valueInfo(input, dims)),
    lenField(12, valueInfo(output, flat)),
  ]);
  return Buffer.concat([varintField(1, 8), lenField(8, varintField(2, 17)), lenField(7, graph)]);
}

/**
 * `widen`: x [1, 1] float32 times a [1, `width`] weight of ones, y [1, `width`]: a 4-byte input with an answer of
 * 4 × `width` bytes, for an answer over an agent's message cap (test/payments-mesh.test.ts).
 */
export async function writeWidenModel(dir: string, width: number, extra: Record<string, unknown> = {}) {
  const type = (dims: number[]) =>
    lenField(1, Buffer.concat([varintField(1, 1), lenField(2, Buffer.concat(dims.map((d) => lenField(1, varintField(1, d)))))]));
  const valueInfo = (name: string, dims: number[]) => Buffer.concat([stringField(1, name), lenField(2, type(dims))]);
  const weight = new Float32Array(width).fill(1);
  const initializer = lenField(
    5,
    Buffer.concat([
      varintField(1, 1),
      varintField(1, width),
      varintField(2, 1),
      stringField(8, 'W'),
      lenField(9, Buffer.from(weight.buffer)),
    ]),
  );
  const node = lenField(1, Buffer.concat([stringField(1, 'x'), stringField(1, 'W'), stringField(2, 'y'), stringField(4, 'MatMul')]));
  const graph = Buffer.concat([
    node,
    stringField(2, 'widen'),
    initializer,
    lenField(11, valueInfo('x', [1, 1])),
    lenField(12, valueInfo('y', [1, width])),
  ]);
  const bytes = Buffer.concat([varintField(1, 8), lenField(8, varintField(2, 17)), lenField(7, graph)]);
  return writeModel(dir, 'widen', bytes, `[1,1] times a [1,${width}] weight of ones`, extra);
}
