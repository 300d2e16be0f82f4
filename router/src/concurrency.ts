/**
 * The router's adaptive concurrency limit on the requests it forwards for the HTTP and gRPC APIs (docs/routing.md,
 * "Adaptive concurrency"). It follows Envoy's gradient controller,
 * source/extensions/filters/http/adaptive_concurrency/controller/gradient_controller.cc in envoyproxy/envoy, rule by
 * rule, with Envoy's defaults but one: the floor (min_concurrency) is 20, not 3. At 3 the first minRTT window (50
 * requests at a concurrency of 3) refused requests in `edge-mesh up`, whose HTTP path sees about 3 requests a second,
 * some of them OCR images that take a second or more. 20 is the default minLimit of Netflix concurrency-limits'
 * Gradient2Limit (concurrency-limits-core/src/main/java/com/netflix/concurrency/limits/limit/Gradient2Limit.java).
 *
 * - A request goes on while fewer than `limit` are outstanding; beyond that it is refused at once (MESH_OVERLOADED,
 *   HTTP 503), never queued. Every request that went on and ended (answered or failed) is a latency sample.
 * - **minRTT window.** At start, and every `minRttIntervalMs` (plus up to `jitterPct` of it) after the last one ended,
 *   the limit is pinned to `minConcurrency` and the samples of `minRttRequests` requests started in the window make
 *   the baseline: minRTT is their `percentile`. Samples of requests started before the window are not counted. Then
 *   the limit goes back to what it was.
 * - **Sample windows.** Every `sampleIntervalMs` outside a minRTT window, the window's samples give sampleRTT (the
 *   same percentile), and the limit becomes `limit × gradient + √(limit × gradient)`, where gradient =
 *   minRTT × (1 + `bufferPct`) / sampleRTT clamped to [0.5, 2], the result clamped to [minConcurrency, maxConcurrency].
 *   Latency above the buffered baseline shrinks the limit; latency at or below it lets it grow.
 * - A limit set to `minConcurrency` for five sample windows in a row starts a new minRTT window at once (the
 *   baseline is presumed wrong).
 *
 * One difference, in form only: Envoy runs the windows on timers; here they are advanced by the requests themselves
 * (each acquire and release looks at the clock first). With no traffic nothing would change in Envoy either, since
 * an empty sample window leaves the limit as it is.
 *
 * **Shares between callers.** Envoy's limit is one pool, so one caller sending slow requests fast enough holds every
 * permit and everyone else is refused. Each request names its caller (the credential that made it, or the address
 * when the router takes no credentials), and the limit is shared the way Netflix concurrency-limits shares it between
 * partitions (concurrency-limits-core/src/main/java/com/netflix/concurrency/limits/limiter/AbstractPartitionedLimiter.java):
 * below the limit anyone goes on; at or above it, a caller still goes on while it holds fewer than its share,
 * max(1, ⌈limit × fraction⌉). Netflix's fractions are configured per partition; here every caller holding a permit
 * (and the one asking) gets an equal fraction. So a caller at the limit alone is refused, and a newcomer next to a
 * flood gets up to half the limit, beyond the limit; the flood is refused until it is back under the limit. Netflix's
 * fractions add up to one, so its overshoot is bounded; callers here come and go, so the overshoot has a ceiling of
 * its own: at twice the limit everyone is refused.
 */
import { MeshError } from '@edge-mesh/protocol';

export interface AdaptiveConcurrencyOptions {
  /** The limit during a minRTT window, and its floor (default 20; Envoy's min_concurrency defaults to 3). */
  minConcurrency?: number;
  /** The limit's ceiling (max_concurrency_limit, default 1,000). */
  maxConcurrency?: number;
  /** Samples that make a minRTT baseline (request_count, default 50). */
  minRttRequests?: number;
  /** Time between minRTT windows, ms (interval, default 60,000). */
  minRttIntervalMs?: number;
  /** Random extra on that interval, a fraction of it (jitter, default 0.15). */
  jitterPct?: number;
  /** Length of a sample window, ms (concurrency_update_interval, default 100). */
  sampleIntervalMs?: number;
  /** Headroom over minRTT before latency counts as higher (buffer, default 0.25). */
  bufferPct?: number;
  /** The percentile of a window's samples that stands for it (sample_aggregate_percentile, default 0.5). */
  percentile?: number;
  /** Milliseconds, monotonic (default performance.now). */
  now?: () => number;
  random?: () => number;
}

/** What /metrics and the tests read. */
export interface ConcurrencySnapshot {
  limit: number;
  outstanding: number;
  /** The baseline, ms; NaN before the first minRTT window ended. */
  minRttMs: number;
  /** The last sample window's latency, ms; NaN before the first. */
  sampleRttMs: number;
  gradient: number;
  inMinRttWindow: boolean;
  /** Requests refused for the limit since start. */
  refused: number;
  /** Callers holding a permit now. */
  callers: number;
  /** Latency samples taken since start (requests that went on and ended, started in a counted window). */
  samples: number;
}

/** A request let through; `release` it exactly once when it ends. */
export interface ConcurrencyPermit {
  release(): void;
}

/** How far past the limit the callers' shares may take the requests outstanding: this many times the limit. */
const OVERSHOOT = 2;

/** Most samples a window keeps (a 100 ms window at 40,000 requests/s); later ones in the same window are dropped. */
const MAX_SAMPLES = 4_096;
/** Sample windows in a row at the floor before the baseline is measured again (Envoy's constant). */
const MIN_LIMIT_WINDOWS = 5;

export class AdaptiveConcurrency {
  private readonly o: Required<Omit<AdaptiveConcurrencyOptions, 'now' | 'random'>>;
  private readonly now: () => number;
  private readonly random: () => number;
  private limitValue: number;
  private outstanding = 0;
  private samples: number[] = [];
  private minRttMs = Number.NaN;
  private sampleRttMs = Number.NaN;
  private gradient = 1;
  private deferredLimit: number;
  private inMinRttWindow = false;
  private minRttEpoch = 0;
  private nextMinRttAt = 0;
  private nextSampleAt: number;
  private atFloorWindows = 0;
  private refused = 0;
  private sampled = 0;
  /** Permits held, by caller; a caller holding none is not in it. */
  private readonly held = new Map<string, number>();

  constructor(options: AdaptiveConcurrencyOptions = {}) {
    this.o = {
      minConcurrency: options.minConcurrency ?? 20,
      maxConcurrency: options.maxConcurrency ?? 1_000,
      minRttRequests: options.minRttRequests ?? 50,
      minRttIntervalMs: options.minRttIntervalMs ?? 60_000,
      jitterPct: options.jitterPct ?? 0.15,
      sampleIntervalMs: options.sampleIntervalMs ?? 100,
      bufferPct: options.bufferPct ?? 0.25,
      percentile: options.percentile ?? 0.5,
    };
    const { minConcurrency, maxConcurrency, minRttRequests, sampleIntervalMs, percentile } = this.o;
    if (!Number.isInteger(minConcurrency) || minConcurrency < 1 || !Number.isInteger(maxConcurrency) || maxConcurrency < minConcurrency)
      throw new MeshError(
        'MESH_CONFIG',
        `concurrency limits must be integers with 1 ≤ min ≤ max, got ${minConcurrency} and ${maxConcurrency}`,
      );
    if (!Number.isInteger(minRttRequests) || minRttRequests < 1 || !(sampleIntervalMs > 0) || !(percentile > 0 && percentile <= 1))
      throw new MeshError('MESH_CONFIG', 'minRttRequests must be a positive integer, sampleIntervalMs positive, percentile in (0, 1]');
    this.now = options.now ?? (() => performance.now());
    this.random = options.random ?? Math.random;
    this.limitValue = minConcurrency;
    this.deferredLimit = minConcurrency;
    this.nextSampleAt = this.now() + sampleIntervalMs;
    this.enterMinRttWindow(this.now());
  }

  /**
   * A permit for `caller`, or MESH_OVERLOADED at once when `limit` requests are outstanding and `caller` already holds
   * its share of them (details: `limit`, `held`, `share`). Requests that name no caller share one.
   */
  acquire(caller = ''): ConcurrencyPermit {
    const now = this.now();
    this.advance(now);
    const held = this.held.get(caller) ?? 0;
    if (this.outstanding >= this.limitValue) {
      const callers = this.held.size + (held === 0 ? 1 : 0);
      const share = Math.max(1, Math.ceil(this.limitValue / callers));
      // Shares go past the limit by at most the limit again: many callers (or one with many addresses) cannot take
      // the router past twice its limit.
      const ceiling = this.outstanding >= OVERSHOOT * this.limitValue;
      if (held >= share || ceiling) {
        this.refused++;
        throw new MeshError(
          'MESH_OVERLOADED',
          ceiling
            ? `the router has ${this.outstanding} requests in flight, twice its adaptive concurrency limit`
            : `the router has ${this.outstanding} requests in flight, its adaptive concurrency limit, and this caller holds ${held} of them, its share`,
          { details: { limit: this.limitValue, held, share } },
        );
      }
    }
    this.outstanding++;
    this.held.set(caller, held + 1);
    const startedAt = now;
    let released = false;
    return {
      release: () => {
        if (released) return;
        released = true;
        const left = (this.held.get(caller) ?? 1) - 1;
        if (left > 0) this.held.set(caller, left);
        else this.held.delete(caller);
        this.record(startedAt);
      },
    };
  }

  snapshot(): ConcurrencySnapshot {
    this.advance(this.now());
    return {
      limit: this.limitValue,
      outstanding: this.outstanding,
      minRttMs: this.minRttMs,
      sampleRttMs: this.sampleRttMs,
      gradient: this.gradient,
      inMinRttWindow: this.inMinRttWindow,
      refused: this.refused,
      callers: this.held.size,
      samples: this.sampled,
    };
  }

  private record(startedAt: number): void {
    const now = this.now();
    this.outstanding--;
    this.advance(now);
    // A request started before the minRTT window began says nothing about the baseline.
    if (startedAt < this.minRttEpoch) return;
    this.sampled++;
    if (this.samples.length < MAX_SAMPLES) this.samples.push(now - startedAt);
    if (this.inMinRttWindow && this.samples.length >= this.o.minRttRequests) this.endMinRttWindow(now);
  }

  /** Runs the windows due by `now` (Envoy's timers): the sample window, then a minRTT window if one is due. */
  private advance(now: number): void {
    if (!this.inMinRttWindow && now >= this.nextSampleAt) {
      // One window's samples, however many intervals passed without a request.
      this.nextSampleAt = now + this.o.sampleIntervalMs;
      if (this.samples.length > 0) {
        this.sampleRttMs = this.takePercentile();
        this.setLimit(this.newLimit());
      }
    }
    if (!this.inMinRttWindow && now >= this.nextMinRttAt) this.enterMinRttWindow(now);
  }

  private enterMinRttWindow(now: number): void {
    this.inMinRttWindow = true;
    this.deferredLimit = this.limitValue;
    this.setLimit(this.o.minConcurrency);
    this.samples = [];
    this.minRttEpoch = now;
  }

  private endMinRttWindow(now: number): void {
    this.minRttMs = this.takePercentile();
    // Set while still in the window, as Envoy does: the restored limit does not count as a window at the floor.
    this.setLimit(this.deferredLimit);
    this.inMinRttWindow = false;
    const { minRttIntervalMs, jitterPct, sampleIntervalMs } = this.o;
    this.nextMinRttAt = now + minRttIntervalMs + (jitterPct > 0 ? Math.floor(this.random() * Math.ceil(minRttIntervalMs * jitterPct)) : 0);
    this.nextSampleAt = now + sampleIntervalMs;
  }

  private newLimit(): number {
    const buffered = this.minRttMs * (1 + this.o.bufferPct);
    this.gradient = this.sampleRttMs > 0 ? Math.max(0.5, Math.min(2, buffered / this.sampleRttMs)) : 2;
    const limit = this.limitValue * this.gradient;
    const next = Math.floor(limit + Math.sqrt(limit));
    return Math.max(this.o.minConcurrency, Math.min(this.o.maxConcurrency, next));
  }

  private setLimit(limit: number): void {
    const floor = this.o.minConcurrency;
    if (!this.inMinRttWindow && this.limitValue === floor && limit === floor) this.atFloorWindows++;
    else this.atFloorWindows = 0;
    this.limitValue = limit;
    if (this.atFloorWindows >= MIN_LIMIT_WINDOWS) this.nextMinRttAt = this.now();
  }

  /** The window's percentile, and the window emptied. */
  private takePercentile(): number {
    const sorted = this.samples.sort((a, b) => a - b);
    this.samples = [];
    return sorted[Math.min(sorted.length - 1, Math.max(0, Math.ceil(this.o.percentile * sorted.length) - 1))]!;
  }
}
