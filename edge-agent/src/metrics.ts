/**
 * The agent's Prometheus metrics (docs/operations.md, "Metrics"), loaded only when `metricsPort` is set so an agent
 * without it never holds prom-client (docs/agent.md, "Memory"). Per model queue and compute time, pending and ready
 * models, requests by outcome, process CPU and memory (prom-client's default metrics), the SoC temperature and
 * throttling where the board exposes them, and with payments the receipts, owed, voucher-paid and settled amounts.
 * Labels are bounded: the agent's own model names and MESH_* codes.
 */
import { execFile } from 'node:child_process';
import { readFile } from 'node:fs/promises';
import { PROMTOOL_REJECTED_DEFAULT_METRICS, serveMetrics } from '@edge-mesh/client';
import type { Logger } from 'pino';
import { Counter, collectDefaultMetrics, Gauge, Histogram, Registry } from 'prom-client';
import type { AgentCounters, AgentHandle } from './types.ts';

/** The Linux thermal zone a Raspberry Pi reports its SoC temperature in, millidegrees Celsius. */
const THERMAL_ZONE = '/sys/class/thermal/thermal_zone0/temp';

export interface AgentMetricsSources {
  counters: AgentCounters;
  /** Requests queued or running. */
  pending(): number;
  readyModels(): number;
  payments(): AgentHandle['payments'];
  logger: Logger;
}

export interface AgentMetrics {
  /** Called for every served request (requests.ts). */
  observeServed(model: string, queueMs: number, execMs: number): void;
  serve(port: number, host: string | undefined): Promise<string>;
  close(): Promise<void>;
}

function readThermal(): Promise<number | undefined> {
  return readFile(THERMAL_ZONE, 'utf8').then(
    (text) => {
      const milli = Number.parseInt(text.trim(), 10);
      return Number.isFinite(milli) ? milli / 1000 : undefined;
    },
    () => undefined,
  );
}

/** `vcgencmd get_throttled` prints `throttled=0x50005`; undefined when the tool is missing or says something else. */
function readThrottled(): Promise<number | undefined> {
  return new Promise((resolve) => {
    execFile('vcgencmd', ['get_throttled'], { timeout: 2_000 }, (err, stdout) => {
      const m = err ? null : /throttled=0x([0-9a-f]+)/i.exec(stdout);
      resolve(m ? Number.parseInt(m[1]!, 16) : undefined);
    });
  });
}

export async function createAgentMetrics(sources: AgentMetricsSources): Promise<AgentMetrics> {
  const { counters, logger } = sources;
  const registry = new Registry();
  collectDefaultMetrics({ register: registry });
  for (const name of PROMTOOL_REJECTED_DEFAULT_METRICS) registry.removeSingleMetric(name);
  const buckets = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10];
  const queueSeconds = new Histogram({
    name: 'edge_mesh_agent_queue_duration_seconds',
    help: 'Time a served request waited in the agent before it ran, by model',
    labelNames: ['model'] as const,
    buckets,
    registers: [registry],
  });
  const computeSeconds = new Histogram({
    name: 'edge_mesh_agent_compute_duration_seconds',
    help: 'Time a served request ran (onnxruntime), by model',
    labelNames: ['model'] as const,
    buckets,
    registers: [registry],
  });
  new Gauge({
    name: 'edge_mesh_agent_pending_requests',
    help: 'Requests queued or running now',
    registers: [registry],
    collect() {
      this.set(sources.pending());
    },
  });
  new Gauge({
    name: 'edge_mesh_agent_ready_models',
    help: 'Models loaded and served',
    registers: [registry],
    collect() {
      this.set(sources.readyModels());
    },
  });
  new Counter({
    name: 'edge_mesh_agent_requests_total',
    help: 'Requests answered, by outcome: ok or the MESH_* code of the error reply',
    labelNames: ['outcome'] as const,
    registers: [registry],
    collect() {
      this.reset();
      this.inc({ outcome: 'ok' }, counters.served);
      for (const [code, n] of Object.entries(counters.errors)) if (n > 0) this.inc({ outcome: code }, n);
    },
  });
  new Counter({
    name: 'edge_mesh_agent_stacked_runs_total',
    help: 'Inline runs that stacked the requests of one event-loop turn',
    registers: [registry],
    collect() {
      this.reset();
      this.inc(counters.stacked.runs);
    },
  });
  new Counter({
    name: 'edge_mesh_agent_stacked_requests_total',
    help: 'Requests run in stacked inline runs',
    registers: [registry],
    collect() {
      this.reset();
      this.inc(counters.stacked.requests);
    },
  });
  new Counter({
    name: 'edge_mesh_agent_requests_received_total',
    help: 'Request messages received (before any check)',
    registers: [registry],
    collect() {
      this.reset();
      this.inc(counters.received);
    },
  });
  if ((await readThermal()) !== undefined) {
    new Gauge({
      name: 'edge_mesh_agent_soc_temperature_celsius',
      help: `SoC temperature (${THERMAL_ZONE})`,
      registers: [registry],
      async collect() {
        const celsius = await readThermal();
        if (celsius !== undefined) this.set(celsius);
      },
    });
  }
  if ((await readThrottled()) !== undefined) {
    new Gauge({
      name: 'edge_mesh_agent_throttled_flags',
      help: 'Raspberry Pi throttling bits from `vcgencmd get_throttled` (bit 0 under-voltage, 1 frequency capped, 2 throttled, 3 soft temperature limit; bits 16-19 the same since boot)',
      registers: [registry],
      async collect() {
        const flags = await readThrottled();
        if (flags !== undefined) this.set(flags);
      },
    });
  }
  if (sources.payments()) {
    const lanesSum = (pick: (l: ReturnType<NonNullable<AgentHandle['payments']>['lanes']>[number]) => number) =>
      (sources.payments()?.lanes() ?? []).reduce((sum, l) => sum + pick(l), 0);
    new Counter({
      name: 'edge_mesh_agent_receipts_total',
      help: 'Usage receipts signed',
      registers: [registry],
      collect() {
        this.reset();
        this.inc(sources.payments()?.counters.receipts ?? 0);
      },
    });
    // What the paid side refused or left unanswered from apps, by kind (AgentPayments.counters): a rise in the
    // `_limited` kinds is an app sending more grants or resyncs than an honest one does (docs/security.md).
    const refusals = {
      voucher: 'vouchersRefused',
      voucher_limited: 'vouchersLimited',
      grant: 'grantsRefused',
      grant_limited: 'grantsLimited',
      resync: 'resyncsRefused',
      resync_limited: 'resyncsLimited',
      credit: 'creditRefusals',
      free_receipts_limited: 'freeReceiptsLimited',
    } as const;
    new Counter({
      name: 'edge_mesh_agent_payment_refusals_total',
      help: 'Payment messages refused: vouchers, lane grants (checked, or limited unchecked), resyncs (not the lane client’s, or limited), and paid requests for credit or for their lane’s free receipts',
      labelNames: ['kind'],
      registers: [registry],
      collect() {
        this.reset();
        const counters = sources.payments()?.counters;
        if (!counters) return;
        for (const [kind, key] of Object.entries(refusals)) this.inc({ kind }, counters[key]);
      },
    });
    new Gauge({
      name: 'edge_mesh_agent_owed_micro_dollars',
      help: 'What payer lanes owe by their receipts, micro-dollars',
      registers: [registry],
      collect() {
        this.set(lanesSum((l) => l.owedMicros));
      },
    });
    new Gauge({
      name: 'edge_mesh_agent_vouched_micro_dollars',
      help: "What payers' best vouchers pay, micro-dollars",
      registers: [registry],
      collect() {
        this.set(lanesSum((l) => l.paidMicros));
      },
    });
    if (sources.payments()?.settler) {
      new Gauge({
        name: 'edge_mesh_agent_settled_micro_dollars',
        help: 'What the escrow has settled to this agent, as the settler last saw it, micro-dollars',
        registers: [registry],
        collect() {
          const settled = sources.payments()?.settler?.settledByLane() ?? {};
          this.set(Object.values(settled).reduce((a, b) => a + b, 0));
        },
      });
    }
  }

  let server: Awaited<ReturnType<typeof serveMetrics>> | undefined;
  return {
    observeServed(model, queueMs, execMs) {
      queueSeconds.observe({ model }, Math.max(0, queueMs) / 1000);
      computeSeconds.observe({ model }, Math.max(0, execMs) / 1000);
    },
    async serve(port, host) {
      server = await serveMetrics({
        port,
        ...(host !== undefined ? { host } : {}),
        render: async () => ({ contentType: registry.contentType, text: await registry.metrics() }),
        onError: (err) => logger.warn({ err: (err as Error).message }, 'metrics render failed'),
      });
      return server.url;
    },
    async close() {
      await server?.close();
    },
  };
}
