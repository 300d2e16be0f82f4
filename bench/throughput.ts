/**
 * `npm run bench -- throughput [--quick] [--concurrency 64] [--loadgens 1] [--workers 1,2]
 *                               [--warmup-ms W] [--duration-ms D] [--rounds R]`
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
 * The agent configurations and the echo agent run in R rounds (quick 2, full 3), one after another within
 * each round (agent_w1_pool in the first round only): on a shared machine the load moves between phases,
 * and a ratio of two phases minutes apart measures that as much as the agent. Each configuration's
 * figures are its medians over the rounds (its rounds' own under `rounds`); best_config is the agent
 * configuration with the highest median rps, mesh_rps that median; ratio is the median over rounds of
 * best_config's rps ÷ the echo agent's rps in the same round (each in `ratio_rounds`). Errors are counted
 * by code (must be 0). Per-process CPU over the measured window is under configs.*.cpu, and per request
 * (CPU µs ÷ requests completed in the window) under configs.*.cpu_us_per_request; cpu_ratio = the echo
 * run's CPU per request (broker + server + load generators) ÷ best_config's, the ratio the two would
 * reach if the machine's cores were all theirs and busy, which moves less with other work than rps does.
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
  median,
  type Proc,
  parseJson,
  sleep,
  startAgentProc,
  startBrokerProc,
  startEchoAgentProc,
  startLoadgenProc,
  stopLoadgen,
} from './lib.ts';
import { bootstrapMedian, mean } from './sim/stats.ts';

const MODEL = 'kws';
/** How long the paired phase sends to one server before it turns to the other. */
const PAIRED_SLICE_MS = 250;

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
  /** CPU µs per request completed in the window: each process, and `total` (broker + server + load generators). */
  cpu_us_per_request: Record<string, number>;
  /** The agent's stacked inline runs over its whole life (warm-up included), from its 'agent stopped' log line. */
  stacked?: { runs: number; requests: number; fallbacks: number; served: number };
  /**
   * Where the agent put the model at load, from its log lines (edge-agent/src/executors.ts): `inline`, `pool`, and for
   * an inline model whether it stacks, with the reason when not. The inline and stacking checks are timed at start-up,
   * so a run can measure a different mode than the last one; this says which.
   */
  placement?: Placement;
}

export interface Placement {
  runs: 'inline' | 'pool';
  stacks?: boolean;
  reason?: string;
}

/** A configuration's medians over its rounds, and the rounds themselves. */
type ConfigSummary = Omit<ConfigResult, 'cpu' | 'per_loadgen_rps'> & { rounds: ConfigResult[] };

function summarizeRounds(rounds: ConfigResult[]): ConfigSummary {
  const med = (f: (r: ConfigResult) => number) => round(median(rounds.map(f)), 3);
  const first = rounds[0]!;
  const errors = sumErrors(rounds.map((r) => r.errors));
  return {
    server: first.server,
    workers: first.workers,
    rps: med((r) => r.rps),
    errors,
    error_count: errorTotal(errors),
    retried: rounds.reduce((a, r) => a + r.retried, 0),
    p50_ms: med((r) => r.p50_ms),
    p99_ms: med((r) => r.p99_ms),
    max_ms: Math.max(...rounds.map((r) => r.max_ms)),
    agent_queue_p50_ms: med((r) => r.agent_queue_p50_ms),
    agent_exec_p50_ms: med((r) => r.agent_exec_p50_ms),
    cpu_us_per_request: Object.fromEntries(
      Object.keys(first.cpu_us_per_request).map((k) => [k, med((r) => r.cpu_us_per_request[k] ?? Number.NaN)]),
    ),
    rounds,
  };
}

/**
 * Where an agent put `model` at load, from its log lines (edge-agent/src/executors.ts): on its main thread (`inline`)
 * or the worker pool, and for an inline model whether it stacks (with the reason when not); undefined without them.
 */
export function modelPlacement(lines: readonly string[], model: string): Placement | undefined {
  let placed: Partial<Placement> | undefined;
  for (const line of lines) {
    const j = parseJson(line);
    if (j?.model !== model) continue;
    const why = typeof j.reason === 'string' ? { reason: j.reason } : {};
    if (j.msg === 'model runs inline') placed = { ...placed, runs: 'inline' };
    else if (j.msg === 'model runs on the worker pool') placed = { ...placed, runs: 'pool', ...why };
    else if (j.msg === 'model runs stacked when requests wait together') placed = { ...placed, stacks: true };
    else if (j.msg === 'model runs one request at a time') placed = { ...placed, stacks: false, ...why };
  }
  return placed?.runs ? (placed as Placement) : undefined;
}

const errorTotal = (errors: Record<string, number>): number => Object.values(errors).reduce((a, b) => a + b, 0);

function sumErrors(list: Record<string, number>[]): Record<string, number> {
  const out: Record<string, number> = {};
  for (const e of list) for (const [k, v] of Object.entries(e)) out[k] = (out[k] ?? 0) + v;
  return out;
}

/** One slice of the paired phase: which server it sent to (0 the agent, 1 the echo agent) and its rps. */
export interface PairedSlice {
  agent: number;
  rps: number;
}

/**
 * Each agent slice's rps ÷ the mean rps of the echo slices either side of it (one at the ends): over three slices a
 * load on the machine that rises or falls steadily cancels out. A slice with no echo neighbour, or one whose echo
 * neighbours served nothing, gives none.
 */
export function pairedRatios(slices: readonly PairedSlice[]): number[] {
  const ratios: number[] = [];
  slices.forEach((slice, i) => {
    if (slice.agent !== 0) return;
    const echoes = [slices[i - 1], slices[i + 1]].filter((e) => e?.agent === 1).map((e) => e!.rps);
    const echoRps = echoes.length > 0 ? mean(echoes) : 0;
    if (echoRps > 0) ratios.push(slice.rps / echoRps);
  });
  return ratios;
}

export async function run(ctx: BenchContext): Promise<BenchResult> {
  const { args, quick, log } = ctx;
  const concurrency = typeof args.concurrency === 'string' ? Number(args.concurrency) : 64;
  const loadgens = typeof args.loadgens === 'string' ? Number(args.loadgens) : 1;
  const workerList = typeof args.workers === 'string' ? args.workers.split(',').map(Number) : [1, 2];
  const warmupMs = typeof args['warmup-ms'] === 'string' ? Number(args['warmup-ms']) : quick ? 1_000 : 3_000;
  const durationMs = typeof args['duration-ms'] === 'string' ? Number(args['duration-ms']) : quick ? 3_000 : 10_000;
  const roundCount = typeof args.rounds === 'string' ? Number(args.rounds) : quick ? 2 : 3;
  if (!(Number.isInteger(roundCount) && roundCount >= 1)) throw new Error('--rounds must be a positive integer');
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
    await Promise.all(gens.map(stopLoadgen));
    await server.stop();
    const errors = sumErrors(results.map((r) => r.errors as Record<string, number>));
    const rps = results.reduce((a, r) => a + (r.rps as number), 0);
    const served = (rps * durationMs) / 1_000;
    const perRequest: Record<string, number> = {};
    let total = 0;
    for (const [name, used] of Object.entries(cpu)) {
      if (name === 'machine' || name === 'others') continue;
      perRequest[name] = round((used.cpu_ms * 1_000) / served, 1);
      total += used.cpu_ms;
    }
    perRequest.total = round((total * 1_000) / served, 1);
    const out: ConfigResult = {
      server: label,
      workers,
      rps: round(rps, 1),
      errors,
      error_count: errorTotal(errors),
      retried: results.reduce((a, r) => a + (r.retried as number), 0),
      // Across load generators: the worst of their percentiles (each has C/L loops of the same kind).
      p50_ms: Math.max(...results.map((r) => r.p50_ms as number)),
      p99_ms: Math.max(...results.map((r) => r.p99_ms as number)),
      max_ms: Math.max(...results.map((r) => r.max_ms as number)),
      agent_queue_p50_ms: Math.max(...results.map((r) => r.agent_queue_p50_ms as number)),
      agent_exec_p50_ms: Math.max(...results.map((r) => r.agent_exec_p50_ms as number)),
      per_loadgen_rps: results.map((r) => r.rps as number),
      cpu,
      cpu_us_per_request: perRequest,
    };
    for (const line of server.lines.stderr) {
      const j = parseJson(line);
      if (j?.msg === 'agent stopped' && j.stacked)
        out.stacked = { ...(j.stacked as Omit<NonNullable<ConfigResult['stacked']>, 'served'>), served: Number(j.served) };
    }
    const placement = modelPlacement(server.lines.stderr, MODEL);
    if (placement) out.placement = placement;
    log(
      `  ${label}: ${out.rps} req/s, p50 ${out.p50_ms} ms, p99 ${out.p99_ms} ms, max ${out.max_ms} ms, agent queue p50 ${out.agent_queue_p50_ms} ms, ` +
        `exec p50 ${out.agent_exec_p50_ms} ms, errors ${JSON.stringify(errors)}, CPU µs/request ${JSON.stringify(perRequest)}, CPU cores ${Object.entries(
          cpu,
        )
          .map(([k, v]) => `${k} ${v.cores}`)
          .join(', ')}${out.stacked ? `, stacked ${JSON.stringify(out.stacked)}` : ''}${
          out.placement ? `, placement ${JSON.stringify(out.placement)}` : ''
        }`,
    );
    // Let the offline status and socket teardown settle before the next configuration.
    await sleep(200);
    return out;
  };

  /**
   * The first agent configuration and the echo agent online together, one load generator sending to each in turn for
   * PAIRED_SLICE_MS at a time (loadgen.ts, --slice-ms), for the rounds' windows together. Each agent slice is set against
   * the mean of the echo slices either side of it, so that a load on the machine that rises or falls steadily over the
   * three slices cancels out; `ratio` is the median of those, with a 95 % bootstrap interval over them (adjacent ratios
   * share an echo slice, so the interval is somewhat narrower than independent pairs would give).
   */
  const runPaired = async () => {
    const w = workerList[0]!;
    // One admission at a time, as runConfig's.
    const agentKey = await admitted(broker.url, 'agent');
    const echoKey = await admitted(broker.url, 'agent');
    const app = await admitted(broker.url, 'app');
    const [agent, echoAgent] = await Promise.all([
      startAgentProc({ url: broker.url, keyFile: agentKey.keyFile, id: agentKey.identity.id, workers: w, queueLimit: 1_024 }),
      startEchoAgentProc(broker.url, echoKey.identity.id, echoKey.keyFile),
    ]);
    const windowMs = durationMs * roundCount;
    const gen = await startLoadgenProc({
      url: broker.url,
      keyFile: app.keyFile,
      id: app.identity.id,
      mode: 'throughput',
      concurrency,
      warmupMs,
      durationMs: windowMs,
      deadlineMs: 10_000,
      agents: [agentKey.identity.id, echoKey.identity.id],
      sliceMs: PAIRED_SLICE_MS,
    });
    gen.send('go');
    const r = await loadgenResult(gen, warmupMs + windowMs + 20_000);
    await stopLoadgen(gen);
    await Promise.all([agent.stop(), echoAgent.stop()]);
    const slices = r.slices as PairedSlice[];
    const ratios = pairedRatios(slices);
    const [ratio, low, high] = bootstrapMedian(ratios);
    const errors = r.errors as Record<string, number>;
    const placement = modelPlacement(agent.lines.stderr, MODEL);
    const out = {
      config: `agent_w${w}`,
      placement: placement ?? null,
      slice_ms: r.slice_ms as number,
      settle_ms: r.settle_ms as number,
      pairs: ratios.length,
      ratio: round(ratio, 3),
      ratio_ci95: [round(low, 3), round(high, 3)],
      mesh_rps: round(median(slices.filter((x) => x.agent === 0).map((x) => x.rps)), 1),
      echo_rps: round(median(slices.filter((x) => x.agent === 1).map((x) => x.rps)), 1),
      errors,
      error_count: errorTotal(errors),
      slices: slices.map((x) => x.rps),
    };
    log(
      `  paired (agent-w${w} and echo in turns of ${out.slice_ms} ms): ratio ${out.ratio} [${out.ratio_ci95.join(', ')}] over ${out.pairs} slices, ` +
        `agent ${out.mesh_rps} req/s, echo ${out.echo_rps} req/s, errors ${JSON.stringify(errors)}, placement ${JSON.stringify(placement)}`,
    );
    return out;
  };

  const runs: Record<string, ConfigResult[]> = {};
  const add = (name: string, r: ConfigResult) => {
    runs[name] ??= [];
    runs[name].push(r);
  };
  for (let r = 0; r < roundCount; r++) {
    if (roundCount > 1) log(`  round ${r + 1} of ${roundCount}`);
    for (const w of workerList) {
      add(
        `agent_w${w}`,
        await runConfig(`agent-w${w}`, w, (key) =>
          startAgentProc({ url: broker.url, keyFile: key.keyFile, id: key.identity.id, workers: w, queueLimit: 1_024 }),
        ),
      );
    }
    if (r === 0) {
      add(
        'agent_w1_pool',
        await runConfig('agent-w1-pool', 1, (key) =>
          startAgentProc({ url: broker.url, keyFile: key.keyFile, id: key.identity.id, workers: 1, queueLimit: 1_024, inlineMaxMs: 0 }),
        ),
      );
    }
    add('echo', await runConfig('echo', null, (key) => startEchoAgentProc(broker.url, key.identity.id, key.keyFile)));
  }
  const paired = await runPaired();
  await broker.proc.stop();

  const configs: Record<string, ConfigSummary> = {};
  for (const [name, list] of Object.entries(runs)) configs[name] = summarizeRounds(list);
  const agentConfigs = Object.entries(configs).filter(([k]) => k !== 'echo');
  const [bestName, best] = agentConfigs.reduce((a, b) => (b[1].rps > a[1].rps ? b : a));
  const echo = configs.echo!;
  const errorCount = Object.values(configs).reduce((a, c) => a + c.error_count, 0) + paired.error_count;
  // Per round: the best configuration against the echo agent of the same round (the pool config has one round).
  const ratioRounds = best.rounds.map((b, i) => round(b.rps / echo.rounds[i]!.rps, 3));
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
    rounds: roundCount,
    ratio_rounds: ratioRounds,
    cpu_ratio: round(echo.cpu_us_per_request.total! / best.cpu_us_per_request.total!, 3),
    // Per round, where the best configuration's agent ran the model (see ConfigResult.placement).
    best_placement: best.rounds.map((b) => b.placement ?? null),
    paired_ratio: paired.ratio,
    paired_ratio_ci95: paired.ratio_ci95,
    paired,
    configs,
    ...environment(),
    model: MODEL,
    concurrency,
    mesh_rps: best.rps,
    echo_rps: echo.rps,
    ratio: round(median(ratioRounds), 3),
  };
}
