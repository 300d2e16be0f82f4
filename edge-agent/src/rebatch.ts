/**
 * A batch dimension for a model that declares none: the same ONNX file with the first dimension of each graph input
 * and output changed from the number 1 to the symbol `N`, so that onnxruntime takes N requests' tensors stacked in
 * one run. For a small model most of a run is fixed cost (the wake-word model: 36 µs for one row, 36 µs for four, 66
 * µs for sixteen on the 2-core test machine), so the runs one event-loop turn hands over cost far less together.
 *
 * Only a rewrite: whether the model really treats rows independently (no Reshape to a constant shape, no op that
 * mixes rows) is not read from the graph but tested on the loaded session (inline.ts, `probeBatching`): the stacked
 * run must give each row the outputs its own run gives. The intermediate shapes the file records (`value_info`) are
 * dropped, as they name the old batch of 1; onnxruntime infers them again.
 *
 * The ONNX file is a protobuf `ModelProto` (onnx/onnx.proto): graph = field 7; in `GraphProto` initializer = 5,
 * input = 11, output = 12, value_info = 13; `ValueInfoProto` type = 2; `TypeProto` tensor_type = 1;
 * `TypeProto.Tensor` shape = 2; `TensorShapeProto` dim = 1; `Dimension` dim_value = 1, dim_param = 2. The rewrite
 * walks those messages with the wire format alone and copies every other field byte for byte.
 */

import { MeshError } from '@edge-mesh/protocol';
import { fields as readFields } from './onnx-inputs.ts';

interface Field {
  no: number;
  wireType: number;
  /** Payload of a length-delimited field (empty for the others). */
  bytes: Uint8Array;
  /** A varint field's value (0 for the others). */
  value: number;
  /** The whole field as it was: key, length, payload. */
  raw: Uint8Array;
}

function varint(n: number): Uint8Array {
  const out: number[] = [];
  let v = n;
  do {
    let x = v % 128;
    v = Math.floor(v / 128);
    if (v > 0) x |= 0x80;
    out.push(x);
  } while (v > 0);
  return Uint8Array.from(out);
}

/**
 * Bounds on what the rewrite reads: a model that runs inline is small (its runs take under a millisecond), and a file
 * padded with millions of fields would otherwise cost the main thread seconds and gigabytes to walk.
 */
export const REBATCH_MAX_BYTES = 64 * 2 ** 20;
export const REBATCH_MAX_FIELDS = 100_000;

const EMPTY = new Uint8Array(0);

/** The fields of `b`, read with the agent's ONNX field reader (onnx-inputs.ts), at most REBATCH_MAX_FIELDS of them. */
function fields(b: Uint8Array): Field[] {
  const out: Field[] = [];
  for (const f of readFields(b)) {
    if (out.length >= REBATCH_MAX_FIELDS) throw new MeshError('MESH_BAD_REQUEST', `a message with more than ${REBATCH_MAX_FIELDS} fields`);
    out.push({
      no: f.field,
      wireType: f.wire,
      bytes: f.wire === 2 ? b.subarray(f.at, f.next) : EMPTY,
      value: f.wire === 0 ? f.value : 0,
      raw: b.subarray(f.start, f.next),
    });
  }
  return out;
}

function concat(parts: Uint8Array[]): Uint8Array {
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let at = 0;
  for (const p of parts) {
    out.set(p, at);
    at += p.length;
  }
  return out;
}

const lengthDelimited = (no: number, payload: Uint8Array) => concat([varint((no << 3) | 2), varint(payload.length), payload]);

/** `message` with each length-delimited field `no` replaced by `edit(payload)`, or left out where edit gives undefined. */
function editField(message: Uint8Array, no: number, edit: (payload: Uint8Array) => Uint8Array | undefined): Uint8Array {
  const parts: Uint8Array[] = [];
  for (const f of fields(message)) {
    if (f.no !== no || f.wireType !== 2) parts.push(f.raw);
    else {
      const edited = edit(f.bytes);
      if (edited !== undefined) parts.push(lengthDelimited(no, edited));
    }
  }
  return concat(parts);
}

const only = (message: Uint8Array, no: number) => fields(message).filter((f) => f.no === no && f.wireType === 2);

/** A `TensorShapeProto` whose first dim is the number 1, with that dim made `N`. */
function batchShape(shape: Uint8Array): Uint8Array {
  let first = true;
  return editField(shape, 1, (dim) => {
    if (!first) return dim;
    first = false;
    const parts = fields(dim);
    const values = parts.filter((f) => f.no === 1);
    // Protobuf takes the last of a repeated singular field; a dimension that says twice is refused, not guessed.
    const value = values.length === 1 && values[0]!.wireType === 0 ? values[0] : undefined;
    if (value?.value !== 1 || parts.some((f) => f.no === 2)) throw new MeshError('MESH_BAD_REQUEST', 'a first dimension other than 1');
    return concat([...parts.filter((f) => f.no !== 1).map((f) => f.raw), lengthDelimited(2, new TextEncoder().encode('N'))]);
  });
}

/** A `ValueInfoProto` of a tensor whose shape starts with 1, with that dimension made `N`. */
function batchValueInfo(info: Uint8Array): Uint8Array {
  const type = only(info, 2)[0];
  const tensor = type && only(type.bytes, 1)[0];
  const shape = tensor && only(tensor.bytes, 2)[0];
  if (!shape || only(shape.bytes, 1).length === 0)
    throw new MeshError('MESH_BAD_REQUEST', 'an input or output that is not a tensor of known rank');
  return editField(info, 2, (t) => editField(t, 1, (tt) => editField(tt, 2, batchShape)));
}

const nameOf = (message: Uint8Array, no: number) => {
  const f = only(message, no)[0];
  return f ? new TextDecoder().decode(f.bytes) : undefined;
};

/**
 * The model with a batch dimension `N` in place of the leading 1 of every graph input and output, or a reason why
 * not: an input or output whose first dimension is not the number 1, one that is not a tensor, an input that is also
 * an initializer (older files list weights as inputs), or bytes that do not parse as a model with one graph.
 */
export function rebatchOnnx(model: Uint8Array): { ok: true; bytes: Uint8Array } | { ok: false; reason: string } {
  try {
    if (model.length > REBATCH_MAX_BYTES) throw new MeshError('MESH_BAD_REQUEST', `a file over ${REBATCH_MAX_BYTES} bytes`);
    const graphs = only(model, 7);
    if (graphs.length !== 1) throw new MeshError('MESH_BAD_REQUEST', 'not a model with one graph');
    const graph = graphs[0]!.bytes;
    const weights = new Set(only(graph, 5).map((t) => nameOf(t.bytes, 8)));
    const inputs = only(graph, 11);
    if (inputs.length === 0 || only(graph, 12).length === 0) throw new MeshError('MESH_BAD_REQUEST', 'a graph without inputs or outputs');
    if (inputs.some((i) => weights.has(nameOf(i.bytes, 1))))
      throw new MeshError('MESH_BAD_REQUEST', 'an input that is also an initializer');
    const edited = editField(model, 7, (g) =>
      editField(
        editField(
          editField(g, 13, () => undefined),
          11,
          batchValueInfo,
        ),
        12,
        batchValueInfo,
      ),
    );
    return { ok: true, bytes: edited };
  } catch (err) {
    // Whatever the bytes hold, the answer is a reason, never a throw: the model then runs one request at a time.
    return { ok: false, reason: (err as Error).message };
  }
}
