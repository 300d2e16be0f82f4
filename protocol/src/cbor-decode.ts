/**
 * The envelope's reader for the common shape of a message, with cborg behind it for everything else.
 *
 * cborg decodes through a token per item and builds every map key afresh (cborg/lib/decode.js,
 * tokenToMap); on the agent's request path the key strings alone were about a tenth of what a request
 * allocated. This reads definite-length maps with text keys, arrays, byte strings, ASCII text (short
 * strings, map keys above all, come from a small cache instead of being built each time), safe
 * integers, 64-bit floats, booleans, null and undefined, straight from the bytes.
 *
 * It never decides alone what cborg would refuse: at anything outside that subset (a tag, an
 * indefinite length, a 16- or 32-bit float, an integer from 2^53 − 2^32 on, non-ASCII text, a non-text
 * or repeated map key, `__proto__`, more than EMPTY_BYTE_STRINGS empty byte strings, truncated or
 * trailing bytes) it gives up and the caller decodes the
 * payload with cborg, which returns the value or the error it always did. Byte strings come back as
 * cborg returns them: a plain Uint8Array copy of their own, which the agent may hand to a worker.
 * test/cbor.test.ts compares both readers over random and mutated payloads.
 */
import { isAscii } from 'node:buffer';

/** Returned for a payload this reader leaves to cborg. */
export const LEAVE_TO_CBORG = Symbol('leave to cborg');

const MAX_DEPTH = 64;
const CACHED_STRING_BYTES = 32;
const CACHE_LIMIT = 2048;
/**
 * Empty byte strings a payload may have before it is left to cborg. Each one here is an ArrayBuffer of
 * its own (a tensor may take it over, tensor.ts), where cborg hands out one shared array: a payload of
 * nothing else (4 MiB of them) would cost seconds and most of a gigabyte here, 0.25 s with cborg.
 */
const EMPTY_BYTE_STRINGS = 256;

/** Short ASCII strings by a hash of their bytes, each checked against the bytes before it is used. */
const strings = new Map<number, string>();

const EMPTY = new Uint8Array(0);
const EMPTY_VIEW = new DataView(EMPTY.buffer);
let data: Uint8Array = EMPTY;
let view: DataView = EMPTY_VIEW;
let pos = 0;
let emptyLeft = EMPTY_BYTE_STRINGS;

/** Thrown inside the reader for a payload it leaves to cborg; never leaves this module. */
const GIVE_UP = Symbol('give up');

function argument(info: number): number {
  if (info < 24) return info;
  let n: number;
  switch (info) {
    case 24:
      if (pos + 1 > data.length) throw GIVE_UP;
      n = data[pos]!;
      pos += 1;
      return n;
    case 25:
      if (pos + 2 > data.length) throw GIVE_UP;
      n = view.getUint16(pos);
      pos += 2;
      return n;
    case 26:
      if (pos + 4 > data.length) throw GIVE_UP;
      n = view.getUint32(pos);
      pos += 4;
      return n;
    case 27: {
      if (pos + 8 > data.length) throw GIVE_UP;
      const high = view.getUint32(pos);
      // From 2^53 - 2^32 on, short of where cborg answers with a bigint (or a negative past the safe range), cborg decides.
      if (high >= 0x1fffff) throw GIVE_UP;
      n = high * 0x100000000 + view.getUint32(pos + 4);
      pos += 8;
      return n;
    }
    default:
      throw GIVE_UP;
  }
}

function ascii(start: number, length: number): string {
  if (length <= CACHED_STRING_BYTES) {
    let hash = 0x811c9dc5 ^ length;
    for (let i = start; i < start + length; i++) {
      const c = data[i]!;
      if (c >= 0x80) throw GIVE_UP;
      hash = Math.imul(hash ^ c, 0x01000193);
    }
    const cached = strings.get(hash);
    if (cached !== undefined && cached.length === length) {
      let same = true;
      for (let i = 0; i < length; i++) {
        if (cached.charCodeAt(i) !== data[start + i]) {
          same = false;
          break;
        }
      }
      if (same) return cached;
    }
    const s = String.fromCharCode.apply(null, data.subarray(start, start + length) as unknown as number[]);
    if (strings.size >= CACHE_LIMIT) strings.clear();
    strings.set(hash, s);
    return s;
  }
  const text = Buffer.from(data.buffer, data.byteOffset + start, length);
  if (!isAscii(text)) throw GIVE_UP;
  return text.toString('latin1');
}

/** A text string whose head's additional information is `info` (the head byte read): its length, then its ASCII. */
function readText(info: number): string {
  const length = argument(info);
  if (pos + length > data.length) throw GIVE_UP;
  const s = ascii(pos, length);
  pos += length;
  return s;
}

function readValue(depth: number): unknown {
  if (pos >= data.length || depth > MAX_DEPTH) throw GIVE_UP;
  const initial = data[pos++]!;
  const major = initial >> 5;
  const info = initial & 31;
  switch (major) {
    case 0:
      return argument(info);
    case 1:
      return -1 - argument(info);
    case 2: {
      const length = argument(info);
      if (pos + length > data.length) throw GIVE_UP;
      if (length === 0 && --emptyLeft < 0) throw GIVE_UP;
      // A copy of its own, as cborg gives (it reads a Buffer as a plain Uint8Array and slices that).
      const bytes = new Uint8Array(length);
      bytes.set(data.subarray(pos, pos + length));
      pos += length;
      return bytes;
    }
    case 3:
      return readText(info);
    case 4: {
      const length = argument(info);
      // Each item takes a byte at least: a larger count is a lie cborg gets to refuse.
      if (length > data.length - pos) throw GIVE_UP;
      const items = new Array<unknown>(length);
      for (let i = 0; i < length; i++) items[i] = readValue(depth + 1);
      return items;
    }
    case 5: {
      const length = argument(info);
      if (length * 2 > data.length - pos) throw GIVE_UP;
      const record: Record<string, unknown> = {};
      for (let i = 0; i < length; i++) {
        if (pos >= data.length || data[pos]! >> 5 !== 3) throw GIVE_UP;
        const key = readText(data[pos++]! & 31);
        if (key === '__proto__' || Object.hasOwn(record, key)) throw GIVE_UP;
        record[key] = readValue(depth + 1);
      }
      return record;
    }
    case 7:
      switch (info) {
        case 20:
          return false;
        case 21:
          return true;
        case 22:
          return null;
        case 23:
          return undefined;
        case 27: {
          if (pos + 8 > data.length) throw GIVE_UP;
          const f = view.getFloat64(pos);
          pos += 8;
          return f;
        }
        default:
          throw GIVE_UP;
      }
    default:
      throw GIVE_UP;
  }
}

/** The payload's value, or LEAVE_TO_CBORG when cborg must decide (see the file comment). */
export function decodeDirect(bytes: Uint8Array): unknown {
  // What cborg refuses (not a Uint8Array) or answers in kind (a subclass's byte strings are of that subclass) is its own.
  const proto = Object.getPrototypeOf(bytes);
  if (proto !== Uint8Array.prototype && proto !== Buffer.prototype) return LEAVE_TO_CBORG;
  emptyLeft = EMPTY_BYTE_STRINGS;
  data = bytes;
  view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  pos = 0;
  try {
    const value = readValue(0);
    return pos === bytes.length ? value : LEAVE_TO_CBORG;
  } catch (err) {
    if (err === GIVE_UP) return LEAVE_TO_CBORG;
    throw err;
  } finally {
    // The payload is not kept alive by the reader.
    data = EMPTY;
    view = EMPTY_VIEW;
  }
}
