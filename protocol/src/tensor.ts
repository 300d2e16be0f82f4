/**
 * Tensors on the wire: `{ dtype, shape, data }` with `data` the raw little-endian bytes.
 * Decoding is strict: dtype allow-list, integer dims, an element cap, and
 * `product(shape) × itemsize === data.byteLength`. Received bytes are copied into a fresh,
 * aligned buffer because MQTT payloads often start at offsets a Float32Array cannot view.
 */
import { MeshError } from './errors.ts';

export const DTYPES = {
  float32: { itemBytes: 4, array: Float32Array },
  float64: { itemBytes: 8, array: Float64Array },
  /** IEEE half floats carried as their raw 16-bit patterns, as onnxruntime-node does. */
  float16: { itemBytes: 2, array: Uint16Array },
  int8: { itemBytes: 1, array: Int8Array },
  uint8: { itemBytes: 1, array: Uint8Array },
  int16: { itemBytes: 2, array: Int16Array },
  uint16: { itemBytes: 2, array: Uint16Array },
  int32: { itemBytes: 4, array: Int32Array },
  uint32: { itemBytes: 4, array: Uint32Array },
  int64: { itemBytes: 8, array: BigInt64Array },
  uint64: { itemBytes: 8, array: BigUint64Array },
  bool: { itemBytes: 1, array: Uint8Array },
} as const;

export type DType = keyof typeof DTYPES;
export type TypedArray =
  | Float32Array
  | Float64Array
  | Int8Array
  | Uint8Array
  | Int16Array
  | Uint16Array
  | Int32Array
  | Uint32Array
  | BigInt64Array
  | BigUint64Array;

/** A tensor as apps and agents hold it. */
export interface Tensor {
  dtype: DType;
  shape: number[];
  data: TypedArray;
}

/** A tensor as it travels inside a CBOR envelope. */
export interface WireTensor {
  dtype: string;
  shape: number[];
  data: Uint8Array;
}

export const DEFAULT_MAX_ELEMENTS = 1 << 24;
export const MAX_RANK = 8;

export function isDType(value: unknown): value is DType {
  return typeof value === 'string' && Object.hasOwn(DTYPES, value);
}

/** Number of elements for a shape; rejects negative, fractional and non-finite dims and the element cap. */
export function elementCount(shape: readonly number[], maxElements = DEFAULT_MAX_ELEMENTS): number {
  if (!Array.isArray(shape)) throw new MeshError('MESH_BAD_TENSOR', 'shape must be an array of integers');
  if (shape.length > MAX_RANK) throw new MeshError('MESH_BAD_TENSOR', `rank ${shape.length} exceeds ${MAX_RANK}`);
  let count = 1;
  for (const dim of shape) {
    if (typeof dim !== 'number' || !Number.isSafeInteger(dim) || dim < 0) {
      throw new MeshError('MESH_BAD_TENSOR', `shape dimension ${String(dim)} is not a non-negative integer`);
    }
    count *= dim;
    if (count > maxElements) {
      throw new MeshError('MESH_TOO_LARGE', `tensor of shape [${shape.join(',')}] exceeds ${maxElements} elements`);
    }
  }
  return count;
}

function expectedArray(dtype: DType) {
  return DTYPES[dtype].array;
}

/** Checks a tensor an app built before it is sent; throws MESH_BAD_TENSOR with the reason. */
export function checkTensor(name: string, tensor: Tensor, maxElements = DEFAULT_MAX_ELEMENTS): void {
  if (!isDType(tensor.dtype)) throw new MeshError('MESH_BAD_TENSOR', `input ${name}: dtype ${String(tensor.dtype)} is not supported`);
  const count = elementCount(tensor.shape, maxElements);
  const Ctor = expectedArray(tensor.dtype);
  if (!(tensor.data instanceof Ctor)) {
    throw new MeshError(
      'MESH_BAD_TENSOR',
      `input ${name}: dtype ${tensor.dtype} needs a ${Ctor.name}, got ${tensor.data?.constructor?.name}`,
    );
  }
  if (tensor.data.length !== count) {
    throw new MeshError(
      'MESH_BAD_TENSOR',
      `input ${name}: shape [${tensor.shape.join(',')}] needs ${count} elements, data has ${tensor.data.length}`,
    );
  }
}

/** Zero-copy view of a tensor's bytes for the wire. */
export function encodeTensor(tensor: Tensor): WireTensor {
  const { data } = tensor;
  return { dtype: tensor.dtype, shape: [...tensor.shape], data: new Uint8Array(data.buffer, data.byteOffset, data.byteLength) };
}

/** How a received tensor's bytes become its data. */
export interface DecodeTensorOptions {
  /**
   * Take over a non-empty byte string that owns its whole ArrayBuffer (as each one decodeMessage returns
   * does: the CBOR decoder copies every byte string out of the payload) instead of copying it: the tensor
   * and the wire map then share those bytes, so the wire map must not be used once the tensor's data is
   * written to or its buffer transferred. A byte string that is a view into a larger buffer is still
   * copied, and so is an empty one: cborg answers every empty byte string with one shared array, whose
   * buffer a worker must never be handed (it would be detached for every later message).
   */
  adopt?: boolean;
}

/** Validates a received tensor and copies it into an aligned typed array (see DecodeTensorOptions.adopt). */
export function decodeTensor(
  name: string,
  wire: WireTensor,
  maxElements = DEFAULT_MAX_ELEMENTS,
  { adopt = false }: DecodeTensorOptions = {},
): Tensor {
  if (!isDType(wire.dtype)) throw new MeshError('MESH_BAD_TENSOR', `tensor ${name}: dtype ${JSON.stringify(wire.dtype)} is not supported`);
  const count = elementCount(wire.shape, maxElements);
  const { itemBytes } = DTYPES[wire.dtype];
  if (!(wire.data instanceof Uint8Array)) throw new MeshError('MESH_BAD_TENSOR', `tensor ${name}: data must be a byte string`);
  if (count * itemBytes !== wire.data.byteLength) {
    throw new MeshError(
      'MESH_BAD_TENSOR',
      `tensor ${name}: shape [${wire.shape.join(',')}] × ${itemBytes} bytes = ${count * itemBytes}, data has ${wire.data.byteLength}`,
    );
  }
  const Ctor = expectedArray(wire.dtype);
  const bytes = wire.data;
  // Owning its whole buffer, the byte string starts at offset 0, which every dtype's alignment allows.
  if (
    adopt &&
    bytes.byteLength > 0 &&
    bytes.byteOffset === 0 &&
    bytes.buffer instanceof ArrayBuffer &&
    bytes.buffer.byteLength === bytes.byteLength
  ) {
    return { dtype: wire.dtype, shape: [...wire.shape], data: new Ctor(bytes.buffer) };
  }
  const aligned = new ArrayBuffer(bytes.byteLength);
  new Uint8Array(aligned).set(bytes);
  return { dtype: wire.dtype, shape: [...wire.shape], data: new Ctor(aligned) };
}

export function encodeTensorMap(tensors: Record<string, Tensor>): Record<string, WireTensor> {
  const out: Record<string, WireTensor> = {};
  for (const name of Object.keys(tensors)) out[name] = encodeTensor(tensors[name]!);
  return out;
}

export function decodeTensorMap(
  wire: Record<string, WireTensor>,
  maxElements = DEFAULT_MAX_ELEMENTS,
  options: DecodeTensorOptions = {},
): Record<string, Tensor> {
  const out: Record<string, Tensor> = Object.create(null);
  let total = 0;
  for (const name of Object.keys(wire)) {
    const decoded = decodeTensor(name, wire[name]!, maxElements, options);
    total += decoded.data.length;
    if (total > maxElements) throw new MeshError('MESH_TOO_LARGE', `tensors exceed ${maxElements} elements in total`);
    out[name] = decoded;
  }
  return out;
}

/** Builds a tensor from plain JSON numbers (used by the CLI and, later, the HTTP API). */
export function tensorFromJson(name: string, dtype: unknown, shape: unknown, values: unknown): Tensor {
  if (!isDType(dtype)) throw new MeshError('MESH_BAD_TENSOR', `input ${name}: dtype ${JSON.stringify(dtype)} is not supported`);
  if (!Array.isArray(shape)) throw new MeshError('MESH_BAD_TENSOR', `input ${name}: shape must be an array`);
  const count = elementCount(shape as number[]);
  const flat = Array.isArray(values) ? flatValues(values, count) : [values];
  if (flat.length !== count) {
    throw new MeshError('MESH_BAD_TENSOR', `input ${name}: shape [${shape.join(',')}] needs ${count} values, got ${flat.length}`);
  }
  const Ctor = expectedArray(dtype);
  const data = new Ctor(count);
  if (data instanceof BigInt64Array || data instanceof BigUint64Array) {
    for (let i = 0; i < count; i++) {
      const v = flat[i];
      if (typeof v !== 'number' && typeof v !== 'bigint' && typeof v !== 'string')
        throw new MeshError('MESH_BAD_TENSOR', `input ${name}: value ${i} is not an integer`);
      try {
        data[i] = BigInt(v);
      } catch (err) {
        // BigInt(1.5), BigInt(Infinity) (JSON's 1e400), BigInt('x').
        throw new MeshError('MESH_BAD_TENSOR', `input ${name}: value ${i} (${String(v)}) is not an integer`, { cause: err });
      }
    }
  } else {
    // One branch for the whole array, not per value: an OCR image is 300,000 values.
    const out = data as Exclude<typeof data, BigInt64Array | BigUint64Array>;
    for (let i = 0; i < count; i++) {
      const v = flat[i];
      let x: number;
      if (typeof v === 'number') x = v;
      else if (typeof v === 'boolean') x = v ? 1 : 0;
      else throw new MeshError('MESH_BAD_TENSOR', `input ${name}: value ${i} is not a number`);
      out[i] = x;
      // JSON has no Infinity or NaN: a value like 1e400 parses as Infinity, and 1e39 overflows a float32. Either
      // would run the model on a value the sender never wrote and answer null (issue 13).
      if (!Number.isFinite(x) || !Number.isFinite(out[i]))
        throw new MeshError('MESH_BAD_TENSOR', `input ${name}: value ${i} (${String(v)}) is out of range for ${dtype}`);
    }
  }
  return { dtype, shape: [...(shape as number[])], data };
}

/** The values of a JSON tensor in row-major order: as they are when already flat, else flattened (nested rows). */
function flatValues(values: unknown[], count: number): unknown[] {
  return values.length === count && !values.some(Array.isArray) ? values : values.flat(Number.POSITIVE_INFINITY);
}

/** Plain JSON view of a tensor (int64 values as numbers when safe, else strings). */
export function tensorToJson(tensor: Tensor): { dtype: DType; shape: number[]; data: (number | string)[] } {
  const source = tensor.data;
  if (!(source instanceof BigInt64Array || source instanceof BigUint64Array)) {
    return { dtype: tensor.dtype, shape: [...tensor.shape], data: Array.from(source as ArrayLike<number>) };
  }
  const data: (number | string)[] = [];
  for (const v of source)
    data.push(v >= BigInt(Number.MIN_SAFE_INTEGER) && v <= BigInt(Number.MAX_SAFE_INTEGER) ? Number(v) : v.toString());
  return { dtype: tensor.dtype, shape: [...tensor.shape], data };
}
