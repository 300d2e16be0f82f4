/**
 * Front-door limits (docs/security.md, "Connecting"), all O(1) per event, idle state swept periodically so a spread
 * of source addresses or ids cannot grow the maps without bound:
 *
 * - `IpGuard`, per address, for unauthenticated floods only: a CONNECT token bucket and a limit after a burst of
 *   refused CONNECTs that named no admitted id. A limited address still lets CONNECTs that name an admitted id
 *   through to the signature check, so one broken device behind a NAT cannot lock its neighbours out; the rest are
 *   answered CONNACK 3 without any further work.
 * - `ClientGuard`, per (client id, address): a failed token for an admitted id counts against that id as seen from
 *   that address. After a burst, that id is refused from that address (CONNACK 3) before its signature is checked.
 *   Keyed by address too, so a stranger who knows an id (ids are public) cannot lock its owner out from elsewhere.
 * - `NonceCache`: the nonces of accepted CONNECT tokens, so a replayed token is refused.
 *
 * The per-address cap on sockets that have not finished CONNECT lives in ./listener.ts (it evicts the oldest).
 */

export interface IpLimits {
  /** Sockets from one address that have not finished CONNECT; beyond it the oldest is closed (./listener.ts). */
  maxConnectionsPerIp: number;
  connectRatePerIp: number;
  connectBurstPerIp: number;
  /** Refused CONNECTs naming no admitted id, from one address within `authFailureWindowMs`, that limit the address. */
  addressFailuresBeforeLimit: number;
  /** Refused CONNECTs naming one admitted id, from one address within `authFailureWindowMs`, that ban that pair. */
  authFailuresBeforeBan: number;
  authFailureWindowMs: number;
  /** How long a limited address or a banned (id, address) pair stays so. */
  banMs: number;
}

interface IpState {
  tokens: number;
  last: number;
  failures: number;
  windowStart: number;
  limitedUntil: number;
  /** Whether the last CONNECT was over the rate, so only the first of a run is logged at warn. */
  overRate: boolean;
}

/**
 * `limited`: after a storm of unauthenticated refusals; `connect-rate`: over the CONNECT bucket, first of a run
 * (`-again` for the rest). Either way only CONNECTs naming an admitted id go on.
 */
export type ConnectVerdict = 'ok' | 'limited' | 'connect-rate' | 'connect-rate-again';

/** A failure counter over a fixed window that bans for `banMs` once it reaches `threshold`. */
interface FailureState {
  failures: number;
  windowStart: number;
  limitedUntil: number;
}

/** Counts one failure; true when it starts a ban. */
function countFailure(s: FailureState, threshold: number, windowMs: number, banMs: number, now: number): boolean {
  if (now - s.windowStart > windowMs) {
    s.windowStart = now;
    s.failures = 0;
  }
  s.failures++;
  if (s.failures >= threshold && s.limitedUntil <= now && banMs > 0) {
    s.limitedUntil = now + banMs;
    s.failures = 0;
    return true;
  }
  return false;
}

export class IpGuard {
  private readonly ips = new Map<string, IpState>();

  constructor(private readonly limits: IpLimits) {}

  private state(ip: string, now: number): IpState {
    let s = this.ips.get(ip);
    if (s === undefined) {
      s = { tokens: this.limits.connectBurstPerIp, last: now, failures: 0, windowStart: now, limitedUntil: 0, overRate: false };
      this.ips.set(ip, s);
    }
    return s;
  }

  /** A CONNECT packet arrived: the limit and the token bucket. */
  connect(ip: string, now: number): ConnectVerdict {
    const s = this.state(ip, now);
    if (s.limitedUntil > now) return 'limited';
    const { connectRatePerIp: rate, connectBurstPerIp: burst } = this.limits;
    s.tokens = Math.min(burst, s.tokens + ((now - s.last) * rate) / 1000);
    s.last = now;
    if (s.tokens < 1) {
      const again = s.overRate;
      s.overRate = true;
      return again ? 'connect-rate-again' : 'connect-rate';
    }
    s.tokens -= 1;
    s.overRate = false;
    return 'ok';
  }

  /** A CONNECT from `ip` that named no admitted id was refused. True when this failure limits the address. */
  failure(ip: string, now: number): boolean {
    const { addressFailuresBeforeLimit, authFailureWindowMs, banMs } = this.limits;
    return countFailure(this.state(ip, now), addressFailuresBeforeLimit, authFailureWindowMs, banMs, now);
  }

  isLimited(ip: string, now: number): boolean {
    const s = this.ips.get(ip);
    return s !== undefined && s.limitedUntil > now;
  }

  /** Forgets addresses with no limit, a full bucket and no recent failures. */
  sweep(now: number): void {
    const { connectRatePerIp: rate, connectBurstPerIp: burst, authFailureWindowMs } = this.limits;
    for (const [ip, s] of this.ips) {
      if (s.limitedUntil > now) continue;
      if (s.tokens + ((now - s.last) * rate) / 1000 < burst) continue;
      if (s.failures > 0 && now - s.windowStart <= authFailureWindowMs) continue;
      this.ips.delete(ip);
    }
  }

  get size(): number {
    return this.ips.size;
  }
}

/** Failed CONNECTs per (admitted client id, address), and the bans they lead to. */
export class ClientGuard {
  private readonly pairs = new Map<string, FailureState>();

  constructor(private readonly limits: IpLimits) {}

  private static key(ip: string, id: string): string {
    return `${ip}\n${id}`;
  }

  /** A CONNECT naming admitted `id` from `ip` was refused. True when this failure bans the pair. */
  failure(ip: string, id: string, now: number): boolean {
    const key = ClientGuard.key(ip, id);
    let s = this.pairs.get(key);
    if (s === undefined) {
      s = { failures: 0, windowStart: now, limitedUntil: 0 };
      this.pairs.set(key, s);
    }
    const { authFailuresBeforeBan, authFailureWindowMs, banMs } = this.limits;
    return countFailure(s, authFailuresBeforeBan, authFailureWindowMs, banMs, now);
  }

  isBanned(ip: string, id: string, now: number): boolean {
    const s = this.pairs.get(ClientGuard.key(ip, id));
    return s !== undefined && s.limitedUntil > now;
  }

  /** Forgets pairs with no ban and no recent failures. */
  sweep(now: number): void {
    for (const [key, s] of this.pairs) {
      if (s.limitedUntil > now) continue;
      if (now - s.windowStart <= this.limits.authFailureWindowMs) continue;
      this.pairs.delete(key);
    }
  }

  get size(): number {
    return this.pairs.size;
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
