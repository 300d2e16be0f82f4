/**
 * Token buckets per key (a credential, an address, a mesh client, a payer's lane): `burst` at once, then `perSecond`,
 * for work any admitted party can ask for (the router's route questions, HTTP requests and relayed vouchers; the
 * agent's lane grant checks and resync answers). A key whose bucket is full again holds no entry after the next
 * prune, which runs when the map doubles past 1,024 keys, so the map holds only keys that spent tokens lately; a
 * stream of new keys never resets the limits of those that did.
 */
export class KeyedBuckets {
  private readonly buckets = new Map<string, { tokens: number; at: number }>();
  private pruneAt = 1_024;

  constructor(
    readonly burst: number,
    readonly perSecond: number,
    /** Milliseconds; the methods take `now` too, for callers on a clock of their own. */
    private readonly clock: () => number = () => performance.now(),
  ) {}

  /** Takes one token of `key`'s; false (nothing taken) when it has none. */
  take(key: string, now = this.clock()): boolean {
    let bucket = this.buckets.get(key);
    if (!bucket) {
      if (this.buckets.size >= this.pruneAt) this.prune(now);
      bucket = { tokens: this.burst, at: now };
      this.buckets.set(key, bucket);
    } else this.refill(bucket, now);
    if (bucket.tokens < 1) return false;
    bucket.tokens -= 1;
    return true;
  }

  /** Whether `key` has a token now (none is taken). */
  has(key: string, now = this.clock()): boolean {
    const bucket = this.buckets.get(key);
    if (!bucket) return this.burst >= 1;
    this.refill(bucket, now);
    return bucket.tokens >= 1;
  }

  /** Takes a token of `key`'s whether or not it has one: below zero, the refill pays the debt first. */
  spend(key: string, now = this.clock()): void {
    if (!this.take(key, now)) this.buckets.get(key)!.tokens -= 1;
  }

  /** Gives `key` `n` tokens, up to the burst. */
  give(key: string, n: number, now = this.clock()): void {
    const bucket = this.buckets.get(key);
    if (!bucket) return;
    this.refill(bucket, now);
    bucket.tokens = Math.min(this.burst, bucket.tokens + n);
  }

  /** Keys holding an entry (for tests). */
  get size(): number {
    return this.buckets.size;
  }

  private refill(bucket: { tokens: number; at: number }, now: number): void {
    bucket.tokens = Math.min(this.burst, bucket.tokens + ((now - bucket.at) * this.perSecond) / 1_000);
    bucket.at = now;
  }

  private prune(now: number): void {
    for (const [key, bucket] of this.buckets) {
      this.refill(bucket, now);
      if (bucket.tokens >= this.burst) this.buckets.delete(key);
    }
    this.pruneAt = Math.max(1_024, 2 * this.buckets.size);
  }
}
