/**
 * The envelope's encoder for the values messages are made of, writing straight into one reused buffer.
 *
 * cborg writes token-free only when it sorts map keys (its `directEncode` in cborg/lib/encode.js takes
 * the direct path for objects only when `mapSorter` is its own sorter). The mesh keeps keys in the order
 * they were written (envelope.ts), which sends cborg down its token path: a token object per item, a
 * fresh byte array per map key and per float, then a pass over the tokens. On the agent's request path
 * that was about a quarter of what it allocated per request, and the collections it caused.
 *
 * This writes the same bytes as cborg does with the envelope's options (every float as 64 bits, safe
 * integers in their shortest form, maps in key order, `undefined` as simple value 23) for null,
 * booleans, numbers, strings, byte arrays (Uint8Array and Buffer), arrays and plain objects. Anything
 * else (a Map, a bigint, another typed array, a subclass or class instance, an object with its own
 * iterator or type tag, nesting past MAX_DEPTH, which is also how a cycle shows, a value encoded from a
 * getter while another is written) returns `undefined`, and the caller hands the value to cborg, which
 * encodes or refuses it as before. One difference stays: a getter that changes a value already written
 * changes cborg's bytes (it reads everything before it writes) and not these. test/cbor.test.ts checks
 * the bytes against cborg's over random values.
 */

/** Deeper than any mesh message; past it cborg takes the value (and refuses a cycle). */
const MAX_DEPTH = 32;
const INITIAL_BYTES = 64 * 1024;
/** A buffer grown past this for one large value is dropped after it, so one big tensor does not pin memory. */
const KEEP_BYTES = 1024 * 1024;

let out = Buffer.allocUnsafe(INITIAL_BYTES);
let pos = 0;

/** Thrown inside the writer for a value it leaves to cborg; never leaves this module. */
const UNSUPPORTED = Symbol('unsupported');

function reserve(bytes: number): void {
  if (pos + bytes <= out.length) return;
  const grown = Buffer.allocUnsafe(Math.max(out.length * 2, pos + bytes));
  out.copy(grown, 0, 0, pos);
  out = grown;
}

/** A CBOR head: the major type and its argument in the shortest form (RFC 8949, section 3). */
function head(major: number, n: number): void {
  reserve(9);
  const m = major << 5;
  if (n < 24) out[pos++] = m | n;
  else if (n < 0x100) {
    out[pos++] = m | 24;
    out[pos++] = n;
  } else if (n < 0x10000) {
    out[pos++] = m | 25;
    out.writeUInt16BE(n, pos);
    pos += 2;
  } else if (n < 0x100000000) {
    out[pos++] = m | 26;
    out.writeUInt32BE(n, pos);
    pos += 4;
  } else {
    out[pos++] = m | 27;
    out.writeUInt32BE(Math.floor(n / 0x100000000), pos);
    out.writeUInt32BE(n >>> 0, pos + 4);
    pos += 8;
  }
}

function writeString(s: string): void {
  const length = s.length;
  if (length < 24) {
    // Short strings (every map key): ASCII copied by hand, without a byte-length pass.
    reserve(1 + length);
    let i = 0;
    for (; i < length; i++) {
      const c = s.charCodeAt(i);
      if (c >= 0x80) break;
      out[pos + 1 + i] = c;
    }
    if (i === length) {
      out[pos] = 0x60 | length;
      pos += 1 + length;
      return;
    }
  }
  const bytes = Buffer.byteLength(s, 'utf8');
  head(3, bytes);
  reserve(bytes);
  pos += out.write(s, pos, bytes, 'utf8');
}

function writeValue(value: unknown, depth: number): void {
  switch (typeof value) {
    case 'number':
      if (Number.isSafeInteger(value)) {
        if (value >= 0) head(0, value);
        else head(1, -value - 1);
      } else {
        reserve(9);
        out[pos] = 0xfb;
        out.writeDoubleBE(value, pos + 1);
        pos += 9;
      }
      return;
    case 'string':
      writeString(value);
      return;
    case 'boolean':
      reserve(1);
      out[pos++] = value ? 0xf5 : 0xf4;
      return;
    case 'undefined':
      reserve(1);
      out[pos++] = 0xf7;
      return;
    case 'object':
      break;
    default:
      throw UNSUPPORTED;
  }
  if (value === null) {
    reserve(1);
    out[pos++] = 0xf6;
    return;
  }
  if (depth >= MAX_DEPTH) throw UNSUPPORTED;
  const proto = Object.getPrototypeOf(value);
  if (proto === Uint8Array.prototype || proto === Buffer.prototype) {
    const bytes = value as Uint8Array;
    // cborg writes `length`; an own `length` that disagrees with the bytes is for cborg to write.
    if (bytes.length !== bytes.byteLength) throw UNSUPPORTED;
    head(2, bytes.byteLength);
    reserve(bytes.byteLength);
    out.set(bytes, pos);
    pos += bytes.byteLength;
    return;
  }
  if (proto === Array.prototype) {
    // cborg walks an array with for…of: an array with an iterator of its own is for cborg to walk.
    const items = value as unknown[];
    if (Object.hasOwn(items, Symbol.iterator)) throw UNSUPPORTED;
    const length = items.length;
    head(4, length);
    for (let i = 0; i < length; i++) writeValue(items[i], depth + 1);
    return;
  }
  if (proto !== Object.prototype && proto !== null) throw UNSUPPORTED;
  const record = value as Record<string | symbol, unknown>;
  // cborg names a type by its tag when the object has one (cborg/lib/is.js): such an object is for cborg.
  if (Symbol.toStringTag in record) throw UNSUPPORTED;
  const keys = Object.keys(record);
  head(5, keys.length);
  for (let i = 0; i < keys.length; i++) {
    const key = keys[i]!;
    writeString(key);
    writeValue(record[key], depth + 1);
  }
}

/** Set while a value is being written: a getter that encodes another value in the middle leaves that one to cborg. */
let busy = false;

/** The value's CBOR bytes in a Buffer of their own, or undefined for a value to leave to cborg. */
export function encodeDirect(value: unknown): Buffer | undefined {
  if (busy) return undefined;
  busy = true;
  pos = 0;
  try {
    writeValue(value, 0);
  } catch (err) {
    if (out.length > KEEP_BYTES) out = Buffer.allocUnsafe(INITIAL_BYTES);
    if (err === UNSUPPORTED) return undefined;
    throw err;
  } finally {
    busy = false;
  }
  if (out.length > KEEP_BYTES) {
    // Grown for this value alone: at least half of it is the result, and the next message starts small again.
    const grown = out;
    out = Buffer.allocUnsafe(INITIAL_BYTES);
    if (pos * 2 >= grown.length) return grown.subarray(0, pos);
    const result = Buffer.allocUnsafe(pos);
    grown.copy(result, 0, 0, pos);
    return result;
  }
  const result = Buffer.allocUnsafe(pos);
  out.copy(result, 0, 0, pos);
  return result;
}
