/**
 * Identity: every participant holds an Ed25519 key and its mesh id derives from the public key, so
 * an id cannot be claimed without the key. Signing uses node:crypto (about 10x @noble/ed25519 here;
 * the bytes are the same RFC 8032 signatures, which a test checks).
 *
 *   id = `${role}-${base32(sha256(publicKey))[0..26]}`     e.g. agent-k3v9q0c2m7x4t8b1n6r5d0f2zh
 */
import {
  createHash,
  createPrivateKey,
  createPublicKey,
  type KeyObject,
  sign as nodeSign,
  verify as nodeVerify,
  randomBytes,
} from 'node:crypto';
import { PROTOCOL_VERSION, ROLES, type Role } from './constants.ts';
import { decodeCbor, encodeMessage } from './envelope.ts';
import { MeshError } from './errors.ts';
import type { AgentStatus } from './messages.ts';
import type { Admission, KeyFile, Revocation, SignedRecord } from './schemas.ts';
import { checkAdmission, checkKeyFile, checkRevocation, checkSignedRecord } from './validators.generated.ts';

export { ROLES, type Role } from './constants.ts';
export type { Admission, Revocation, SignedRecord } from './schemas.ts';

export function isRole(value: unknown): value is Role {
  return typeof value === 'string' && (ROLES as readonly string[]).includes(value);
}

export interface Identity {
  role: Role;
  id: string;
  /** Raw 32-byte Ed25519 public key. */
  publicKey: Uint8Array;
  /** Raw 32-byte Ed25519 seed; never logged. */
  seed: Uint8Array;
  privateKey: KeyObject;
}

const BASE32 = 'abcdefghijklmnopqrstuvwxyz234567';
const ID_HASH_CHARS = 26;
// DER prefixes that wrap a raw 32-byte key as SPKI (public) and PKCS#8 (private) for node:crypto.
const SPKI_PREFIX = Buffer.from('302a300506032b6570032100', 'hex');
const PKCS8_PREFIX = Buffer.from('302e020100300506032b657004220420', 'hex');

function base32(bytes: Uint8Array): string {
  let out = '';
  let bits = 0;
  let value = 0;
  for (const byte of bytes) {
    value = (value << 8) | byte;
    bits += 8;
    while (bits >= 5) {
      out += BASE32[(value >>> (bits - 5)) & 31];
      bits -= 5;
    }
  }
  return out;
}

/** The mesh id of a public key in a role: 130 bits of its sha256, so ids cannot be squatted. */
export function deriveId(role: Role, publicKey: Uint8Array): string {
  if (publicKey.byteLength !== 32) throw new MeshError('MESH_BAD_REQUEST', 'an Ed25519 public key has 32 bytes');
  return `${role}-${base32(createHash('sha256').update(publicKey).digest()).slice(0, ID_HASH_CHARS)}`;
}

/** The role an id was derived in, or undefined for ids that are not key-derived. */
export function roleOfId(id: string): Role | undefined {
  const dash = id.indexOf('-');
  const role = id.slice(0, dash);
  return isRole(role) && id.length === dash + 1 + ID_HASH_CHARS ? role : undefined;
}

export function idMatchesKey(id: string, publicKey: Uint8Array): boolean {
  const role = roleOfId(id);
  return role !== undefined && publicKey.byteLength === 32 && deriveId(role, publicKey) === id;
}

const publicKeyCache = new Map<string, KeyObject>();

/** A node:crypto key object for a raw public key (cached: parsing costs more than verifying). */
export function publicKeyObject(publicKey: Uint8Array): KeyObject {
  const cacheKey = Buffer.from(publicKey).toString('base64');
  let key = publicKeyCache.get(cacheKey);
  if (!key) {
    key = createPublicKey({ key: Buffer.concat([SPKI_PREFIX, publicKey]), format: 'der', type: 'spki' });
    if (publicKeyCache.size > 10_000) publicKeyCache.clear();
    publicKeyCache.set(cacheKey, key);
  }
  return key;
}

export function identityFromSeed(role: Role, seed: Uint8Array): Identity {
  if (seed.byteLength !== 32) throw new MeshError('MESH_CONFIG', 'an Ed25519 seed has 32 bytes');
  const privateKey = createPrivateKey({ key: Buffer.concat([PKCS8_PREFIX, seed]), format: 'der', type: 'pkcs8' });
  const spki = createPublicKey(privateKey).export({ format: 'der', type: 'spki' });
  const publicKey = new Uint8Array(spki.subarray(SPKI_PREFIX.length));
  return { role, id: deriveId(role, publicKey), publicKey, seed: new Uint8Array(seed), privateKey };
}

export function generateIdentity(role: Role): Identity {
  return identityFromSeed(role, randomBytes(32));
}

export function signBytes(identity: Pick<Identity, 'privateKey'>, message: Uint8Array): Uint8Array {
  return new Uint8Array(nodeSign(null, message, identity.privateKey));
}

export function verifyBytes(publicKey: Uint8Array, message: Uint8Array, signature: Uint8Array): boolean {
  if (signature.byteLength !== 64 || publicKey.byteLength !== 32) return false;
  try {
    return nodeVerify(null, message, publicKeyObject(publicKey), signature);
  } catch {
    return false;
  }
}

// ---------------------------------------------------------------------------------------------
// Key files

/** The JSON text of a key file. Whoever writes it must give the file mode 0600. */
export function encodeKeyFile(identity: Identity): string {
  const file: KeyFile = {
    v: 1,
    kind: 'edge-mesh-key',
    role: identity.role,
    id: identity.id,
    publicKey: Buffer.from(identity.publicKey).toString('base64url'),
    seed: Buffer.from(identity.seed).toString('base64url'),
  };
  return `${JSON.stringify(file, null, 2)}\n`;
}

export function parseKeyFile(text: string, source = 'key file'): Identity {
  let parsed: unknown;
  try {
    parsed = JSON.parse(text);
  } catch {
    throw new MeshError('MESH_CONFIG', `${source} is not JSON`);
  }
  if (!checkKeyFile.Check(parsed)) throw new MeshError('MESH_CONFIG', `${source} is not an edge-mesh key file`);
  const identity = identityFromSeed(parsed.role, Buffer.from(parsed.seed, 'base64url'));
  if (identity.id !== parsed.id || Buffer.from(identity.publicKey).toString('base64url') !== parsed.publicKey) {
    throw new MeshError('MESH_CONFIG', `${source} is inconsistent: its id or public key does not match its seed`);
  }
  return identity;
}

/** The public half, safe to log, share and pass to `edge-mesh admit`. */
export function publicIdentity(identity: Identity): { role: Role; id: string; publicKey: string } {
  return { role: identity.role, id: identity.id, publicKey: Buffer.from(identity.publicKey).toString('base64url') };
}

// ---------------------------------------------------------------------------------------------
// CONNECT tokens: MQTT password = ts (8 bytes, big-endian ms) | nonce (16) | signature (64)

export const CONNECT_TOKEN_BYTES = 88;
const CONNECT_DOMAIN = Buffer.from('edge-mesh/connect/v1\0');

export function connectTokenMessage(clientId: string, timestampMs: number, nonce: Uint8Array): Buffer {
  const ts = Buffer.alloc(8);
  ts.writeBigUInt64BE(BigInt(Math.floor(timestampMs)));
  return Buffer.concat([CONNECT_DOMAIN, Buffer.from(clientId), Buffer.from([0]), ts, nonce]);
}

export function makeConnectToken(identity: Identity, nowMs = Date.now(), nonce: Uint8Array = randomBytes(16)): Buffer {
  const message = connectTokenMessage(identity.id, nowMs, nonce);
  return Buffer.concat([message.subarray(message.length - 24), signBytes(identity, message)]);
}

export interface ConnectToken {
  timestampMs: number;
  nonce: Buffer;
  signature: Buffer;
}

/** Splits a token; undefined when its length is wrong (a cheap check before any signature work). */
export function readConnectToken(password: Uint8Array | undefined): ConnectToken | undefined {
  if (!password || password.byteLength !== CONNECT_TOKEN_BYTES) return undefined;
  const buf = Buffer.from(password.buffer, password.byteOffset, password.byteLength);
  return { timestampMs: Number(buf.readBigUInt64BE(0)), nonce: buf.subarray(8, 24), signature: buf.subarray(24, 88) };
}

// ---------------------------------------------------------------------------------------------
// Admission and revocation records, signed by an operator

const RECORD_DOMAIN = Buffer.from('edge-mesh/record/v1\0');

function signRecord(operator: Identity, record: Admission | Revocation): SignedRecord {
  if (operator.role !== 'operator') throw new MeshError('MESH_CONFIG', 'only an operator key signs admissions and revocations');
  const bytes = encodeMessage(record as never);
  return { record: new Uint8Array(bytes), sig: signBytes(operator, Buffer.concat([RECORD_DOMAIN, bytes])) };
}

export function admit(
  operator: Identity,
  subject: { role: Role; publicKey: Uint8Array },
  { nowMs = Date.now(), ttlMs = 365 * 86_400_000 } = {},
): SignedRecord {
  return signRecord(operator, {
    v: PROTOCOL_VERSION,
    kind: 'admission',
    id: deriveId(subject.role, subject.publicKey),
    role: subject.role,
    publicKey: new Uint8Array(subject.publicKey),
    issuedAt: nowMs,
    expires: nowMs + ttlMs,
    operator: operator.id,
  });
}

export function revoke(operator: Identity, id: string, nowMs = Date.now()): SignedRecord {
  return signRecord(operator, { v: PROTOCOL_VERSION, kind: 'revocation', id, revokedAt: nowMs, operator: operator.id });
}

/**
 * Checks a signed record against the trusted operator keys and returns it. Throws
 * MESH_UNAUTHORIZED for an unknown operator, a bad signature, a subject id that does not derive
 * from its key, or an expired admission.
 */
export function verifyRecord(
  signed: unknown,
  trustedOperators: ReadonlyMap<string, Uint8Array>,
  nowMs = Date.now(),
): Admission | Revocation {
  if (!checkSignedRecord.Check(signed)) throw new MeshError('MESH_UNAUTHORIZED', 'not a signed record');
  let record: unknown;
  try {
    record = decodeCbor(signed.record);
  } catch (cause) {
    throw new MeshError('MESH_UNAUTHORIZED', 'record is not valid CBOR', { cause });
  }
  const isAdmission = checkAdmission.Check(record);
  if (!isAdmission && !checkRevocation.Check(record))
    throw new MeshError('MESH_UNAUTHORIZED', 'record is neither an admission nor a revocation');
  const r = record as Admission | Revocation;
  const operatorKey = trustedOperators.get(r.operator);
  if (!operatorKey) throw new MeshError('MESH_UNAUTHORIZED', `operator ${r.operator} is not trusted here`);
  if (!verifyBytes(operatorKey, Buffer.concat([RECORD_DOMAIN, signed.record]), signed.sig)) {
    throw new MeshError('MESH_UNAUTHORIZED', `bad operator signature on the record for ${r.id}`);
  }
  if (r.kind === 'admission') {
    if (deriveId(r.role, r.publicKey) !== r.id)
      throw new MeshError('MESH_UNAUTHORIZED', `admitted id ${r.id} does not derive from its key`);
    if (r.expires <= nowMs) throw new MeshError('MESH_UNAUTHORIZED', `admission of ${r.id} expired`);
  }
  return r;
}

// ---------------------------------------------------------------------------------------------
// Signed agent status

const STATUS_DOMAIN = Buffer.from('edge-mesh/status/v1\0');

/** Adds the agent's public key and its signature over the rest of the status. */
export function signStatus(identity: Identity, status: AgentStatus): AgentStatus {
  const unsigned: AgentStatus = { ...status, publicKey: new Uint8Array(identity.publicKey) };
  delete unsigned.sig;
  const sig = signBytes(identity, Buffer.concat([STATUS_DOMAIN, encodeMessage(unsigned)]));
  return { ...unsigned, sig };
}

/** True when the status carries a key its agent id derives from and a valid signature by it. */
export function verifyStatus(status: AgentStatus): boolean {
  const { sig, publicKey } = status;
  if (!(sig instanceof Uint8Array) || !(publicKey instanceof Uint8Array)) return false;
  if (!idMatchesKey(status.agent, publicKey)) return false;
  const unsigned: AgentStatus = { ...status };
  delete unsigned.sig;
  return verifyBytes(publicKey, Buffer.concat([STATUS_DOMAIN, encodeMessage(unsigned)]), sig);
}
