/**
 * Per-device replay protection and idempotent retransmits.
 *
 * - A device's (epoch, seq) must be new: an epoch below the highest seen is stale; within the current
 *   epoch a 64-entry sliding window remembers which sequence numbers arrived, and anything older than
 *   the window is refused.
 * - The last REPLY_CACHE replies are kept with a digest of the request they answer and the address it
 *   came from. A retransmit (same epoch, seq and bytes, from the same address) gets the cached reply again,
 *   at most MAX_RESENDS times (bridge.ts), and is never run twice; a retransmit that arrives while the first
 *   copy is still being served is dropped (its reply is on the way). A copy from another address is not
 *   answered: a captured frame replayed from a forged source must not turn the bridge into a reflector.
 * - The high-water mark survives a bridge restart: the store keeps the epoch and a sequence floor
 *   written ahead of use (seq + SEQ_PERSIST_STEP), so after a crash nothing at or below the floor is
 *   accepted again. A frame is served only once the mark on disk covers it (bridge.ts, `markCovering`).
 *   A device that gets no answer three times in a row starts a new epoch.
 */

export const WINDOW = 64n;
export const REPLY_CACHE = 16;
export const SEQ_PERSIST_STEP = 64;

export type ReplayVerdict = 'fresh' | 'seen' | 'stale-epoch' | 'too-old' | 'bad-seq';

export interface CachedReply {
  /** Digest of the request packet (header, ciphertext and tag). */
  digest: string;
  /** Undefined while the request is still being served. */
  reply: Buffer | undefined;
  /** Where the request came from (a transport's address), when the transport has addresses. */
  from: string | undefined;
  /** Times the reply was sent again. */
  resends: number;
}

export class ReplayWindow {
  epoch: number;
  seqMax: number;
  private bitmap: bigint;
  private readonly cache = new Map<string, CachedReply>();

  /** Starts at a persisted high-water mark (everything at or below `seqFloor` in `epoch` counts as seen). */
  constructor(epoch = -1, seqFloor = 0) {
    this.epoch = epoch;
    this.seqMax = seqFloor;
    this.bitmap = seqFloor > 0 ? (1n << WINDOW) - 1n : 0n;
  }

  check(epoch: number, seq: number): ReplayVerdict {
    if (seq === 0) return 'bad-seq';
    if (epoch < this.epoch) return 'stale-epoch';
    if (epoch > this.epoch || seq > this.seqMax) return 'fresh';
    const diff = BigInt(this.seqMax - seq);
    if (diff >= WINDOW) return 'too-old';
    return (this.bitmap >> diff) & 1n ? 'seen' : 'fresh';
  }

  /** Records a verified fresh (epoch, seq). Returns true when the epoch moved forward. */
  accept(epoch: number, seq: number): boolean {
    if (epoch > this.epoch) {
      this.epoch = epoch;
      this.seqMax = seq;
      this.bitmap = 1n;
      this.cache.clear();
      return true;
    }
    if (seq > this.seqMax) {
      const shift = BigInt(seq - this.seqMax);
      this.bitmap = shift >= WINDOW ? 1n : ((this.bitmap << shift) | 1n) & ((1n << WINDOW) - 1n);
      this.seqMax = seq;
    } else {
      this.bitmap |= 1n << BigInt(this.seqMax - seq);
    }
    return false;
  }

  cached(epoch: number, seq: number): CachedReply | undefined {
    return this.cache.get(`${epoch}:${seq}`);
  }

  /** Marks a request from `from` as being served (its reply comes later through `remember`). */
  pending(epoch: number, seq: number, digest: string, from?: string): void {
    this.put(`${epoch}:${seq}`, { digest, reply: undefined, from, resends: 0 });
  }

  /** Keeps the reply to a request marked `pending` (or to one not marked, with no address). */
  remember(epoch: number, seq: number, digest: string, reply: Buffer | undefined): void {
    const key = `${epoch}:${seq}`;
    this.put(key, { digest, reply, from: this.cache.get(key)?.from, resends: 0 });
  }

  private put(key: string, entry: CachedReply): void {
    this.cache.delete(key);
    this.cache.set(key, entry);
    while (this.cache.size > REPLY_CACHE) this.cache.delete(this.cache.keys().next().value!);
  }
}
