/**
 * `scale`, an ONNX model written here as a protobuf (onnx.proto of the ONNX specification) for the deployment tests:
 * input x [1, width] float32, output y = x · (factor · I) · I · … (depth MatMuls in all), so y = factor · x. The
 * output tells which version answered; the depth sets how slow it runs (same inputs and outputs at every depth).
 */

import { lenField, stringField, varintField } from './spin-model.ts';

export const SCALE_WIDTH = 256;

function diagonal(n: number, value: number): Buffer {
  const w = new Float32Array(n * n);
  for (let i = 0; i < n; i++) w[i * n + i] = value;
  return Buffer.from(w.buffer);
}

/** ModelProto { ir_version 8, opset_import { version 17 }, graph { MatMul × depth, initializers S and I, x, y } }. */
export function scaleModel(factor: number, depth = 1): Buffer {
  const n = SCALE_WIDTH;
  const type = (dims: number[]) =>
    lenField(1, Buffer.concat([varintField(1, 1), lenField(2, Buffer.concat(dims.map((d) => lenField(1, varintField(1, d)))))]));
  const valueInfo = (name: string, dims: number[]) => Buffer.concat([stringField(1, name), lenField(2, type(dims))]);
  const name = (i: number) => (i === 0 ? 'x' : i === depth ? 'y' : `h${i}`);
  const nodes = Array.from({ length: depth }, (_, i) =>
    lenField(
      1,
      Buffer.concat([stringField(1, name(i)), stringField(1, i === 0 ? 'S' : 'I'), stringField(2, name(i + 1)), stringField(4, 'MatMul')]),
    ),
  );
  const initializer = (label: string, value: number) =>
    lenField(
      5,
      Buffer.concat([varintField(1, n), varintField(1, n), varintField(2, 1), stringField(8, label), lenField(9, diagonal(n, value))]),
    );
  const graph = Buffer.concat([
    ...nodes,
    stringField(2, 'scale'),
    initializer('S', factor),
    ...(depth > 1 ? [initializer('I', 1)] : []),
    lenField(11, valueInfo('x', [1, n])),
    lenField(12, valueInfo('y', [1, n])),
  ]);
  return Buffer.concat([varintField(1, 8), lenField(8, varintField(2, 17)), lenField(7, graph)]);
}
