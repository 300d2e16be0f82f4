/**
 * Voucher and lane grant signatures checked off the main thread. Recovering a voucher's signer is an secp256k1 public-key
 * recovery in JavaScript (@noble/curves, as under ethers): about 1.5 ms on the 2-core test machine, long enough that a
 * request read while one runs waits for it. A paying agent takes a voucher every few dozen requests of a busy lane,
 * so the recovery goes to one worker thread (recover-worker.mjs); the main thread only splits the signature (refusing
 * a malformed or high-s one at once) and hashes the voucher. A voucher is checked against its lane's payer key once
 * the worker has recovered that key (recover-worker.mjs): about 0.4 of a recovery's time. A lane grant is the same recovery over another digest, and
 * any app may send one without paying anything: it goes to the same worker, under the same bounds. A paying agent starts the worker as it opens its journal
 * (`start`), so that the first voucher does not wait for a thread to start and load its libraries.
 *
 * Bounded: at most MAX_PENDING recoveries wait, and at most MAX_PENDING_PER_SENDER of one client's; past that a
 * voucher (or grant) is refused as busy (the payer sends its best voucher again with later requests), so a client flooding
 * vouchers fills only its own share. Should the worker fail, the recoveries waiting on it are refused and later ones
 * run on the main thread.
 */
import { Worker } from 'node:worker_threads';
import { recoverLaneGrantSigner, recoverVoucherSigner } from '@edge-mesh/contracts';
import {
  type EscrowDomain,
  type LaneGrantTerms,
  laneGrantDigest,
  MeshError,
  splitVoucherSignature,
  type Voucher,
  voucherDigest,
} from '@edge-mesh/protocol';
import type { Logger } from 'pino';
import { workerExecArgv } from './pool.ts';

const WORKER_URL = new URL('./recover-worker.mjs', import.meta.url);
/** Recoveries queued at once, at most: about a third of a second of the worker's time. */
export const MAX_PENDING = 256;
/** Of those, one client's at most: an honest payer has one or two in flight (a new voucher every few dozen ms). */
export const MAX_PENDING_PER_SENDER = 8;

interface Pending {
  senderId: string;
  resolve: (address: string) => void;
  reject: (err: Error) => void;
}

export class SignerRecovery {
  private worker: Worker | undefined;
  private failed = false;
  private closed = false;
  private nextId = 0;
  private readonly pending = new Map<number, Pending>();
  private readonly bySender = new Map<string, number>();
  /** Voucher signatures handed to the worker (or, after it failed, checked on the main thread) so far. */
  checked = 0;
  /** Lane grant signatures, the same way. */
  grantsChecked = 0;

  constructor(private readonly logger: Logger) {}

  /**
   * The voucher key that signed `sig` over voucher `v`, lower-case, as recoverVoucherSigner gives it (on the worker,
   * or on the main thread should the worker have failed); `senderId` is the client that sent it. `expected`, the
   * lane's payer, lets the worker check the signature against that key once it has recovered it before, which costs
   * about half a recovery; the answer is the same either way (recover-worker.mjs).
   */
  recoverVoucher(domain: EscrowDomain, v: Voucher, sig: string, senderId: string, expected?: string): Promise<string> {
    return this.recover(
      sig,
      senderId,
      'voucher',
      () => voucherDigest(domain, v),
      () => recoverVoucherSigner(domain, v, sig),
      expected?.toLowerCase(),
    );
  }

  /** The voucher key that signed lane grant `g` (recoverLaneGrantSigner), as `recoverVoucher` does for a voucher. */
  recoverGrant(domain: EscrowDomain, g: LaneGrantTerms, sig: string, senderId: string): Promise<string> {
    return this.recover(
      sig,
      senderId,
      'grant',
      () => laneGrantDigest(domain, g),
      () => recoverLaneGrantSigner(domain, g, sig),
    );
  }

  private recover(
    sig: string,
    senderId: string,
    kind: 'voucher' | 'grant',
    digest: () => string,
    onMainThread: () => string,
    expected?: string,
  ): Promise<string> {
    // Malformed or high-s: refused here, as the main thread's recovery refuses it.
    const { r, s, v: recovery } = splitVoucherSignature(sig);
    if (this.closed) return Promise.reject(new MeshError('MESH_SHUTTING_DOWN', 'the agent is stopping'));
    const count = () => {
      if (kind === 'grant') this.grantsChecked++;
      else this.checked++;
    };
    if (this.failed) {
      count();
      return Promise.resolve(onMainThread().toLowerCase());
    }
    const own = this.bySender.get(senderId) ?? 0;
    if (this.pending.size >= MAX_PENDING || own >= MAX_PENDING_PER_SENDER) {
      const held = own >= MAX_PENDING_PER_SENDER ? `${MAX_PENDING_PER_SENDER} of this client's` : `${MAX_PENDING}`;
      return Promise.reject(new MeshError('MESH_BUSY', `${held} signatures are already waiting to be checked`));
    }
    const worker = this.started();
    const id = this.nextId++;
    count();
    this.bySender.set(senderId, own + 1);
    return new Promise<string>((resolve, reject) => {
      this.pending.set(id, { senderId, resolve, reject });
      if (this.pending.size === 1) worker.ref();
      // The digest (keccak256 in JS) and the hand-off cost tens of microseconds: they wait until the request that
      // brought the voucher is answered. An inline model runs in this turn's check phase and its reply leaves there;
      // a second `setImmediate` runs in the next turn's.
      this.outbox.push({ id, digest, r, s, v: recovery, expected });
      if (this.outbox.length === 1) setImmediate(() => setImmediate(this.post));
    });
  }

  /** Recoveries asked for, not yet handed to the worker (see `recover`). */
  private outbox: { id: number; digest: () => string; r: string; s: string; v: number; expected: string | undefined }[] = [];

  private readonly post = (): void => {
    const outbox = this.outbox;
    this.outbox = [];
    for (const { id, digest, r, s, v, expected } of outbox) {
      const p = this.pending.get(id);
      // Settled meanwhile: the agent closed, or the worker failed.
      if (!p) continue;
      let message: { id: number; digest: string; r: string; s: string; v: number; expected?: string };
      try {
        message = { id, digest: digest(), r, s, v, ...(expected ? { expected } : {}) };
      } catch (err) {
        this.forget(id, p);
        p.reject(new MeshError('MESH_VOUCHER_INVALID', (err as Error).message));
        continue;
      }
      const worker = this.worker;
      if (!worker) continue;
      worker.postMessage(message);
    }
    if (this.pending.size === 0) this.worker?.unref();
  };

  /** Starts the worker now rather than at the first voucher (it holds the process open only while a check waits). */
  start(): void {
    if (!this.closed && !this.failed) this.started();
  }

  /** Waits for nothing: recoveries still queued are refused. */
  async close(): Promise<void> {
    this.closed = true;
    const worker = this.worker;
    this.worker = undefined;
    this.settleAll(new MeshError('MESH_SHUTTING_DOWN', 'the agent is stopping'));
    if (worker) await worker.terminate();
  }

  private started(): Worker {
    if (this.worker) return this.worker;
    const execArgv = workerExecArgv(process.execArgv);
    const worker = new Worker(WORKER_URL, { ...(execArgv ? { execArgv } : {}), resourceLimits: { maxYoungGenerationSizeMb: 2 } });
    // Holds the process open only while a recovery waits on it.
    worker.unref();
    worker.on('message', (m: { id: number; address?: string; error?: string }) => {
      const p = this.pending.get(m.id);
      if (!p) return;
      this.forget(m.id, p);
      if (this.pending.size === 0) worker.unref();
      if (m.address !== undefined) p.resolve(m.address);
      else p.reject(new MeshError('MESH_VOUCHER_INVALID', m.error ?? 'signature not recoverable'));
    });
    const fail = (why: string) => {
      if (this.worker !== worker) return;
      this.worker = undefined;
      this.failed = true;
      this.logger.warn({ why }, 'voucher signature worker failed; checking voucher signatures on the main thread');
      this.settleAll(new MeshError('MESH_INTERNAL', `voucher signature worker failed: ${why}`));
    };
    worker.on('error', (err) => fail(err.message));
    worker.on('exit', (code) => fail(`exited with code ${code}`));
    this.worker = worker;
    return worker;
  }

  /** Recoveries waiting now (all clients'). */
  get waiting(): number {
    return this.pending.size;
  }

  private forget(id: number, p: Pending): void {
    this.pending.delete(id);
    const own = (this.bySender.get(p.senderId) ?? 1) - 1;
    if (own > 0) this.bySender.set(p.senderId, own);
    else this.bySender.delete(p.senderId);
  }

  private settleAll(err: Error): void {
    const waiting = [...this.pending.values()];
    this.pending.clear();
    this.bySender.clear();
    for (const p of waiting) p.reject(err);
  }
}
