/**
 * Token buckets per sender (or per lane) for work the agent does on a message any admitted app may send (a lane grant's signature
 * check, a resync's journal read): `burst` at once, then `perSecond`. A sender whose bucket is full again holds no
 * entry after the next prune, so the map holds only senders that spent tokens lately.
 */
export class SenderBudget {
  private readonly buckets = new Map<string, { tokens: number; at: number }>();
  private pruneAt = 1_024;

  constructor(
    readonly burst: number,
    readonly perSecond: number,
    private readonly now: () => number = () => performance.now(),
  ) {}

  /** Takes one token of `sender`'s; false (nothing taken) when it has none. */
  take(sender: string): boolean {
    const now = this.now();
    let bucket = this.buckets.get(sender);
    if (!bucket) {
      if (this.buckets.size >= this.pruneAt) this.prune(now);
      bucket = { tokens: this.burst, at: now };
      this.buckets.set(sender, bucket);
    } else this.refill(bucket, now);
    if (bucket.tokens < 1) return false;
    bucket.tokens -= 1;
    return true;
  }

  /** Whether `sender` has a token now (none is taken). */
  has(sender: string): boolean {
    const bucket = this.buckets.get(sender);
    if (!bucket) return this.burst >= 1;
    this.refill(bucket, this.now());
    return bucket.tokens >= 1;
  }

  /** Takes a token of `sender`'s whether or not it has one: below zero, the refill pays the debt first. */
  spend(sender: string): void {
    if (!this.take(sender)) this.buckets.get(sender)!.tokens -= 1;
  }

  /** Gives `sender` `n` tokens, up to the burst. */
  give(sender: string, n: number): void {
    const bucket = this.buckets.get(sender);
    if (!bucket) return;
    this.refill(bucket, this.now());
    bucket.tokens = Math.min(this.burst, bucket.tokens + n);
  }

  /** Senders holding an entry (for tests). */
  get size(): number {
    return this.buckets.size;
  }

  private refill(bucket: { tokens: number; at: number }, now: number): void {
    bucket.tokens = Math.min(this.burst, bucket.tokens + ((now - bucket.at) * this.perSecond) / 1_000);
    bucket.at = now;
  }

  private prune(now: number): void {
    for (const [sender, bucket] of this.buckets) {
      this.refill(bucket, now);
      if (bucket.tokens >= this.burst) this.buckets.delete(sender);
    }
    this.pruneAt = Math.max(1_024, 2 * this.buckets.size);
  }
}
