/**
 * The sample IoT app of `edge-mesh up`: a steady, open-loop stream of inference requests over all
 * models with plausible inputs, and a report of requests, errors and p50/p99 latency per model and
 * per agent.
 */

import { round } from '@edge-mesh/client';
import { type Identity, isMeshErrorCode, type Tensor } from '@edge-mesh/protocol';
import { connect, type Mesh, type PaymentOptions } from '@edge-mesh/sdk';
import type { Logger } from 'pino';
import { encodeKServeBinaryInputs, encodeKServeInputs, kserveInfer } from './kserve-client.ts';
import type { AppReady, AppSummary, WarmupSummary } from './parts.ts';
import { sampleInputs } from './sample-inputs.ts';
import { formatTable, TallyMap } from './stats.ts';

/** Generous budgets: the whole local mesh shares two cores with whatever else runs here. */
export const SAMPLE_DEADLINES_MS: Record<string, number> = { kws: 500, vad: 500, 'ocr-cls': 1_000, 'ocr-det': 3_000 };
const SEEDS_PER_MODEL = 8;
const MAX_IN_FLIGHT = 256;
/** A warm-up request's deadline: the first request down a path may wait for code read from disk on a fresh machine. */
const WARMUP_DEADLINE_MS = 10_000;

export interface SampleAppOptions {
  mesh: Mesh;
  models: string[];
  ratePerS: number;
  logger: Logger;
  /** How the report names an agent (default: its id). */
  agentLabel?: (agentId: string) => string;
  /**
   * A thin client (e.g. the router's KServe HTTP API) that carries every `every`-th request instead
   * of the SDK; its requests are counted under the path name `name`.
   */
  thinClient?: {
    name: string;
    every: number;
    infer(model: string, inputs: Record<string, Tensor>, deadlineMs: number): Promise<{ agentId: string }>;
    /** Does the one-time work for a sample it will send (encoding its body), before the first request. */
    prepare?(inputs: Record<string, Tensor>): void;
  };
}

export class SampleApp {
  readonly byModel = new TallyMap();
  readonly byAgent = new TallyMap();
  readonly errorCodes: Record<string, number> = {};
  /** Answered requests by the way they went: 'leased' (SDK on a router lease), 'local' (SDK chose), or the thin client's name. */
  readonly paths: Record<string, number> = {};
  private timer: NodeJS.Timeout | undefined;
  private inFlight = new Set<Promise<void>>();
  private sent = 0;
  private skipped = 0;
  private readonly inputsCache = new Map<string, Record<string, Tensor>>();
  private startedAt = 0;
  private warmup: WarmupSummary = { requests: 0, ok: 0, error_codes: {}, slowest_ms: null, took_ms: 0 };

  constructor(private readonly options: SampleAppOptions) {}

  /**
   * Sends one request of each model on each way the app sends (the SDK; the thin client, when there is one), one at
   * a time, before the stream starts. The first request down a path loads code in every part it crosses (read from
   * disk on a freshly booted machine: seconds, not milliseconds) and opens the app's payment lanes; sent on the
   * stream's clock, those requests missed their deadlines. Reported apart (`warmup`), never counted in the stream's
   * figures; a failure here is counted there and does not stop the app.
   */
  async warmUp(): Promise<WarmupSummary> {
    const { mesh, models, logger } = this.options;
    const thin = this.options.thinClient;
    const began = performance.now();
    const w = this.warmup;
    const ways: ((model: string, inputs: Record<string, Tensor>) => Promise<unknown>)[] = [
      (model, inputs) => mesh.infer(model, inputs, { deadlineMs: WARMUP_DEADLINE_MS }),
      ...(thin ? [(model: string, inputs: Record<string, Tensor>) => thin.infer(model, inputs, WARMUP_DEADLINE_MS)] : []),
    ];
    for (const send of ways) {
      for (const [i, model] of models.entries()) {
        const started = performance.now();
        w.requests++;
        try {
          await send(model, this.inputsFor(i));
          w.ok++;
        } catch (err) {
          const raw = (err as { code?: unknown }).code;
          const code = isMeshErrorCode(raw) ? raw : 'MESH_INTERNAL';
          w.error_codes[code] = (w.error_codes[code] ?? 0) + 1;
          logger.warn({ model, code, err: (err as Error).message }, 'warm-up request failed');
        }
        w.slowest_ms = Math.max(w.slowest_ms ?? 0, round(performance.now() - started, 3));
      }
    }
    w.took_ms = round(performance.now() - began, 1);
    logger.info({ ...w }, 'warmed up');
    return { ...w, error_codes: { ...w.error_codes } };
  }

  /**
   * Builds every sample the app will send, and lets the thin client encode the ones it will carry.
   * Done lazily, this one-time work (about half a second of CPU, mostly the OCR images and their JSON
   * bodies) landed in the first seconds of sending and delayed those requests.
   */
  prepare(): void {
    const { models } = this.options;
    const thin = this.options.thinClient;
    // The request pattern repeats every models × seeds × thin.every requests.
    const period = models.length * SEEDS_PER_MODEL * (thin?.every ?? 1);
    for (let n = 0; n < period; n++) {
      const inputs = this.inputsFor(n);
      if (thin && n % thin.every === thin.every - 1) thin.prepare?.(inputs);
    }
  }

  /** The model and cached inputs of the n-th request. */
  private inputsFor(n: number): Record<string, Tensor> {
    const { models } = this.options;
    const model = models[n % models.length]!;
    const seed = 1 + (Math.floor(n / models.length) % SEEDS_PER_MODEL);
    // The SDK neither mutates nor transfers inputs, so each sample is built once and reused.
    const cacheKey = `${model}:${seed}`;
    let inputs = this.inputsCache.get(cacheKey);
    if (!inputs) {
      inputs = sampleInputs(model, seed);
      this.inputsCache.set(cacheKey, inputs);
    }
    return inputs;
  }

  start(): void {
    const { ratePerS } = this.options;
    this.startedAt = performance.now();
    // Ticks every 10 ms and sends however many requests the schedule owes, so the offered load stays
    // steady even when a timer fires late.
    this.timer = setInterval(() => {
      const due = Math.floor(((performance.now() - this.startedAt) / 1000) * ratePerS);
      while (this.sent < due) this.sendOne();
    }, 10);
  }

  private sendOne(): void {
    const { mesh, models, logger } = this.options;
    const n = this.sent++;
    const model = models[n % models.length]!;
    if (this.inFlight.size >= MAX_IN_FLIGHT) {
      this.skipped++;
      return;
    }
    const inputs = this.inputsFor(n);
    const started = performance.now();
    const deadlineMs = SAMPLE_DEADLINES_MS[model] ?? 1_000;
    const thin = this.options.thinClient;
    const sent: Promise<{ agentId: string; path: string }> =
      thin && n % thin.every === thin.every - 1
        ? thin.infer(model, inputs, deadlineMs).then((r) => ({ agentId: r.agentId, path: thin.name }))
        : mesh.infer(model, inputs, { deadlineMs }).then((r) => ({ agentId: r.agentId, path: r.routedBy ? 'leased' : 'local' }));
    const p = sent
      .then(
        (result) => {
          const ms = performance.now() - started;
          this.byModel.get(model).record(ms);
          this.byAgent.get(result.agentId).record(ms);
          this.paths[result.path] = (this.paths[result.path] ?? 0) + 1;
        },
        (err: { code?: unknown; message?: string; cause?: unknown }) => {
          // Only the mesh's codes are counted by name; anything else (a DOM or Node error code) is a bug to report as one.
          const code = isMeshErrorCode(err.code) ? err.code : 'MESH_INTERNAL';
          this.errorCodes[code] = (this.errorCodes[code] ?? 0) + 1;
          this.byModel.get(model).record(undefined);
          // The last agent's answer (an agent's own refusal, say) is the cause of a deadline passed: logged with it.
          const cause = err.cause as { code?: unknown; message?: unknown } | undefined;
          logger.warn(
            {
              model,
              code,
              err: err.message,
              ...(cause?.message !== undefined ? { cause: `${String(cause.code)}: ${String(cause.message)}` } : {}),
            },
            'sample request failed',
          );
        },
      )
      .finally(() => this.inFlight.delete(p));
    this.inFlight.add(p);
  }

  /** Stops sending and waits for every outstanding request to settle. */
  async stop(): Promise<void> {
    if (this.timer) clearInterval(this.timer);
    this.timer = undefined;
    await Promise.all([...this.inFlight]);
  }

  /** The periodic report: the last window's latency, the running totals. */
  report(): string {
    const modelRows = [...this.byModel.byKey].sort().map(([name, t]) => {
      const w = t.takeWindow();
      return [name, t.requests, t.ok, t.errors, w.n ? round(w.p50, 2) : '-', w.n ? round(w.p99, 2) : '-'];
    });
    const label = this.options.agentLabel ?? ((id: string) => id);
    const agentRows = [...this.byAgent.byKey]
      .map(([id, t]) => [label(id), t] as const)
      .sort(([a], [b]) => a.localeCompare(b))
      .map(([name, t]) => {
        const w = t.takeWindow();
        return [name, t.requests, t.ok, t.errors, w.n ? round(w.p50, 2) : '-', w.n ? round(w.p99, 2) : '-'];
      });
    const header = ['', 'requests', 'ok', 'errors', 'p50 ms', 'p99 ms'];
    const elapsed = ((performance.now() - this.startedAt) / 1000).toFixed(0);
    const skipped = this.skipped ? `, ${this.skipped} not sent (too many in flight)` : '';
    return [
      `-- ${elapsed}s: ${this.totals().requests} requests, ${this.totals().errors} errors${skipped}`,
      formatTable(['model', ...header.slice(1)], modelRows),
      formatTable(['agent', ...header.slice(1)], agentRows),
    ].join('\n');
  }

  /** Totals, latency per model and per agent (by id), error codes and paths, for the `--json` summary. */
  summary(): AppSummary {
    const models: AppSummary['models'] = {};
    for (const [name, t] of this.byModel.byKey) {
      const s = t.total();
      models[name] = { requests: s.requests, p50_ms: s.p50_ms, p99_ms: s.p99_ms };
    }
    const perAgent: AppSummary['per_agent'] = {};
    for (const [id, t] of this.byAgent.byKey) {
      const s = t.total();
      perAgent[id] = { requests: s.requests, p50_ms: s.p50_ms, p99_ms: s.p99_ms };
    }
    return {
      ...this.totals(),
      models,
      per_agent: perAgent,
      error_codes: { ...this.errorCodes },
      paths: { ...this.paths },
      warmup: { ...this.warmup, error_codes: { ...this.warmup.error_codes } },
    };
  }

  totals(): { requests: number; ok: number; errors: number } {
    let requests = 0;
    let ok = 0;
    let errors = 0;
    for (const t of this.byModel.byKey.values()) {
      requests += t.requests;
      ok += t.ok;
      errors += t.errors;
    }
    return { requests, ok, errors };
  }
}

export interface RunSampleAppOptions {
  brokerUrl: string;
  identity?: Identity;
  /** Ask this router for route leases (direct mode). */
  router?: string;
  /** The router's HTTP API: every `httpEvery`-th request goes to its KServe endpoint, as a thin client's would. */
  httpUrl?: string;
  httpEvery?: number;
  /** JSON tensors over HTTP; by default the binary tensor extension, as Triton's HTTP client sends them. */
  httpJson?: boolean;
  /** The `Authorization` header value for the router's HTTP API (an API key or a mesh token, docs/security.md). */
  httpAuthorization?: () => string;
  /** TLS and password credentials for the broker (docs/operations.md). */
  brokerAccess?: Pick<import('@edge-mesh/sdk').ConnectOptions, 'tls' | 'username' | 'password'>;
  models: string[];
  /** Send nothing until this many agents serve every model (their signed statuses seen). */
  agents: number;
  waitMs: number;
  ratePerS: number;
  /** Stop by itself after this many seconds of sending. */
  durationS?: number;
  reportEveryS: number;
  payment?: PaymentOptions;
  agentLabel?: (agentId: string) => string;
  logger: Logger;
  /** Where the periodic report goes. */
  print: (text: string) => void;
  /** Called once the app is sending. */
  onReady?: (ready: AppReady) => void | Promise<void>;
}

/**
 * The sample app as a process of its own (`edge-mesh demo app`): connects, waits until every model is
 * served by `agents` agents, sends until `stop` resolves (or for `durationS`), waits for every
 * outstanding request, and returns the summary.
 */
export async function runSampleApp(options: RunSampleAppOptions, stop: Promise<unknown>): Promise<AppSummary> {
  const { logger } = options;
  const mesh = await connect({
    brokerUrl: options.brokerUrl,
    ...(options.brokerAccess ?? {}),
    logger,
    ...(options.identity ? { identity: options.identity } : {}),
    ...(options.router ? { router: options.router } : {}),
    ...(options.payment ? { payment: options.payment } : {}),
  });
  let app: SampleApp | undefined;
  let reporter: NodeJS.Timeout | undefined;
  try {
    for (const model of options.models) await mesh.waitForModel(model, options.waitMs, options.agents);
    const httpUrl = options.httpUrl;
    app = new SampleApp({
      mesh,
      models: options.models,
      ratePerS: options.ratePerS,
      logger,
      ...(options.agentLabel ? { agentLabel: options.agentLabel } : {}),
      ...(httpUrl
        ? {
            thinClient: {
              name: 'http',
              every: options.httpEvery ?? 10,
              infer: (model: string, inputs: Record<string, Tensor>, deadlineMs: number) =>
                kserveInfer(httpUrl, model, inputs, deadlineMs, options.httpAuthorization?.(), { json: options.httpJson === true }),
              prepare: (inputs: Record<string, Tensor>) =>
                void (options.httpJson ? encodeKServeInputs(inputs) : encodeKServeBinaryInputs(inputs)),
            },
          }
        : {}),
    });
    app.prepare();
    const warm = await app.warmUp();
    options.print(`-- warm-up: ${warm.ok} of ${warm.requests} answered, the slowest in ${warm.slowest_ms ?? '-'} ms (not counted below)`);
    app.start();
    await options.onReady?.({ models: options.models, agents: options.agents, ratePerS: options.ratePerS });
    const running = app;
    reporter = setInterval(() => options.print(running.report()), options.reportEveryS * 1000);
    const timeout = options.durationS === undefined ? undefined : new Promise<void>((r) => setTimeout(r, options.durationS! * 1000));
    await Promise.race(timeout ? [stop, timeout] : [stop]);
    clearInterval(reporter);
    await app.stop();
    options.print(app.report());
    return app.summary();
  } finally {
    if (reporter) clearInterval(reporter);
    await app?.stop();
    await mesh.close();
  }
}
