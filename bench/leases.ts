/**
 * `npm run bench -- leases [--quick]`: the lease path against the forwarded path, on one fleet of real processes, with
 * one agent that is slow, lies or fails (docs/benchmarks.md, "leases"; docs/routing.md, "Two ways in").
 *
 * Processes: a broker, three `edge-mesh agent`s with the real wake-word model (two honest, one "odd"), a router
 * (`edge-mesh router`, fresh for every run so that no run inherits what another taught it), and a load generator
 * (bench/lease-loadgen.ts) that sends wake-word requests at a steady rate, open loop, on one path per run:
 *   leased     the SDK with the router named: route leases, then straight to the agents (about 90 % of `npm start`);
 *   forwarded  the router's KServe HTTP API: the router picks, forwards, and sees every reply;
 *   mixed      (full mode, or `--paths`) both on one router, every tenth request forwarded, as `npm start` sends them.
 *
 * Phases, each with its own odd agent (a fresh process and key, faults from MESH_AGENT_FAULTS, docs/agent.md,
 * "Injected faults"):
 *   honest   the odd agent is slow (`extraExecMs`, default 100 ms more per request) and says so in its reports;
 *   liar     just as slow, but it claims to be idle and fast (`claimIdle`, `claimServiceMs`): its load reports and
 *            replies claim an empty queue and half the service time the faster honest agent measured at load;
 *   failing  the odd agent answers every request MESH_INFERENCE_FAILED at once (`failRequests`), reporting an idle queue.
 * Only what the protocol carries reaches the SDK and the router; the agents' counters (their metrics port) are read by
 * this process only, to count the attempts each agent received.
 *
 * Per phase and path, per repeat: requests, errors, p50 and p99 of the answered ones, the share of answered requests
 * the odd agent answered (`share_served`) and the share of all attempts it received (`share_attempts`: retries and
 * hedges included, as its own counter says). Across repeats: the median, with min and max, and per phase the ratio of
 * the leased p99 to the forwarded p99, paired per repeat. Paths run in turns, the order reversed every other repeat.
 *
 * Last line: { rate_per_s, window_ms, repeats, slow_ms, phases: { honest: { leased: {…}, forwarded: {…} }, … },
 * leased_over_forwarded_p99: { honest: [median, min, max], … }, … } plus what run.ts adds (loadavg_1m, …).
 */
import os from 'node:os';
import path from 'node:path';
import { round } from '@edge-mesh/client';
import { ensureModelsFolder, SAMPLE_DEADLINES_MS } from '@edge-mesh/demo';
import {
  admitted,
  assertBuilt,
  type BenchContext,
  type BenchResult,
  CLI,
  isEvent,
  MODELS_DIR,
  median,
  type Proc,
  parseJson,
  ROOT,
  sleep,
  spawnProc,
  startAgentProc,
  startBrokerProc,
} from './lib.ts';

const PHASES = ['honest', 'liar', 'failing'] as const;
type Phase = (typeof PHASES)[number];
const PATHS = ['leased', 'forwarded', 'mixed'] as const;
type PathName = (typeof PATHS)[number];

/** The odd agent's faults in each phase; the liar claims `claimMs` of service time (half the honest agents' measured time). */
function faultsOf(phase: Phase, slowMs: number, claimMs: number): Record<string, unknown> {
  if (phase === 'honest') return { extraExecMs: slowMs };
  if (phase === 'liar') return { extraExecMs: slowMs, claimIdle: true, claimServiceMs: claimMs };
  return { failRequests: true };
}

/** The wake-word latency an agent measured at load (its 'model loaded' log line). */
function measuredLatencyMs(agent: AgentProc, model: string): number {
  for (const line of agent.proc.lines.stderr) {
    const j = parseJson(line);
    if (j?.msg === 'model loaded' && j.model === model && typeof j.latencyMs === 'number') return j.latencyMs;
  }
  return Number.NaN;
}

interface AgentProc {
  proc: Proc;
  id: string;
  metricsUrl: string;
}

async function startAgent(url: string, name: string, faults?: Record<string, unknown>): Promise<AgentProc> {
  const key = await admitted(url, 'agent');
  const launchEnv = faults ? { MESH_AGENT_FAULTS: JSON.stringify(faults) } : undefined;
  const proc = await startAgentProc({
    url,
    keyFile: key.keyFile,
    id: key.identity.id,
    name,
    extraArgs: ['--metrics-port', '0'],
    ...(launchEnv ? { env: launchEnv } : {}),
  });
  const line = await proc.waitLine('stderr', (l) => l.includes('"msg":"metrics listening"'), 10_000, "'metrics listening'");
  const metricsUrl = String(parseJson(line)?.url);
  return { proc, id: key.identity.id, metricsUrl };
}

/** Request messages the agent received so far (its own counter, read from its metrics port). */
async function received(agent: AgentProc): Promise<number> {
  const text = await (await fetch(agent.metricsUrl)).text();
  const m = /^edge_mesh_agent_requests_received_total (\S+)$/m.exec(text);
  return m ? Number(m[1]) : Number.NaN;
}

async function startRouter(url: string): Promise<{ proc: Proc; id: string; http: string }> {
  const key = await admitted(url, 'router');
  const proc = spawnProc('router', [CLI, 'router', '--broker', url, '--key', key.keyFile, '--http-port', '0', '--log-level', 'warn']);
  const line = await proc.waitLine('stdout', (l) => / serving http:\/\//.test(l), 30_000, 'its HTTP URL');
  return { proc, id: key.identity.id, http: line.match(/serving (http:\/\/\S+)/)![1]! };
}

interface RunFigures {
  requests: number;
  errors: number;
  errors_by_code: Record<string, number>;
  p50_ms: number | null;
  p99_ms: number | null;
  max_ms: number | null;
  share_served: number | null;
  share_attempts: number | null;
  attempts_by_agent: Record<string, number>;
  retried: number;
  sdk?: Record<string, number>;
  by_via?: Record<string, unknown>;
  loadavg_1m: number;
}

export async function run(ctx: BenchContext): Promise<BenchResult> {
  assertBuilt(['protocol', 'client', 'edge-agent', 'broker', 'sdk', 'cli', 'router']);
  const { quick } = ctx;
  const rate = Number(ctx.args.rate ?? 100);
  const windowMs = Number(ctx.args['window-ms'] ?? (quick ? 4_000 : 15_000));
  const warmupMs = Number(ctx.args['warmup-ms'] ?? (quick ? 1_500 : 3_000));
  const repeats = Number(ctx.args.repeats ?? (quick ? 2 : 3));
  const slowMs = Number(ctx.args['slow-ms'] ?? 100);
  const model = 'kws';
  const deadlineMs = Number(ctx.args['deadline-ms'] ?? SAMPLE_DEADLINES_MS[model] ?? 500);
  const phases = String(ctx.args.phases ?? PHASES.join(','))
    .split(',')
    .filter(Boolean) as Phase[];
  const paths = String(ctx.args.paths ?? (quick ? 'leased,forwarded' : PATHS.join(',')))
    .split(',')
    .filter(Boolean) as PathName[];
  for (const p of phases) if (!PHASES.includes(p)) throw new Error(`unknown phase ${p}; known: ${PHASES.join(', ')}`);
  for (const p of paths) if (!PATHS.includes(p)) throw new Error(`unknown path ${p}; known: ${PATHS.join(', ')}`);
  if (!(rate > 0 && windowMs > 0 && warmupMs >= 0 && repeats >= 1 && slowMs >= 0))
    throw new Error('bad --rate, --window-ms, --warmup-ms, --repeats or --slow-ms');

  await ensureModelsFolder(MODELS_DIR);
  const { url } = await startBrokerProc();
  const honest = [await startAgent(url, 'agent-1'), await startAgent(url, 'agent-2')];
  const app = await admitted(url, 'app');
  const loadgen = spawnProc(
    'lease-loadgen',
    ['--import', 'tsx', path.join(ROOT, 'bench', 'lease-loadgen.ts'), '--broker', url, '--key', app.keyFile],
    {
      stdin: true,
    },
  );
  await loadgen.waitLine('stdout', isEvent('ready'), 20_000, 'ready event');
  let runNo = 0;

  /** One run on `pathName` with a fresh router; the loadgen's events for it are told apart by their position. */
  const runPath = async (pathName: PathName, fleet: AgentProc[], odd: AgentProc): Promise<RunFigures> => {
    const router = await startRouter(url);
    try {
      // The router reads the retained statuses at once; a load report from each agent comes within its heartbeat.
      await sleep(1_200);
      const seen = loadgen.lines.stdout.length;
      // This run's event: a line printed after the command (an earlier run's line of the same text is further back).
      const nth = (event: string) => (line: string) => isEvent(event)(line) && loadgen.lines.stdout.lastIndexOf(line) >= seen;
      const loadavg = os.loadavg()[0]!;
      runNo++;
      loadgen.send(
        JSON.stringify({
          path: pathName,
          router: router.id,
          http: router.http,
          agents: fleet.length,
          rate,
          warmupMs,
          durationMs: windowMs,
          deadlineMs,
        }),
      );
      await loadgen.waitLine('stdout', nth('measuring'), 30_000 + warmupMs, `measuring event of run ${runNo}`);
      const before = await Promise.all(fleet.map(received));
      await loadgen.waitLine('stdout', nth('window-end'), windowMs + 10_000, `window-end event of run ${runNo}`);
      const after = await Promise.all(fleet.map(received));
      const result = parseJson(await loadgen.waitLine('stdout', nth('result'), deadlineMs + 10_000, `result of run ${runNo}`))!;
      if (typeof result.error === 'string') throw new Error(`lease-loadgen: ${result.error}`);
      const attempts = fleet.map((_, i) => after[i]! - before[i]!);
      const allAttempts = attempts.reduce((a, b) => a + b, 0);
      const servedBy = result.served_by as Record<string, number>;
      const answered = Object.values(servedBy).reduce((a, b) => a + b, 0);
      const figures: RunFigures = {
        requests: Number(result.requests),
        errors: Number(result.errors),
        errors_by_code: result.errors_by_code as Record<string, number>,
        p50_ms: result.p50_ms as number | null,
        p99_ms: result.p99_ms as number | null,
        max_ms: result.max_ms as number | null,
        share_served: answered > 0 ? round((servedBy[odd.id] ?? 0) / answered, 4) : null,
        share_attempts: allAttempts > 0 ? round(attempts[fleet.indexOf(odd)]! / allAttempts, 4) : null,
        attempts_by_agent: Object.fromEntries(fleet.map((a, i) => [a === odd ? 'odd' : `honest-${i + 1}`, attempts[i]!])),
        retried: Number(result.retried),
        ...(pathName !== 'forwarded' ? { sdk: result.sdk as Record<string, number> } : {}),
        ...(result.by_via ? { by_via: result.by_via as Record<string, unknown> } : {}),
        loadavg_1m: round(loadavg),
      };
      ctx.log(
        `  ${pathName}: ${figures.requests} requests, ${figures.errors} errors, p50 ${figures.p50_ms} ms, p99 ${figures.p99_ms} ms, odd agent served ${figures.share_served} and got ${figures.share_attempts} of attempts`,
      );
      return figures;
    } finally {
      await router.proc.stop();
    }
  };

  // The liar claims to be twice as fast as the faster honest agent measured itself at load, and idle.
  const claimMs = round(Math.max(0.001, Math.min(...honest.map((a) => measuredLatencyMs(a, model))) / 2), 4);
  if (!Number.isFinite(claimMs)) throw new Error("no 'model loaded' line with the wake-word latency from the honest agents");
  const runs: Record<string, Record<string, RunFigures[]>> = {};
  try {
    for (const phase of phases) {
      const faults = faultsOf(phase, slowMs, claimMs);
      ctx.log(`leases: phase ${phase}, odd agent with MESH_AGENT_FAULTS=${JSON.stringify(faults)}`);
      const odd = await startAgent(url, `agent-odd-${phase}`, faults);
      const fleet = [...honest, odd];
      const byPath: Record<string, RunFigures[]> = Object.fromEntries(paths.map((p) => [p, []]));
      runs[phase] = byPath;
      try {
        for (let r = 0; r < repeats; r++) {
          const order = r % 2 === 0 ? paths : [...paths].reverse();
          ctx.log(` repeat ${r + 1}/${repeats}`);
          for (const p of order) byPath[p]!.push(await runPath(p, fleet, odd));
        }
      } finally {
        await odd.proc.stop();
      }
    }
  } finally {
    loadgen.send('');
    await loadgen.stop(1_000);
  }

  const spread = (values: (number | null)[]) => {
    const v = values.filter((x): x is number => x !== null && Number.isFinite(x));
    return v.length === 0 ? null : [round(median(v), 4), round(Math.min(...v), 4), round(Math.max(...v), 4)];
  };
  const phasesOut: Record<string, Record<string, unknown>> = {};
  const ratios: Record<string, unknown> = {};
  for (const [phase, byPath] of Object.entries(runs)) {
    phasesOut[phase] = {};
    for (const [p, list] of Object.entries(byPath)) {
      phasesOut[phase][p] = {
        requests: list.reduce((a, f) => a + f.requests, 0),
        errors: list.reduce((a, f) => a + f.errors, 0),
        // Median over repeats, with [median, min, max].
        p50_ms: spread(list.map((f) => f.p50_ms))?.[0] ?? null,
        p99_ms: spread(list.map((f) => f.p99_ms))?.[0] ?? null,
        p99_ms_spread: spread(list.map((f) => f.p99_ms)),
        share_served: spread(list.map((f) => f.share_served)),
        share_attempts: spread(list.map((f) => f.share_attempts)),
        per_repeat: list,
      };
    }
    const leased = byPath.leased;
    const forwarded = byPath.forwarded;
    if (leased && forwarded)
      ratios[phase] = spread(leased.map((f, i) => (f.p99_ms !== null && forwarded[i]?.p99_ms ? f.p99_ms / forwarded[i]!.p99_ms! : null)));
  }
  return {
    bench: 'leases',
    quick,
    model,
    rate_per_s: rate,
    warmup_ms: warmupMs,
    window_ms: windowMs,
    repeats,
    deadline_ms: deadlineMs,
    slow_ms: slowMs,
    liar_claim_service_ms: claimMs,
    honest_latency_ms: honest.map((a) => measuredLatencyMs(a, model)),
    agents: 3,
    paths,
    phases: phasesOut,
    leased_over_forwarded_p99: ratios,
    cpus: os.cpus().length,
  };
}
