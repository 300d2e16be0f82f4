/**
 * The agent's signature worker (recover.ts): recovers the address that signed an EIP-712 digest, off the main
 * thread. A message is `{ id, digest, r, s, v, expected? }` (0x hex strings and 27 or 28, already split and checked
 * low-s by the main thread; `expected` the lower-case address the lane's payer has); the answer is `{ id, address }`
 * (lower-case 0x hex) or `{ id, error }`.
 *
 * A recovery costs two full scalar multiplications, one of them by a point that is new with every signature (the
 * signature's own R). A lane's vouchers all come from one payer key, so once a recovery has shown that `expected`
 * signed, that key is kept with a table of its multiples (`KEY_WINDOW`, about 43 KB) and the next voucher is checked
 * against it instead: R' = (e·G + r·P) / s must be the point R the signature names, x equal to r and y of the parity
 * v gives. That is the same condition under which recovery gives P, so the answer is the same (test/recover.test.ts
 * holds both paths to ethers' answers), in about half the time (docs/agent.md). A signature that fails the check is
 * recovered in full, so a forger is told the key it did sign with, as before.
 *
 * It uses @noble/curves and @noble/hashes directly, the libraries ethers' own recoverAddress runs on: loading ethers
 * in the thread as well would cost about 7 MB more.
 */
import { parentPort } from 'node:worker_threads';
import { invert, mod } from '@noble/curves/abstract/modular';
import { secp256k1 } from '@noble/curves/secp256k1';
import { keccak_256 } from '@noble/hashes/sha3';

const N = secp256k1.CURVE.n;
const G = secp256k1.ProjectivePoint.BASE;
/** Window of a kept key's table: 4 bits is 43 KB a key and most of the gain (8 bits: 352 KB for 20 % more). */
const KEY_WINDOW = 4;
/** Payer keys kept, the least recently used dropped first: about 2.8 MB at most. */
export const MAX_KEYS = 64;

/** @type {Map<string, import('@noble/curves/abstract/weierstrass').ProjPointType<bigint>>} address → key */
const keys = new Map();

/** @param {string} hex 0x-prefixed */
const bytes = (hex) => Uint8Array.from(Buffer.from(hex.slice(2), 'hex'));

/** @param {Uint8Array} raw an uncompressed public key (0x04 prefix) */
const addressOf = (raw) => `0x${Buffer.from(keccak_256(raw.subarray(1)).subarray(12)).toString('hex')}`;

/**
 * Whether `key` signed `digest` with (r, s) and recovery id v − 27: R' = (e·G + r·P) / s is the point with x = r and
 * y of that parity. r, s in [1, n) (the Signature constructor checks).
 * @param {import('@noble/curves/abstract/weierstrass').ProjPointType<bigint>} key
 * @param {string} digest @param {bigint} r @param {bigint} s @param {number} v
 */
function signedBy(key, digest, r, s, v) {
  const w = invert(s, N);
  const u1 = mod(BigInt(digest) * w, N);
  // e·w = 0 (a digest that is a multiple of n): left to the full recovery.
  if (u1 === 0n) return false;
  const point = G.multiply(u1).add(key.multiply(mod(r * w, N)));
  if (point.equals(secp256k1.ProjectivePoint.ZERO)) return false;
  const { x, y } = point.toAffine();
  return x === r && (y & 1n) === BigInt(v - 27);
}

/**
 * @param {string} digest 0x hex, 32 bytes
 * @param {string} r 0x hex
 * @param {string} s 0x hex
 * @param {number} v 27 or 28 (splitVoucherSignature on the main thread allows no other)
 * @param {string | undefined} expected the address the caller expects, lower-case
 * @returns {string} the signer's address, lower-case 0x hex
 */
export function recoverAddress(digest, r, s, v, expected) {
  const signature = new secp256k1.Signature(BigInt(r), BigInt(s)).addRecoveryBit(v - 27);
  const kept = expected === undefined ? undefined : keys.get(expected);
  if (expected !== undefined && kept && signedBy(kept, digest, signature.r, signature.s, v)) {
    keys.delete(expected);
    keys.set(expected, kept);
    return expected;
  }
  const point = signature.recoverPublicKey(bytes(digest));
  const address = addressOf(point.toRawBytes(false));
  // Kept once: a key already kept (here only for a digest its check leaves to the full recovery) keeps its table.
  if (!kept && expected !== undefined && address === expected) {
    point._setWindowSize(KEY_WINDOW);
    keys.set(address, point);
    const oldest = keys.entries().next();
    if (keys.size > MAX_KEYS && !oldest.done) {
      keys.delete(oldest.value[0]);
      // noble holds a point's table in a module-wide Map (not a WeakMap) until the point's window is set again.
      oldest.value[1]._setWindowSize(1);
    }
  }
  return address;
}

/** Keys kept now (tests). */
export const keptKeys = () => keys.size;

// Loaded as a worker thread only (outside one there is no port, and nothing to do).
const port = parentPort;
port?.on('message', (message) => {
  const { id, digest, r, s, v, expected } = message;
  try {
    port.postMessage({ id, address: recoverAddress(digest, r, s, v, expected) });
  } catch (err) {
    port.postMessage({ id, error: err instanceof Error ? err.message : String(err) });
  }
});
