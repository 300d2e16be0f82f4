/**
 * The input shapes an ONNX file declares, read from its protobuf without onnxruntime. The agent uses
 * them to pick the models that may run inline (docs/agent.md, "Inline models") before it creates any
 * session on its main thread: a model with a free dim never gets one there. The session's own
 * metadata has the last word; this reader only spares the main thread the sessions it would not keep.
 *
 * It reads positionally through a small window, skipping weights and nodes, so a model file of any
 * size costs a few reads and 64 KB of buffer, not a copy of the file.
 *
 * Wire format: ModelProto.graph = 7; GraphProto.input = 11 (ValueInfoProto: name = 1, type = 2);
 * TypeProto.tensor_type = 1 (Tensor: elem_type = 1, shape = 2); TensorShapeProto.dim = 1 (Dimension:
 * dim_value = 1, dim_param = 2), as in onnx.proto of the ONNX specification.
 */
import { type FileHandle, open } from 'node:fs/promises';
import { MeshError } from '@edge-mesh/protocol';

export interface DeclaredInput {
  name: string;
  /**
   * Each dim: its size, its symbolic name, or null when it has neither. Null for the whole list when
   * the input is not a tensor or declares no shape (its rank is unknown).
   */
  dims: (number | string | null)[] | null;
}

const WINDOW = 64 * 1024;
/** A graph input's declaration is a few dozen bytes; anything far larger is not a model we understand. */
const MAX_INPUT_BYTES = 1 << 20;

const unreadable = (file: string, why: string) => new MeshError('MESH_MODEL_INTEGRITY', `cannot read the inputs of ${file}: ${why}`);

class WindowReader {
  private buf = Buffer.alloc(WINDOW);
  private start = 0;
  private end = 0;

  constructor(
    private readonly fh: FileHandle,
    readonly size: number,
    private readonly file: string,
  ) {}

  /** Makes bytes [pos, pos + len) (clamped to the file) readable with `at`. */
  async ensure(pos: number, len: number): Promise<void> {
    const want = Math.min(len, this.size - pos);
    if (pos >= this.start && pos + want <= this.end) return;
    if (len > this.buf.length) this.buf = Buffer.alloc(len);
    const { bytesRead } = await this.fh.read(this.buf, 0, this.buf.length, pos);
    this.start = pos;
    this.end = pos + bytesRead;
    if (this.end < pos + want) throw unreadable(this.file, 'truncated');
  }

  at(pos: number): number {
    if (pos < this.start || pos >= this.end) throw unreadable(this.file, 'truncated');
    return this.buf[pos - this.start]!;
  }

  bytes(pos: number, len: number): Buffer {
    return this.buf.subarray(pos - this.start, pos - this.start + len);
  }
}

/** A varint at `pos` of `read`; returns [value, next position]. Values past 2^53 lose precision, which no size here reaches. */
function varint(read: (pos: number) => number, pos: number): [number, number] {
  let value = 0;
  let scale = 1;
  for (let i = 0; i < 10; i++) {
    const b = read(pos + i);
    value += (b & 0x7f) * scale;
    if (b < 0x80) return [value, pos + i + 1];
    scale *= 128;
  }
  throw new MeshError('MESH_MODEL_INTEGRITY', 'malformed varint');
}

export interface Field {
  field: number;
  wire: number;
  /** Where the field's tag starts. */
  start: number;
  /** Varint value, or the length of a length-delimited field. */
  value: number;
  /** Where the value (or the length-delimited payload) starts. */
  at: number;
  /** Where the next field starts. */
  next: number;
}

function readField(read: (pos: number) => number, pos: number): Field {
  const [tag, afterTag] = varint(read, pos);
  const field = Math.floor(tag / 8);
  const wire = tag & 7;
  switch (wire) {
    case 0: {
      const [value, next] = varint(read, afterTag);
      return { field, wire, start: pos, value, at: afterTag, next };
    }
    case 1:
      return { field, wire, start: pos, value: 0, at: afterTag, next: afterTag + 8 };
    case 2: {
      const [len, at] = varint(read, afterTag);
      return { field, wire, start: pos, value: len, at, next: at + len };
    }
    case 5:
      return { field, wire, start: pos, value: 0, at: afterTag, next: afterTag + 4 };
    default:
      // Groups (3, 4) are not used by onnx.proto.
      throw new MeshError('MESH_MODEL_INTEGRITY', `unexpected wire type ${wire}`);
  }
}

/** The fields of the message in buf[start, end) (also the ONNX rewrite's reader, rebatch.ts). */
export function* fields(buf: Uint8Array, start = 0, end = buf.length): Generator<Field> {
  const read = (pos: number) => {
    if (pos >= end) throw new MeshError('MESH_MODEL_INTEGRITY', 'field runs past its message');
    return buf[pos]!;
  };
  for (let pos = start; pos < end; ) {
    const f = readField(read, pos);
    if (f.next > end) throw new MeshError('MESH_MODEL_INTEGRITY', 'field runs past its message');
    yield f;
    pos = f.next;
  }
}

function parseDims(buf: Buffer, start: number, end: number): (number | string | null)[] {
  const dims: (number | string | null)[] = [];
  for (const f of fields(buf, start, end)) {
    if (f.field !== 1 || f.wire !== 2) continue;
    let dim: number | string | null = null;
    for (const d of fields(buf, f.at, f.next)) {
      // A negative dim_value is a 10-byte varint, read here as a number past 2^53: not a size.
      if (d.field === 1 && d.wire === 0) dim = d.value <= Number.MAX_SAFE_INTEGER ? d.value : null;
      else if (d.field === 2 && d.wire === 2) dim = buf.toString('utf8', d.at, d.next);
    }
    dims.push(dim);
  }
  return dims;
}

function parseValueInfo(buf: Buffer): DeclaredInput {
  let name = '';
  let dims: DeclaredInput['dims'] = null;
  for (const f of fields(buf, 0, buf.length)) {
    if (f.field === 1 && f.wire === 2) name = buf.toString('utf8', f.at, f.next);
    else if (f.field === 2 && f.wire === 2) {
      dims = null;
      for (const t of fields(buf, f.at, f.next)) {
        if (t.field !== 1 || t.wire !== 2) continue; // sequence, map, optional, sparse: not a dense tensor
        for (const s of fields(buf, t.at, t.next)) if (s.field === 2 && s.wire === 2) dims = parseDims(buf, s.at, s.next);
      }
    }
  }
  return { name, dims };
}

/** The graph inputs `file` declares, in order; throws MESH_MODEL_INTEGRITY when it is no ONNX model this reader understands. */
export async function declaredInputs(file: string): Promise<DeclaredInput[]> {
  const fh = await open(file, 'r');
  try {
    const r = new WindowReader(fh, (await fh.stat()).size, file);
    const read = (pos: number) => r.at(pos);
    // ModelProto: find the graph.
    let graph: Field | undefined;
    for (let pos = 0; pos < r.size; ) {
      await r.ensure(pos, 32);
      const f = readField(read, pos);
      if (f.field === 7 && f.wire === 2) {
        if (graph) throw unreadable(file, 'two graphs');
        graph = f;
      }
      pos = f.next;
    }
    if (!graph || graph.next > r.size) throw unreadable(file, 'no graph');
    // GraphProto: read each input whole, skip everything else.
    const inputs: DeclaredInput[] = [];
    for (let pos = graph.at; pos < graph.next; ) {
      await r.ensure(pos, 32);
      const f = readField(read, pos);
      if (f.next > graph.next) throw unreadable(file, 'field runs past the graph');
      if (f.field === 11 && f.wire === 2) {
        if (f.value > MAX_INPUT_BYTES) throw unreadable(file, 'oversized input declaration');
        await r.ensure(f.at, f.value);
        inputs.push(parseValueInfo(Buffer.from(r.bytes(f.at, f.value))));
      }
      pos = f.next;
    }
    return inputs;
  } catch (err) {
    if (err instanceof MeshError && !err.message.startsWith('cannot read')) throw unreadable(file, err.message);
    throw err;
  } finally {
    await fh.close();
  }
}

/** Every input a tensor with a declared size in every dim. */
export function declaresFixedShapes(inputs: readonly DeclaredInput[]): boolean {
  return inputs.every((i) => i.dims?.every((d) => typeof d === 'number') ?? false);
}
