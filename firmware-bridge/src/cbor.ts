/**
 * The CBOR subset that frame bodies use (RFC 8949, definite lengths only), written by hand so the
 * bytes are exactly what the C client writes and reads: unsigned and negative integers, byte and
 * text strings, arrays, maps with unsigned integer keys, floats, true/false/null, and the RFC 8746
 * typed-array tags on byte strings.
 *
 * The decoder is a bounded parser for hostile input: it refuses indefinite lengths, nesting deeper
 * than MAX_DEPTH, more than MAX_ITEMS items in one body, lengths past the end of the input, integers
 * above 2^53 and unknown tags, before allocating anything for them. So a CBOR bomb (a huge declared
 * length, a deep nest, a million tiny items) costs a few comparisons.
 */
import { MeshError } from '@edge-mesh/protocol';

/**
 * A body the decoder refuses: MESH_BAD_REQUEST with `details.cbor`, so the bridge can tell a decode refusal (whose
 * message it sends back to the device) from anything else.
 */
export function cborError(message: string): MeshError {
  return new MeshError('MESH_BAD_REQUEST', message, { details: { cbor: true } });
}

/** Whether `err` is a refusal from the CBOR decoder. */
export function isCborError(err: unknown): err is MeshError {
  return err instanceof MeshError && err.details?.cbor === true;
}

/** A tagged byte string: RFC 8746 typed arrays (tag 77 = int16 little-endian, 85 = float32 LE, …). */
export interface Tagged {
  tag: number;
  bytes: Uint8Array;
}

export type CborValue = number | string | boolean | null | Uint8Array | Tagged | CborValue[] | CborMap;
export type CborMap = Map<number, CborValue>;

export const MAX_DEPTH = 4;
export const MAX_ITEMS = 512;

/** RFC 8746 typed-array tags the bridge reads, with their element size and reader. */
export const TYPED_ARRAY_TAGS = {
  64: { name: 'uint8', size: 1 },
  72: { name: 'int8', size: 1 },
  69: { name: 'uint16le', size: 2 },
  77: { name: 'int16le', size: 2 },
  78: { name: 'int32le', size: 4 },
  85: { name: 'float32le', size: 4 },
} as const;
export type TypedArrayTag = keyof typeof TYPED_ARRAY_TAGS;

export function isTypedArrayTag(tag: number): tag is TypedArrayTag {
  return Object.hasOwn(TYPED_ARRAY_TAGS, tag);
}

// ---------------------------------------------------------------- encoder

class Writer {
  buf = Buffer.allocUnsafe(256);
  n = 0;
  reserve(k: number) {
    if (this.n + k <= this.buf.length) return;
    let size = this.buf.length * 2;
    while (size < this.n + k) size *= 2;
    const next = Buffer.allocUnsafe(size);
    this.buf.copy(next, 0, 0, this.n);
    this.buf = next;
  }
  head(major: number, value: number) {
    this.reserve(9);
    const m = major << 5;
    if (value < 24) this.buf[this.n++] = m | value;
    else if (value < 0x100) {
      this.buf[this.n++] = m | 24;
      this.buf[this.n++] = value;
    } else if (value < 0x10000) {
      this.buf[this.n++] = m | 25;
      this.buf.writeUInt16BE(value, this.n);
      this.n += 2;
    } else if (value < 0x100000000) {
      this.buf[this.n++] = m | 26;
      this.buf.writeUInt32BE(value, this.n);
      this.n += 4;
    } else {
      this.buf[this.n++] = m | 27;
      this.buf.writeBigUInt64BE(BigInt(value), this.n);
      this.n += 8;
    }
  }
  bytes(b: Uint8Array) {
    this.reserve(b.byteLength);
    this.buf.set(b, this.n);
    this.n += b.byteLength;
  }
}

/** Floats are written as float32 when that is exact, else float64 (the C client reads both). */
function writeValue(w: Writer, v: CborValue): void {
  if (typeof v === 'number') {
    if (Number.isInteger(v) && Math.abs(v) <= Number.MAX_SAFE_INTEGER) {
      if (v >= 0) w.head(0, v);
      else w.head(1, -1 - v);
    } else if (Math.fround(v) === v || Number.isNaN(v)) {
      w.reserve(5);
      w.buf[w.n++] = 0xfa;
      w.buf.writeFloatBE(v, w.n);
      w.n += 4;
    } else {
      w.reserve(9);
      w.buf[w.n++] = 0xfb;
      w.buf.writeDoubleBE(v, w.n);
      w.n += 8;
    }
  } else if (typeof v === 'string') {
    const b = Buffer.from(v, 'utf8');
    w.head(3, b.byteLength);
    w.bytes(b);
  } else if (v === false || v === true || v === null) {
    w.reserve(1);
    w.buf[w.n++] = v === null ? 0xf6 : v ? 0xf5 : 0xf4;
  } else if (v instanceof Uint8Array) {
    w.head(2, v.byteLength);
    w.bytes(v);
  } else if (Array.isArray(v)) {
    w.head(4, v.length);
    for (const item of v) writeValue(w, item);
  } else if (v instanceof Map) {
    w.head(5, v.size);
    for (const [k, item] of v) {
      if (!Number.isInteger(k) || k < 0) throw cborError('map keys must be unsigned integers');
      w.head(0, k);
      writeValue(w, item);
    }
  } else {
    w.head(6, v.tag);
    w.head(2, v.bytes.byteLength);
    w.bytes(v.bytes);
  }
}

export function encodeCbor(value: CborValue): Buffer {
  const w = new Writer();
  writeValue(w, value);
  return w.buf.subarray(0, w.n);
}

/** A map from `[key, value]` pairs, skipping undefined values. */
export function cborMap(entries: [number, CborValue | undefined][]): CborMap {
  const m: CborMap = new Map();
  for (const [k, v] of entries) if (v !== undefined) m.set(k, v);
  return m;
}

// ---------------------------------------------------------------- decoder

interface Cursor {
  b: Uint8Array;
  dv: DataView;
  p: number;
  items: number;
}

function need(c: Cursor, k: number): void {
  if (k > c.b.byteLength - c.p) throw cborError('truncated');
}

/** Reads the argument of a head whose first byte was `ib`; returns a JS number (<= 2^53). */
function readArg(c: Cursor, info: number): number {
  if (info < 24) return info;
  switch (info) {
    case 24:
      need(c, 1);
      return c.b[c.p++]!;
    case 25: {
      need(c, 2);
      const v = c.dv.getUint16(c.p);
      c.p += 2;
      return v;
    }
    case 26: {
      need(c, 4);
      const v = c.dv.getUint32(c.p);
      c.p += 4;
      return v;
    }
    case 27: {
      need(c, 8);
      const v = c.dv.getBigUint64(c.p);
      c.p += 8;
      if (v > BigInt(Number.MAX_SAFE_INTEGER)) throw cborError('integer too large');
      return Number(v);
    }
    default:
      throw cborError(info === 31 ? 'indefinite lengths are not allowed' : 'reserved additional info');
  }
}

function halfToFloat(h: number): number {
  const s = h & 0x8000 ? -1 : 1;
  const e = (h >> 10) & 0x1f;
  const f = h & 0x3ff;
  if (e === 0) return s * f * 2 ** -24;
  if (e === 31) return f ? NaN : s * Infinity;
  return s * (1 + f / 1024) * 2 ** (e - 15);
}

const utf8 = new TextDecoder('utf-8', { fatal: true });

function readValue(c: Cursor, depth: number): CborValue {
  if (++c.items > MAX_ITEMS) throw cborError('too many items');
  need(c, 1);
  const ib = c.b[c.p++]!;
  const major = ib >> 5;
  const info = ib & 0x1f;
  switch (major) {
    case 0:
      return readArg(c, info);
    case 1:
      return -1 - readArg(c, info);
    case 2:
    case 3: {
      const len = readArg(c, info);
      need(c, len);
      const bytes = c.b.subarray(c.p, c.p + len);
      c.p += len;
      if (major === 2) return bytes;
      try {
        return utf8.decode(bytes);
      } catch {
        throw cborError('text is not UTF-8');
      }
    }
    case 4: {
      if (depth >= MAX_DEPTH) throw cborError('nested too deep');
      const len = readArg(c, info);
      // Every item takes at least one byte: a declared length past the input is refused up front.
      need(c, len);
      if (len > MAX_ITEMS) throw cborError('too many items');
      const out: CborValue[] = [];
      for (let i = 0; i < len; i++) out.push(readValue(c, depth + 1));
      return out;
    }
    case 5: {
      if (depth >= MAX_DEPTH) throw cborError('nested too deep');
      const len = readArg(c, info);
      need(c, len * 2);
      if (len > MAX_ITEMS) throw cborError('too many items');
      const out: CborMap = new Map();
      for (let i = 0; i < len; i++) {
        need(c, 1);
        if (c.b[c.p]! >> 5 !== 0) throw cborError('map keys must be unsigned integers');
        const key = readValue(c, depth + 1) as number;
        if (out.has(key)) throw cborError('duplicate map key');
        out.set(key, readValue(c, depth + 1));
      }
      return out;
    }
    case 6: {
      const tag = readArg(c, info);
      if (!isTypedArrayTag(tag)) throw cborError(`unsupported tag ${tag}`);
      need(c, 1);
      if (c.b[c.p]! >> 5 !== 2) throw cborError('a typed-array tag must wrap a byte string');
      const bytes = readValue(c, depth + 1) as Uint8Array;
      if (bytes.byteLength % TYPED_ARRAY_TAGS[tag].size !== 0) throw cborError('typed array length is not a multiple of its element size');
      return { tag, bytes };
    }
    default: {
      if (info === 20) return false;
      if (info === 21) return true;
      if (info === 22) return null;
      if (info === 25) {
        need(c, 2);
        const v = halfToFloat(c.dv.getUint16(c.p));
        c.p += 2;
        return v;
      }
      if (info === 26) {
        need(c, 4);
        const v = c.dv.getFloat32(c.p);
        c.p += 4;
        return v;
      }
      if (info === 27) {
        need(c, 8);
        const v = c.dv.getFloat64(c.p);
        c.p += 8;
        return v;
      }
      throw cborError('unsupported simple value');
    }
  }
}

/** Decodes exactly one item filling `bytes`, or throws CborError. Byte strings are views into `bytes`. */
export function decodeCbor(bytes: Uint8Array): CborValue {
  const c: Cursor = { b: bytes, dv: new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength), p: 0, items: 0 };
  const v = readValue(c, 0);
  if (c.p !== bytes.byteLength) throw cborError('trailing bytes after the body');
  return v;
}
