/**
 * The retry and hedge budget shared by the router, the SDK and the simulator: extra attempts are
 * paid from token buckets that fill with ordinary traffic, so a failing or slow fleet cannot be
 * buried under retries (a retry storm) and hedging never adds more than a few per cent of load.
 *
 * - Every request adds `ratio` retry tokens (capped at `cap`); a floor of `minPerS` tokens per second
 *   keeps a quiet client able to retry at all.
 * - Every request adds `hedgeRatio` hedge tokens (capped at `hedgeCap`); a hedge spends one hedge
 *   token and one retry token, so hedges count against the retry budget too.
 * - At most max(3, concurrentFrac × requests in flight) extra attempts run at once.
 */
/**
 * The kind of extra attempt that follows a failed one: work lost with its agent (the agent died or is
 * shutting down, so the request never ran) or refused at its admission (MESH_OVERLOADED: it never started)
 * is a free failover; anything else is a retry paid from the budget.
 */
export function extraAttemptAfter(code: string): 'failover' | 'retry' {
  return code === 'MESH_AGENT_LOST' || code === 'MESH_SHUTTING_DOWN' || code === 'MESH_OVERLOADED' ? 'failover' : 'retry';
}

export interface TailBudgetOptions {
  /** Retry tokens earned per request (default 0.2: at most one extra attempt per five requests). */
  ratio: number;
  cap: number;
  /** Retry tokens earned per second whatever the traffic. */
  minPerS: number;
  /** Hedge tokens earned per request (default 0.05: hedges add at most 5 % load). */
  hedgeRatio: number;
  hedgeCap: number;
  /** Share of requests in flight that may have an extra attempt running at once. */
  concurrentFrac: number;
}

export const DEFAULT_TAIL_BUDGET: Readonly<TailBudgetOptions> = {
  ratio: 0.2,
  cap: 50,
  minPerS: 10,
  hedgeRatio: 0.05,
  hedgeCap: 10,
  concurrentFrac: 0.2,
};

export class TailBudget {
  readonly options: Readonly<TailBudgetOptions>;
  private retryTokens: number;
  private hedgeTokens: number;
  private lastRefillMs: number;
  /** Requests in flight and extra attempts (retries, hedges) in flight, kept by the caller's calls. */
  activeRequests = 0;
  activeExtras = 0;
  /** Extras refused for want of budget, by purpose. */
  readonly refused = { retry: 0, hedge: 0 };

  constructor(options: Partial<TailBudgetOptions> = {}, nowMs = 0) {
    this.options = { ...DEFAULT_TAIL_BUDGET, ...options };
    this.retryTokens = Math.min(this.options.cap, 10);
    this.hedgeTokens = Math.min(this.options.hedgeCap, 1);
    this.lastRefillMs = nowMs;
  }

  private refill(nowMs: number): void {
    const dt = Math.max(0, nowMs - this.lastRefillMs);
    this.lastRefillMs = nowMs;
    this.retryTokens = Math.min(this.options.cap, this.retryTokens + (this.options.minPerS * dt) / 1000);
  }

  /** A new request: earns its share of retry and hedge tokens. */
  onRequest(nowMs: number): void {
    this.refill(nowMs);
    this.activeRequests++;
    this.retryTokens = Math.min(this.options.cap, this.retryTokens + this.options.ratio);
    this.hedgeTokens = Math.min(this.options.hedgeCap, this.hedgeTokens + this.options.hedgeRatio);
  }

  onRequestDone(): void {
    this.activeRequests = Math.max(0, this.activeRequests - 1);
  }

  /** Spends the tokens for one extra attempt; false (and nothing spent) when the budget says no. */
  take(purpose: 'retry' | 'hedge', nowMs: number): boolean {
    this.refill(nowMs);
    const ok =
      this.retryTokens >= 1 &&
      (purpose === 'retry' || this.hedgeTokens >= 1) &&
      this.activeExtras < Math.max(3, this.options.concurrentFrac * this.activeRequests);
    if (!ok) {
      this.refused[purpose]++;
      return false;
    }
    this.retryTokens -= 1;
    if (purpose === 'hedge') this.hedgeTokens -= 1;
    this.activeExtras++;
    return true;
  }

  /** Gives back what `take` spent when no attempt was started after all (no node to send it to). */
  refund(purpose: 'retry' | 'hedge'): void {
    this.retryTokens = Math.min(this.options.cap, this.retryTokens + 1);
    if (purpose === 'hedge') this.hedgeTokens = Math.min(this.options.hedgeCap, this.hedgeTokens + 1);
    this.activeExtras = Math.max(0, this.activeExtras - 1);
  }

  /** An extra attempt paid by `take` ended (answered, failed or cancelled). */
  onExtraDone(): void {
    this.activeExtras = Math.max(0, this.activeExtras - 1);
  }
}
