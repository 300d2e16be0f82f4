/**
 * Token buckets per key (a credential, an address, a mesh client): `perSecond` tokens a second, up to `burst`.
 * The map is cleared when it reaches 100,000 keys, so a stream of new keys costs memory only up to that.
 */
export class Buckets {
  private readonly buckets = new Map<string, { tokens: number; last: number }>();
  constructor(
    private readonly perSecond: number,
    private readonly burst: number,
  ) {}
  /** Takes one token; false when the bucket is empty. */
  take(key: string, now: number): boolean {
    let b = this.buckets.get(key);
    if (b === undefined) {
      if (this.buckets.size >= 100_000) this.buckets.clear();
      b = { tokens: this.burst, last: now };
      this.buckets.set(key, b);
    }
    b.tokens = Math.min(this.burst, b.tokens + ((now - b.last) * this.perSecond) / 1000);
    b.last = now;
    if (b.tokens < 1) return false;
    b.tokens -= 1;
    return true;
  }
  empty(key: string, now: number): boolean {
    const b = this.buckets.get(key);
    return b !== undefined && Math.min(this.burst, b.tokens + ((now - b.last) * this.perSecond) / 1000) < 1;
  }
}
