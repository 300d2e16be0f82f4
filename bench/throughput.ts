/**
 * `npm run bench -- throughput [--quick] [--concurrency 64] [--loadgens 1] [--workers 1,2]
 *                               [--warmup-ms W] [--duration-ms D]`
 *
 * Steady-state kws requests per second through the mesh at a fixed number of outstanding requests.
 * Processes: one `edge-mesh broker`, one server at a time (`edge-mesh agent --workers W --queue-limit 1024`
 * for each W in --workers, where kws runs inline on the agent's main thread and the worker count matters
 * only for the other models; then the same with --workers 1 --inline-max-ms 0, kws on the worker thread
 * (config agent_w1_pool); then bench/echo-agent.ts, the no-op floor), and L bench/loadgen.ts processes
 * (SDK, QoS 1) sharing the concurrency (C/L closed loops each). For every configuration: the load
 * generators start (and wait for the server's status), all get `go` at once, run `warmup-ms`
 * (quick 1 s, full 3 s), then count the requests that complete in the next `duration-ms` (quick 3 s,
 * full 10 s); rps is summed over the load generators. The agent of the previous configuration is stopped
 * (its retained status goes offline) before the next one starts, so the SDK only ever sees one server.
 * mesh_rps is the best agent configuration (named in best_config); ratio = mesh_rps / echo_rps. Errors
 * are counted by code (must be 0). Per-process CPU over the measured window is under configs.*.cpu.
 */
import { round } from '@edge-mesh/client';
import { ensureModelsFolder } from '@edge-mesh/demo';
import type { Identity } from '@edge-mesh/protocol';
import {
  admitted,
  assertBuilt,
  type BenchContext,
  type BenchResult,
  CpuMeter,
  type CpuReport,
  environment,
  isEvent,
  loadgenResult,
  MODELS_DIR,
  type Proc,
  sleep,
  startAgentProc,
  startBrokerProc,
  startEchoAgentProc,
  startLoadgenProc,
} from './lib.ts';

const MODEL = 'kws';

interface ConfigResult {
  server: string;
  workers: number | null;
  rps: number;
  errors: Record<string, number>;
  error_count: number;
  retried: number;
  p50_ms: number;
  p99_ms: number;
  max_ms: number;
  agent_queue_p50_ms: number;
  agent_exec_p50_ms: number;
  per_loadgen_rps: number[];
  cpu: CpuReport;
}

function sumErrors(list: Record<string, number>[]): Record<string, number> {
  const out: Record<string, number> = {};
  for (const e of list) for (const [k, v] of Object.entries(e)) out[k] = (out[k] ?? 0) + v;
  return out;
}

export async function run(ctx: BenchContext): Promise<BenchResult> {
  const { args, quick, log } = ctx;
  const concurrency = typeof args.concurrency === 'string' ? Number(args.concurrency) : 64;
  const loadgens = typeof args.loadgens === 'string' ? Number(args.loadgens) : 1;
  const workerList = typeof args.workers === 'string' ? args.workers.split(',').map(Number) : [1, 2];
  const warmupMs = typeof args['warmup-ms'] === 'string' ? Number(args['warmup-ms']) : quick ? 1_000 : 3_000;
  const durationMs = typeof args['duration-ms'] === 'string' ? Number(args['duration-ms']) : quick ? 3_000 : 10_000;
  if (!(concurrency >= 1 && loadgens >= 1 && concurrency % loadgens === 0))
    throw new Error('--concurrency must be a positive multiple of --loadgens');
  assertBuilt();
  log(
    `throughput: model ${MODEL}, concurrency ${concurrency} over ${loadgens} load generator(s), warm-up ${warmupMs} ms, window ${durationMs} ms`,
  );
  await ensureModelsFolder(MODELS_DIR);

  const broker = await startBrokerProc();

  const runConfig = async (
    label: string,
    workers: number | null,
    startServer: (key: { identity: Identity; keyFile: string }) => Promise<Proc>,
  ): Promise<ConfigResult> => {
    const serverKey = await admitted(broker.url, 'agent');
    const appKeys = await Promise.all(Array.from({ length: loadgens }, () => admitted(broker.url, 'app')));
    // Load generators start alongside the server and wait for its status, which hides their start-up time.
    const [server, gens] = await Promise.all([
      startServer(serverKey),
      Promise.all(
        appKeys.map((app) =>
          startLoadgenProc({
            url: broker.url,
            keyFile: app.keyFile,
            id: app.identity.id,
            mode: 'throughput',
            concurrency: concurrency / loadgens,
            warmupMs,
            durationMs,
            deadlineMs: 10_000,
          }),
        ),
      ),
    ]);
    const procs: Record<string, number> = { broker: broker.proc.pid, [workers === null ? 'echo_agent' : 'agent']: server.pid };
    for (const [i, g] of gens.entries()) procs[loadgens === 1 ? 'loadgen' : `loadgen_${i}`] = g.pid;
    const meter = new CpuMeter(procs);
    let cpu: CpuReport = {};
    void gens[0]!.waitLine('stdout', isEvent('measuring'), 60_000).then(
      () => meter.begin(),
      () => {},
    );
    void gens[0]!.waitLine('stdout', isEvent('window-end'), 120_000).then(
      () => (cpu = meter.end()),
      () => {},
    );
    for (const g of gens) g.send('go');
    const results = await Promise.all(gens.map((g) => loadgenResult(g, warmupMs + durationMs + 20_000)));
    await Promise.all([...gens.map((g) => g.stop()), server.stop()]);
    const errors = sumErrors(results.map((r) => r.errors as Record<string, number>));
    const rps = results.reduce((a, r) => a + (r.rps as number), 0);
    const out: ConfigResult = {
      server: label,
      workers,
      rps: round(rps, 1),
      errors,
      error_count: Object.values(errors).reduce((a, b) => a + b, 0),
      retried: results.reduce((a, r) => a + (r.retried as number), 0),
      // Across load generators: the worst of their percentiles (each has C/L loops of the same kind).
      p50_ms: Math.max(...results.map((r) => r.p50_ms as number)),
      p99_ms: Math.max(...results.map((r) => r.p99_ms as number)),
      max_ms: Math.max(...results.map((r) => r.max_ms as number)),
      agent_queue_p50_ms: Math.max(...results.map((r) => r.agent_queue_p50_ms as number)),
      agent_exec_p50_ms: Math.max(...results.map((r) => r.agent_exec_p50_ms as number)),
      per_loadgen_rps: results.map((r) => r.rps as number),
      cpu,
    };
    log(
      `  ${label}: ${out.rps} req/s, p50 ${out.p50_ms} ms, p99 ${out.p99_ms} ms, max ${out.max_ms} ms, agent queue p50 ${out.agent_queue_p50_ms} ms, ` +
        `exec p50 ${out.agent_exec_p50_ms} ms, errors ${JSON.stringify(errors)}, CPU cores ${Object.entries(cpu)
          .map(([k, v]) => `${k} ${v.cores}`)
          .join(', ')}`,
    );
    // Let the offline status and socket teardown settle before the next configuration.
    await sleep(200);
    return out;
  };

  const configs: Record<string, ConfigResult> = {};
  for (const w of workerList) {
    configs[`agent_w${w}`] = await runConfig(`agent-w${w}`, w, (key) =>
      startAgentProc({ url: broker.url, keyFile: key.keyFile, id: key.identity.id, workers: w, queueLimit: 1_024 }),
    );
  }
  configs.agent_w1_pool = await runConfig('agent-w1-pool', 1, (key) =>
    startAgentProc({ url: broker.url, keyFile: key.keyFile, id: key.identity.id, workers: 1, queueLimit: 1_024, inlineMaxMs: 0 }),
  );
  configs.echo = await runConfig('echo', null, (key) => startEchoAgentProc(broker.url, key.identity.id, key.keyFile));
  await broker.proc.stop();

  const agentConfigs = Object.entries(configs).filter(([k]) => k !== 'echo');
  const [bestName, best] = agentConfigs.reduce((a, b) => (b[1].rps > a[1].rps ? b : a));
  const echo = configs.echo!;
  const errorCount = Object.values(configs).reduce((a, c) => a + c.error_count, 0);
  return {
    bench: 'throughput',
    quick,
    qos: 1,
    loadgens,
    warmup_ms: warmupMs,
    duration_ms: durationMs,
    best_config: bestName,
    best_workers: best.workers,
    mesh_p50_ms: best.p50_ms,
    mesh_p99_ms: best.p99_ms,
    echo_p50_ms: echo.p50_ms,
    echo_p99_ms: echo.p99_ms,
    error_count: errorCount,
    configs,
    ...environment(),
    model: MODEL,
    concurrency,
    mesh_rps: best.rps,
    echo_rps: echo.rps,
    ratio: round(best.rps / echo.rps, 3),
  };
}
