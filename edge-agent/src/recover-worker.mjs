/**
 * The agent's signature worker (recover.ts): recovers the address that signed an EIP-712 digest, off the main
 * thread. A message is `{ id, digest, r, s, v }` (0x hex strings and 27 or 28, already split and checked low-s by
 * the main thread); the answer is `{ id, address }` (lower-case 0x hex) or `{ id, error }`.
 *
 * It uses @noble/curves and @noble/hashes directly, the libraries ethers' own recoverAddress runs on: loading ethers
 * in the thread as well would cost about 7 MB more (test/recover.test.ts holds the answers to ethers').
 */
import { parentPort } from 'node:worker_threads';
import { secp256k1 } from '@noble/curves/secp256k1';
import { keccak_256 } from '@noble/hashes/sha3';

/** @param {string} hex 0x-prefixed */
const bytes = (hex) => Uint8Array.from(Buffer.from(hex.slice(2), 'hex'));

/**
 * @param {string} digest 0x hex, 32 bytes
 * @param {string} r 0x hex
 * @param {string} s 0x hex
 * @param {number} v 27 or 28 (splitVoucherSignature on the main thread allows no other)
 * @returns {string} the signer's address, lower-case 0x hex
 */
function recoverAddress(digest, r, s, v) {
  const signature = new secp256k1.Signature(BigInt(r), BigInt(s)).addRecoveryBit(v - 27);
  const publicKey = signature.recoverPublicKey(bytes(digest)).toRawBytes(false);
  // The address: the last 20 bytes of the Keccak-256 of the uncompressed key without its 0x04 prefix.
  return `0x${Buffer.from(keccak_256(publicKey.subarray(1)).subarray(12)).toString('hex')}`;
}

// Loaded as a worker thread only (outside one there is no port, and nothing to do).
const port = parentPort;
port?.on('message', (message) => {
  const { id, digest, r, s, v } = message;
  try {
    port.postMessage({ id, address: recoverAddress(digest, r, s, v) });
  } catch (err) {
    port.postMessage({ id, error: err instanceof Error ? err.message : String(err) });
  }
});
