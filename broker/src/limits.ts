/**
 * Per-IP limits (docs/security.md, "Connecting"): simultaneous connections, a CONNECT token bucket, and a ban after a burst of
 * refused CONNECTs. Plus the nonce cache that refuses replayed CONNECT tokens. All O(1) per event; idle state is
 * swept periodically so a spread of source addresses cannot grow the maps without bound.
 */

export interface IpLimits {
  maxConnectionsPerIp: number;
  connectRatePerIp: number;
  connectBurstPerIp: number;
  authFailuresBeforeBan: number;
  authFailureWindowMs: number;
  banMs: number;
}

interface IpState {
  conns: number;
  tokens: number;
  last: number;
  failures: number;
  windowStart: number;
  bannedUntil: number;
  /** Whether the last CONNECT was over the rate, so only the first of a run is logged at warn. */
  limited: boolean;
}

export type AcceptVerdict = 'ok' | 'banned' | 'too-many-connections';
export type ConnectVerdict = 'ok' | 'banned' | 'connect-rate' | 'connect-rate-again';

export class IpGuard {
  private readonly ips = new Map<string, IpState>();

  constructor(private readonly limits: IpLimits) {}

  private state(ip: string, now: number): IpState {
    let s = this.ips.get(ip);
    if (s === undefined) {
      s = { conns: 0, tokens: this.limits.connectBurstPerIp, last: now, failures: 0, windowStart: now, bannedUntil: 0, limited: false };
      this.ips.set(ip, s);
    }
    return s;
  }

  /** A TCP connection was accepted; counts it unless it is refused. */
  accept(ip: string, now: number): AcceptVerdict {
    const s = this.state(ip, now);
    if (s.bannedUntil > now) return 'banned';
    if (s.conns >= this.limits.maxConnectionsPerIp) return 'too-many-connections';
    s.conns++;
    return 'ok';
  }

  /** A connection counted by `accept` closed. */
  release(ip: string): void {
    const s = this.ips.get(ip);
    if (s !== undefined && s.conns > 0) s.conns--;
  }

  /** A CONNECT packet arrived: the ban and the token bucket. */
  connect(ip: string, now: number): ConnectVerdict {
    const s = this.state(ip, now);
    if (s.bannedUntil > now) return 'banned';
    const { connectRatePerIp: rate, connectBurstPerIp: burst } = this.limits;
    s.tokens = Math.min(burst, s.tokens + ((now - s.last) * rate) / 1000);
    s.last = now;
    if (s.tokens < 1) {
      const again = s.limited;
      s.limited = true;
      return again ? 'connect-rate-again' : 'connect-rate';
    }
    s.tokens -= 1;
    s.limited = false;
    return 'ok';
  }

  /** A CONNECT from `ip` was refused. Returns true when this failure bans the address. */
  failure(ip: string, now: number): boolean {
    const s = this.state(ip, now);
    if (now - s.windowStart > this.limits.authFailureWindowMs) {
      s.windowStart = now;
      s.failures = 0;
    }
    s.failures++;
    if (s.failures >= this.limits.authFailuresBeforeBan && s.bannedUntil <= now && this.limits.banMs > 0) {
      s.bannedUntil = now + this.limits.banMs;
      s.failures = 0;
      return true;
    }
    return false;
  }

  isBanned(ip: string, now: number): boolean {
    const s = this.ips.get(ip);
    return s !== undefined && s.bannedUntil > now;
  }

  /** Forgets addresses with no connection, no ban, a full bucket and no recent failures. */
  sweep(now: number): void {
    const { connectRatePerIp: rate, connectBurstPerIp: burst, authFailureWindowMs } = this.limits;
    for (const [ip, s] of this.ips) {
      if (s.conns > 0 || s.bannedUntil > now) continue;
      if (s.tokens + ((now - s.last) * rate) / 1000 < burst) continue;
      if (s.failures > 0 && now - s.windowStart <= authFailureWindowMs) continue;
      this.ips.delete(ip);
    }
  }

  get size(): number {
    return this.ips.size;
  }
}

/**
 * Nonces of accepted CONNECT tokens, each kept for `ttlMs` after it was first seen. Entries are inserted in time
 * order with one TTL, so expired ones are always at the front of the Map's insertion order.
 */
export class NonceCache {
  private readonly seen = new Map<string, number>();

  constructor(private readonly ttlMs: number) {}

  has(key: string, now: number): boolean {
    this.prune(now);
    return this.seen.has(key);
  }

  add(key: string, now: number): void {
    this.seen.set(key, now + this.ttlMs);
  }

  prune(now: number): void {
    for (const [key, expires] of this.seen) {
      if (expires > now) break;
      this.seen.delete(key);
    }
  }

  get size(): number {
    return this.seen.size;
  }
}
