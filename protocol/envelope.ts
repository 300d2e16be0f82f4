/**
 * The CBOR envelope. One encoder configuration for the whole mesh: no cbor-x record extensions
 * and byte strings for tensor data, so any RFC 8949 decoder (including a small C one) reads it.
 */
import { randomFillSync } from 'node:crypto';
import { Encoder } from 'cbor-x';
import { MeshError } from './errors.ts';
import { checkers, type Message, type MessageKind } from './messages.ts';

const cbor = new Encoder({ useRecords: false, mapsAsObjects: true, tagUint8Array: false, useFloat32: 0 });

export const DEFAULT_MAX_MESSAGE_BYTES = 4 * 1024 * 1024;

export function encodeMessage(message: Message): Buffer {
  return cbor.encode(message);
}

/** Plain CBOR decode with the mesh's decoder, for records that carry their own schema check. */
export function decodeCbor(bytes: Uint8Array): unknown {
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
  const checker = checkers[kind as K];
  if (!checker.Check(value)) {
    const first = checker.Errors(value).First();
    const where = first ? `${first.path || '/'}: ${first.message}` : 'schema mismatch';
    throw new MeshError('MESH_BAD_REQUEST', `invalid ${kind} message at ${where}`, details ? { details } : {});
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
