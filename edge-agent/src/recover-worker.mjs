/**
 * The agent's signature worker (recover.ts): recovers the address that signed an EIP-712 digest, off the main
 * thread. A message is `{ id, digest, r, s, v }` (hex strings and 27 or 28, already split and checked low-s by the
 * main thread); the answer is `{ id, address }` or `{ id, error }`.
 */
import { parentPort } from 'node:worker_threads';
import { ethers } from 'ethers';

const port = parentPort;
if (!port) throw new Error('recover-worker.mjs runs as a worker thread');
port.on('message', (message) => {
  const { id, digest, r, s, v } = message;
  try {
    port.postMessage({ id, address: ethers.recoverAddress(digest, { r, s, v }) });
  } catch (err) {
    port.postMessage({ id, error: err instanceof Error ? err.message : String(err) });
  }
});
