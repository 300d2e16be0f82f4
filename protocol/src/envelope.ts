/**
 * The CBOR envelope (RFC 8949). One codec configuration for the whole mesh: maps with text keys in
 * the order they were written, byte strings for tensor data and ids, every float as 64 bits, no tags,
 * so any decoder (a small C one included) reads it. cborg is pure JavaScript, so nothing here needs a
 * native addon (docs/protocol.md, "Envelope").
 */
import { randomFillSync } from 'node:crypto';
import { decode as cborDecode, encode as cborEncode, type DecodeOptions, type EncodeOptions } from 'cborg';
import { decodeDirect, LEAVE_TO_CBORG } from './cbor-decode.ts';
import { encodeDirect } from './cbor-encode.ts';
import { MeshError } from './errors.ts';
import { checkers, type Message, type MessageKind } from './messages.ts';
import { firstError, type Validator } from './validate.ts';

// No map sorting: a signed record is verified over the bytes its signer encoded, and sorting costs time.
const ENCODE: EncodeOptions = { float64: true, mapSorter: undefined };
// Text-keyed maps only, and a key twice is refused: two readers must never see two different messages.
const DECODE: DecodeOptions = { useMaps: false, rejectDuplicateMapKeys: true };

const toBuffer = (bytes: Uint8Array): Buffer => Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength);
const cbor = {
  // The envelope's own writer for the values messages are made of, cborg for anything else (cbor-encode.ts).
  encode: (value: unknown): Buffer => encodeDirect(value) ?? toBuffer(cborEncode(value, ENCODE)),
  // The common shape of a message read directly; cborg decides everything else (cbor-decode.ts).
  decode: (bytes: Uint8Array): unknown => {
    const value = decodeDirect(bytes);
    return value === LEAVE_TO_CBORG ? cborDecode(bytes, DECODE) : value;
  },
};

export const DEFAULT_MAX_MESSAGE_BYTES = 4 * 1024 * 1024;
/** No mesh message nests deeper than about 6; a deeper one is refused before the recursive decoder sees it. */
export const MAX_CBOR_DEPTH = 16;

/**
 * Walks the CBOR item heads without building any value and reports whether containers (arrays,
 * maps, tags, indefinite strings) nest deeper than `maxDepth`. Linear in the number of heads, with
 * no allocation per item: a payload of nested arrays fails here in microseconds instead of running
 * the recursive decoder into a stack overflow.
 */
export function cborNestsDeeper(bytes: Uint8Array, maxDepth = MAX_CBOR_DEPTH): boolean {
  // remaining[i]: items still expected by the container at depth i (Infinity for indefinite ones).
  const remaining: number[] = [];
  let pos = 0;
  const end = bytes.length;
  while (pos < end) {
    const head = bytes[pos++]!;
    const major = head >> 5;
    const info = head & 31;
    if (head === 0xff) {
      // Break: closes the innermost indefinite container.
      if (remaining.length === 0 || remaining[remaining.length - 1] !== Infinity) return false;
      remaining.pop();
    } else {
      let arg = info;
      if (info >= 24 && info <= 27) {
        const width = 1 << (info - 24);
        if (pos + width > end) return false;
        arg = 0;
        for (let k = 0; k < width; k++) arg = arg * 256 + bytes[pos + k]!;
        pos += width;
      } else if (info >= 28 && info <= 30) return false;
      const indefinite = info === 31;
      let opens = 0;
      if (major === 2 || major === 3) {
        if (indefinite) opens = Infinity;
        else pos += arg;
      } else if (major === 4) opens = indefinite ? Infinity : arg;
      else if (major === 5) opens = indefinite ? Infinity : arg * 2;
      else if (major === 6) opens = 1;
      if (opens > 0) {
        // This item is one of its parent's; the parent's count drops once its last child closes.
        remaining.push(opens);
        if (remaining.length > maxDepth) return true;
        continue;
      }
    }
    // An item finished: count it against its parent, closing every container it completes.
    while (remaining.length > 0) {
      const top = remaining.length - 1;
      if (remaining[top] === Infinity) break;
      remaining[top]!--;
      if (remaining[top]! > 0) break;
      remaining.pop();
    }
  }
  return false;
}

export function encodeMessage(message: Message): Buffer {
  return cbor.encode(message);
}

/** Plain CBOR encode with the mesh's encoder, for records outside the message union (signed records, admin acks). */
export function encodeCbor(value: unknown): Buffer {
  return cbor.encode(value);
}

/** Plain CBOR decode with the mesh's decoder, for records that carry their own schema check. */
export function decodeCbor(bytes: Uint8Array): unknown {
  if (cborNestsDeeper(bytes)) throw new MeshError('MESH_BAD_REQUEST', `CBOR nests deeper than ${MAX_CBOR_DEPTH} levels`);
  return cbor.decode(bytes);
}

type MessageOf<K extends MessageKind> = Extract<Message, { kind: K }>;

/**
 * Decodes and validates a payload as one of the expected kinds. Throws MESH_TOO_LARGE before
 * decoding an oversized payload and MESH_BAD_REQUEST for anything malformed; when a request id
 * can still be read, it is in `details.id` so the receiver can answer the sender.
 */
export function decodeMessage<K extends MessageKind>(
  payload: Uint8Array,
  expected: readonly K[],
  maxBytes = DEFAULT_MAX_MESSAGE_BYTES,
): MessageOf<K> {
  if (payload.byteLength > maxBytes) {
    throw new MeshError('MESH_TOO_LARGE', `message of ${payload.byteLength} bytes exceeds ${maxBytes}`);
  }
  if (cborNestsDeeper(payload)) throw new MeshError('MESH_BAD_REQUEST', `payload nests deeper than ${MAX_CBOR_DEPTH} levels`);
  let value: unknown;
  try {
    value = cbor.decode(payload);
  } catch (cause) {
    // Deep nesting surfaces as a RangeError from the recursive decoder; huge declared lengths as Errors.
    throw new MeshError('MESH_BAD_REQUEST', 'payload is not valid CBOR', { cause });
  }
  if (typeof value !== 'object' || value === null) throw new MeshError('MESH_BAD_REQUEST', 'payload is not a CBOR map');
  const kind = (value as { kind?: unknown }).kind;
  const id = (value as { id?: unknown }).id;
  const details = id instanceof Uint8Array && id.byteLength === 16 ? { id } : undefined;
  if (typeof kind !== 'string' || !(expected as readonly string[]).includes(kind)) {
    throw new MeshError('MESH_BAD_REQUEST', `unexpected message kind ${JSON.stringify(kind)}`, details ? { details } : {});
  }
  const checker: Validator<unknown> = checkers[kind as K];
  if (!checker.Check(value)) {
    // Only a refused message loads TypeBox, to say what is wrong with it (validate.ts).
    throw new MeshError('MESH_BAD_REQUEST', `invalid ${kind} message at ${firstError(checker, value)}`, details ? { details } : {});
  }
  return value as MessageOf<K>;
}

/** Request ids come from a pooled buffer of random bytes: 16 fresh bytes per id, one syscall per 256 ids. */
const pool = Buffer.alloc(16 * 256);
let poolOffset = pool.length;

export function newRequestId(): Uint8Array {
  if (poolOffset >= pool.length) {
    randomFillSync(pool);
    poolOffset = 0;
  }
  const id = new Uint8Array(16);
  id.set(pool.subarray(poolOffset, poolOffset + 16));
  poolOffset += 16;
  return id;
}

export function requestIdHex(id: Uint8Array): string {
  return Buffer.from(id.buffer, id.byteOffset, id.byteLength).toString('hex');
}
