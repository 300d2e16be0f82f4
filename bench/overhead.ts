/**
 * `npm run bench -- overhead [--quick] [--n N] [--warmup N] [--phases mesh,echo,...] [--receipt-issue-ms MS]`: what the
 * mesh adds to one kws (wake-word) inference.
 *
 * raw:  onnxruntime-node in this process, the agent's session options (intraOpNumThreads 1,
 *       interOpNumThreads 1, sequential, graph optimisation all), the same sampleInputs('kws', 1) tensor,
 *       closed loop `await session.run(feeds)` after the warm-up runs (--warmup, 4,000), n timed runs. Nothing else runs then.
 * mesh: three processes: `edge-mesh broker`, `edge-mesh agent --workers 1` (all four models loaded, as
 *       deployed: kws runs inline on the agent's main thread, the others on its worker) and bench/loadgen.ts
 *       (SDK `mesh.infer('kws', ...)`, QoS 1, closed loop window 1, the warm-up requests, then n timed
 *       requests stamped with hrtime in the load generator).
 * mesh_pool: the same with `--inline-max-ms 0`: kws on the worker thread too, as before inline models.
 * echo: the same with bench/echo-agent.ts (a protocol-complete agent that answers without inference) in place
 *       of the agent, on a fresh broker: the floor set by MQTT, the broker and the SDK.
 * paired: the agent and the echo agent on one broker, the load generator sending request i to the agent
 *       when i is even and to the echo agent when odd (pinned): both measured in turns under the same
 *       moment-to-moment load of a shared machine, where mesh and echo, run one after the other, can land
 *       in different load. Reported as paired_mesh_p50_ms, paired_echo_p50_ms and their difference.
 * Also, to split the overhead: tcp (a raw TCP ping-pong between two processes, bench/tcp-floor.ts),
 *       pool (the agent's WorkerPool alone in this process: main thread → worker → session.run → back) and
 *       inline (the agent's InlineExecutor alone in this process: session.run on this thread, the same hop
 *       through the event loop's check phase that the agent takes).
 * n = 10,000 (full) or 2,000 (--quick). overhead_p50_ms = mesh_p50_ms − raw_p50_ms. Per-process CPU over the
 * timed window is reported as cpu: { broker, agent, loadgen } in ms and cores (CPU ms / wall ms).
 */
import { mkdtemp, rm } from 'node:fs/promises';
import path from 'node:path';
import { round, summarize } from '@edge-mesh/client';
import { EscrowClient } from '@edge-mesh/contracts';
import { deployMesh, startLocalChain } from '@edge-mesh/contracts/dev';
import { ensureModelsFolder, sampleInputs } from '@edge-mesh/demo';
import { agentBindingMessage, type Identity, signBytes } from '@edge-mesh/protocol';
import * as ort from 'onnxruntime-node';
import pino from 'pino';
import { loadInline } from '../edge-agent/src/inline.ts';
import { WorkerPool } from '../edge-agent/src/pool.ts';
import {
  admitted,
  agentReadyFacts,
  assertBuilt,
  type BenchContext,
  type BenchResult,
  benchTempDir,
  CpuMeter,
  environment,
  isEvent,
  loadgenResult,
  MODELS_DIR,
  type Proc,
  parseJson,
  ROOT,
  spawnProc,
  startAgentProc,
  startBrokerProc,
  startEchoAgentProc,
  startLoadgenProc,
  stopLoadgen,
} from './lib.ts';

type LoadgenPayment = NonNullable<Parameters<typeof startLoadgenProc>[0]['payment']>;

const MODEL = 'kws';
/**
 * Untimed requests before each phase's timed ones (`--warmup N`). Each mesh phase's latency keeps falling for its
 * first 3–4 s after start, in every process arrangement, the no-op echo agent's too (docs/benchmarks.md): 500
 * warm-up requests, the count until 2026-12-07, left most of that in the timed window.
 */
const DEFAULT_WARMUP = 4_000;
let WARMUP = DEFAULT_WARMUP;
/** The MQTT phases, in the order they run; `--phases a,b` runs only those (e.g. one, for a profile of its processes). */
const PHASES = ['mesh', 'unpaid_mesh', 'mesh_pool', 'echo', 'paired'];

/** a.p50_ms − b.p50_ms, or null when either phase did not run. */
function minus(a: Record<string, unknown>, b: Record<string, unknown>): number | null {
  return typeof a.p50_ms === 'number' && typeof b.p50_ms === 'number' ? round(a.p50_ms - b.p50_ms) : null;
}

async function rawLatency(n: number): Promise<ReturnType<typeof summarize>> {
  const manifest = await ensureModelsFolder(MODELS_DIR);
  const entry = manifest.models.find((m) => m.name === MODEL)!;
  const session = await ort.InferenceSession.create(path.join(MODELS_DIR, entry.file), {
    intraOpNumThreads: 1,
    interOpNumThreads: 1,
    executionMode: 'sequential',
    graphOptimizationLevel: 'all',
    executionProviders: ['cpu'],
  });
  const feeds: Record<string, ort.Tensor> = {};
  for (const [name, t] of Object.entries(sampleInputs(MODEL, 1))) feeds[name] = new ort.Tensor(t.dtype, t.data as never, t.shape);
  for (let i = 0; i < WARMUP; i++) await session.run(feeds);
  const samples = new Float64Array(n);
  for (let i = 0; i < n; i++) {
    const t0 = process.hrtime.bigint();
    await session.run(feeds);
    samples[i] = Number(process.hrtime.bigint() - t0) / 1e6;
  }
  await session.release();
  return summarize(samples);
}

/**
 * The agent's worker pool alone, in this process (no MQTT): `WorkerPool.run` round trips with one worker,
 * i.e. main thread → worker thread → session.run → main thread, the hop every mesh request takes inside
 * the agent.
 */
async function poolLatency(n: number): Promise<ReturnType<typeof summarize>> {
  const manifest = await ensureModelsFolder(MODELS_DIR);
  const entry = manifest.models.find((m) => m.name === MODEL)!;
  const pool = new WorkerPool({
    size: 1,
    intraOpThreads: 1,
    warmupRuns: 5,
    pipelineDepth: 1,
    logger: pino({ level: 'silent' }),
    models: [{ name: MODEL, path: path.join(MODELS_DIR, entry.file), providers: ['cpu'], warmup: entry.warmup }],
  });
  try {
    await pool.start();
    return await timedRuns(pool, n);
  } finally {
    await pool.close();
  }
}

/** WARMUP untimed runs of MODEL on `executor`, then the latency of `n` more, one at a time. */
async function timedRuns(
  executor: { run(model: string, inputs: ReturnType<typeof sampleInputs>, done: (err?: Error | null) => void): void },
  n: number,
): Promise<ReturnType<typeof summarize>> {
  const once = () =>
    new Promise<void>((resolve, reject) => executor.run(MODEL, sampleInputs(MODEL, 1), (err) => (err ? reject(err) : resolve())));
  for (let i = 0; i < WARMUP; i++) await once();
  const samples = new Float64Array(n);
  for (let i = 0; i < n; i++) {
    const t0 = process.hrtime.bigint();
    await once();
    samples[i] = Number(process.hrtime.bigint() - t0) / 1e6;
  }
  return summarize(samples);
}

/** The agent's InlineExecutor alone, in this process (no MQTT): the round trip of an inline job. */
async function inlineLatency(n: number): Promise<ReturnType<typeof summarize>> {
  const manifest = await ensureModelsFolder(MODELS_DIR);
  const entry = manifest.models.find((m) => m.name === MODEL)!;
  const { executor } = await loadInline(
    [{ name: MODEL, path: path.join(MODELS_DIR, entry.file), providers: ['cpu'], warmup: entry.warmup }],
    { intraOpThreads: 1, warmupRuns: 5, inlineMaxMs: 0.5, inlineBatchMax: 1 },
  );
  if (!executor) throw new Error(`${MODEL} does not run inline on this machine (its warm-up p99 is over 0.5 ms)`);
  try {
    return await timedRuns(executor, n);
  } finally {
    await executor.close();
  }
}

/** Raw TCP ping-pong between two processes (bench/tcp-floor.ts): the floor under every MQTT figure. */
async function tcpFloor(n: number): Promise<Record<string, unknown>> {
  const script = path.join(ROOT, 'bench', 'tcp-floor.ts');
  const server = spawnProc('tcp-floor server', ['--import', 'tsx', script, 'server']);
  try {
    const ready = parseJson(await server.waitLine('stdout', isEvent('ready'), 15_000, 'ready event'))!;
    const client = spawnProc('tcp-floor client', [
      '--import',
      'tsx',
      script,
      'client',
      '--port',
      String(ready.port),
      '--n',
      String(n),
      '--warmup',
      String(WARMUP),
      '--bytes',
      '64',
    ]);
    const result = parseJson(await client.waitLine('stdout', isEvent('result'), 60_000, 'result'))!;
    await client.exited;
    return result;
  } finally {
    await server.stop();
  }
}

/**
 * Paid requests, as TARGETS.md's overhead goal has them ("receipts on"): a local Hardhat chain with the escrow and its
 * stablecoin, as `edge-mesh up` runs it (demo/src/up-settlement.ts): account 1 is the load generator's voucher key,
 * account 2 funds its lanes, agent i is paid to account 3 + i, its Ed25519 key registered for that payout. The agent
 * serves paid requests only (no --serve-unpaid): it admits each against the lane's credit, signs a receipt and
 * journals it (--data) before the reply leaves; the load generator checks every receipt and pays by voucher. Neither
 * side settles on chain during the run.
 */
interface PaidMesh {
  /** `edge-mesh agent` options paying agent number `index` (0, 1) to its payout, its key registered there first. */
  agentArgs(index: number, identity: Identity): Promise<string[]>;
  loadgen(name: string): LoadgenPayment;
  close(): Promise<void>;
}

const APP_ACCOUNT = 1;
const FUNDER_ACCOUNT = 2;
const FIRST_AGENT_ACCOUNT = 3;
const PAID_AGENTS = 2;

async function startPaidMesh(ctx: BenchContext): Promise<PaidMesh> {
  // `--receipt-issue-ms MS` goes to the paid agents (their default otherwise), for A/B runs of it.
  const receiptIssueMs = typeof ctx.args['receipt-issue-ms'] === 'string' ? ctx.args['receipt-issue-ms'] : undefined;
  const chain = await startLocalChain({ accounts: FIRST_AGENT_ACCOUNT + PAID_AGENTS });
  const dataDir = await mkdtemp(path.join(benchTempDir('overhead-paid'), 'data-'));
  try {
    const deployment = await deployMesh(chain.wallet(0), { thawSeconds: 3_600 });
    const connectAs = (account: number) =>
      EscrowClient.connect({ runner: chain.wallet(account), escrow: deployment.escrow, token: deployment.token });
    const app = await connectAs(APP_ACCOUNT);
    const funder = await connectAs(FUNDER_ACCOUNT);
    const appAddress = chain.accounts[APP_ACCOUNT]!;
    const consent = await app.signOwnerConsent(chain.accounts[FUNDER_ACCOUNT]!);
    const fund = 1_000_000_000n; // 1,000 USD a lane: far more than a run's requests cost
    await funder.mint(chain.accounts[FUNDER_ACCOUNT]!, fund * BigInt(PAID_AGENTS));
    const payouts = Array.from({ length: PAID_AGENTS }, (_, i) => chain.accounts[FIRST_AGENT_ACCOUNT + i]!.toLowerCase());
    for (const payout of payouts) await funder.fund(appAddress, payout, fund, { approveMax: true, consent });
    const domainArgs = ['--escrow', deployment.escrow, '--chain-id', deployment.chainId.toString(), '--rpc', chain.rpcUrl];
    ctx.log(`  paid: local chain ${deployment.chainId} on ${chain.rpcUrl}, escrow ${deployment.escrow}, ${PAID_AGENTS} lanes funded`);
    return {
      async agentArgs(index, identity) {
        const payout = payouts[index]!;
        const domain = { chainId: deployment.chainId, escrow: deployment.escrow };
        await (await connectAs(FIRST_AGENT_ACCOUNT + index)).registerAgent(
          identity.publicKey,
          signBytes(identity, agentBindingMessage(domain, payout)),
        );
        return [
          '--payout',
          payout,
          ...domainArgs,
          '--data',
          path.join(dataDir, `agent-${index}`),
          ...(receiptIssueMs !== undefined ? ['--receipt-issue-ms', receiptIssueMs] : []),
        ];
      },
      loadgen: (name) => ({
        args: [...domainArgs, '--data', path.join(dataDir, `app-${name}`)],
        env: { MESH_EVM_KEY: chain.privateKeys[APP_ACCOUNT]! },
      }),
      async close() {
        await chain.close();
        await rm(dataDir, { recursive: true, force: true });
      },
    };
  } catch (err) {
    await chain.close();
    throw err;
  }
}

/** Every timed and warm-up request of a paid run was billed by a receipt the load generator took (none refused). */
function assertPaid(label: string, result: Record<string, unknown>, agentId: string, requests: number): Record<string, unknown> {
  const lane = (result.lanes as { agent: string; receipts: number; refused: number; held: number }[] | undefined)?.find(
    (l) => l.agent === agentId,
  );
  if (!lane || lane.receipts + lane.held < requests || lane.refused > 0)
    throw new Error(
      `${label}: expected ${requests} paid receipts from ${agentId}, the load generator's lane says ${JSON.stringify(lane ?? null)}`,
    );
  // Requests the SDK still remembered after the run's receipts were in (sdk/src/payments.ts, SentRequests).
  return { receipts: lane.receipts + lane.held, refused: lane.refused, remembered: result.paid_requests_remembered ?? null };
}

/** One closed-loop latency run against whatever `startServer` puts on a fresh broker. */
async function meshLatency(
  ctx: BenchContext,
  label: string,
  n: number,
  startServer: (url: string, key: { identity: Identity; keyFile: string }) => Promise<Proc>,
  payment?: LoadgenPayment,
): Promise<Record<string, unknown>> {
  const broker = await startBrokerProc(`broker (${label})`);
  const serverKey = await admitted(broker.url, 'agent');
  const server = await startServer(broker.url, serverKey);
  const app = await admitted(broker.url, 'app');
  const loadgen = await startLoadgenProc({
    url: broker.url,
    keyFile: app.keyFile,
    id: app.identity.id,
    mode: 'latency',
    warmup: WARMUP,
    n,
    deadlineMs: 1_000,
    ...(payment ? { payment } : {}),
  });
  const meter = new CpuMeter({ broker: broker.proc.pid, [label === 'echo' ? 'echo_agent' : 'agent']: server.pid, loadgen: loadgen.pid });
  let cpu: ReturnType<CpuMeter['end']> = {};
  void loadgen.waitLine('stdout', isEvent('measuring'), 120_000).then(
    () => meter.begin(),
    () => {},
  );
  void loadgen.waitLine('stdout', isEvent('window-end'), 600_000).then(
    () => (cpu = meter.end()),
    () => {},
  );
  const t0 = performance.now();
  loadgen.send('go');
  const result = await loadgenResult(loadgen, ctx.quick ? 30_000 : 300_000);
  ctx.log(`  ${label}: p50 ${result.p50_ms} ms, p99 ${result.p99_ms} ms, ${result.ok}/${n} ok in ${Math.round(performance.now() - t0)} ms`);
  await Promise.all([stopLoadgen(loadgen), server.stop()]);
  await broker.proc.stop();
  return { ...result, cpu, ...(payment ? { paid: assertPaid(label, result, serverKey.identity.id, WARMUP + n) } : {}) };
}

/** The agent and the echo agent on one broker, requests alternating between them (see the header). */
async function pairedLatency(ctx: BenchContext, n: number, paid: PaidMesh): Promise<Record<string, unknown>> {
  const broker = await startBrokerProc('broker (paired)');
  const agentKey = await admitted(broker.url, 'agent');
  const echoKey = await admitted(broker.url, 'agent');
  const agent = await startAgentProc({
    url: broker.url,
    keyFile: agentKey.keyFile,
    id: agentKey.identity.id,
    workers: 1,
    extraArgs: await paid.agentArgs(1, agentKey.identity),
  });
  const echo = await startEchoAgentProc(broker.url, echoKey.identity.id, echoKey.keyFile);
  const app = await admitted(broker.url, 'app');
  const loadgen = await startLoadgenProc({
    url: broker.url,
    keyFile: app.keyFile,
    id: app.identity.id,
    mode: 'latency',
    warmup: WARMUP,
    n: 2 * n,
    deadlineMs: 1_000,
    agents: [agentKey.identity.id, echoKey.identity.id],
    payment: paid.loadgen('paired'),
  });
  loadgen.send('go');
  const result = await loadgenResult(loadgen, ctx.quick ? 30_000 : 300_000);
  assertPaid('paired', result, agentKey.identity.id, WARMUP / 2 + n);
  await Promise.all([stopLoadgen(loadgen), agent.stop(), echo.stop()]);
  await broker.proc.stop();
  const by = result.by_agent as Record<string, { p50_ms: number; p99_ms: number }>;
  const a = by[agentKey.identity.id]!;
  const e = by[echoKey.identity.id]!;
  ctx.log(`  paired: agent p50 ${a.p50_ms} ms, echo p50 ${e.p50_ms} ms, ${result.ok}/${2 * n} ok`);
  return {
    paired_mesh_p50_ms: a.p50_ms,
    paired_mesh_p99_ms: a.p99_ms,
    paired_echo_p50_ms: e.p50_ms,
    paired_echo_p99_ms: e.p99_ms,
    paired_mesh_minus_echo_p50_ms: round(a.p50_ms - e.p50_ms),
    paired_errors: result.errors,
  };
}

export async function run(ctx: BenchContext): Promise<BenchResult> {
  const n = typeof ctx.args.n === 'string' ? Number(ctx.args.n) : ctx.quick ? 2_000 : 10_000;
  WARMUP = typeof ctx.args.warmup === 'string' ? Number(ctx.args.warmup) : DEFAULT_WARMUP;
  if (!Number.isSafeInteger(WARMUP) || WARMUP < 0) throw new Error(`--warmup must be a count of requests, not ${String(ctx.args.warmup)}`);
  const phases = new Set(typeof ctx.args.phases === 'string' ? ctx.args.phases.split(',') : PHASES);
  const unknown = [...phases].filter((p) => !PHASES.includes(p));
  if (unknown.length > 0) throw new Error(`--phases: unknown ${unknown.join(', ')}; the phases are ${PHASES.join(', ')}`);
  assertBuilt();
  ctx.log(`overhead: model ${MODEL}, n ${n}, warm-up ${WARMUP}`);
  await ensureModelsFolder(MODELS_DIR);

  ctx.log('  raw onnxruntime-node session.run (in process, 1 intra-op thread)...');
  const raw = await rawLatency(n);
  ctx.log(`  raw: p50 ${round(raw.p50, 4)} ms, p99 ${round(raw.p99, 4)} ms`);

  ctx.log('  agent worker pool alone (in process, 1 worker, no MQTT)...');
  const pool = await poolLatency(n);
  ctx.log(`  pool: p50 ${round(pool.p50, 4)} ms, p99 ${round(pool.p99, 4)} ms`);

  ctx.log('  agent inline executor alone (in process, no MQTT)...');
  const inline = await inlineLatency(n);
  ctx.log(`  inline: p50 ${round(inline.p50, 4)} ms, p99 ${round(inline.p99, 4)} ms`);

  ctx.log('  raw TCP ping-pong between two processes (64 B, TCP_NODELAY)...');
  const tcp = await tcpFloor(n);
  ctx.log(`  tcp: p50 ${tcp.p50_ms} ms, p99 ${tcp.p99_ms} ms`);

  const paid = await startPaidMesh(ctx);
  let agentInline: string[] | null = null;
  // A phase left out by --phases reports empty figures (its p50s null).
  const skipped = { errors: {}, retried: 0, cpu: {} } as Record<string, unknown>;
  let mesh = skipped;
  let meshUnpaid = skipped;
  let meshPool = skipped;
  let echo = skipped;
  let paired: Record<string, unknown> = { paired_errors: {} };
  try {
    if (phases.has('mesh'))
      mesh = await meshLatency(
        ctx,
        'agent',
        n,
        async (url, key) => {
          const extraArgs = await paid.agentArgs(0, key.identity);
          const proc = await startAgentProc({ url, keyFile: key.keyFile, id: key.identity.id, workers: 1, extraArgs });
          agentInline = agentReadyFacts(proc)?.inline ?? null;
          return proc;
        },
        paid.loadgen('mesh'),
      );
    if (phases.has('unpaid_mesh'))
      meshUnpaid = await meshLatency(ctx, 'agent-unpaid', n, (url, key) =>
        startAgentProc({ url, keyFile: key.keyFile, id: key.identity.id, workers: 1 }),
      );
    if (phases.has('mesh_pool'))
      meshPool = await meshLatency(ctx, 'agent-pool', n, (url, key) =>
        startAgentProc({ url, keyFile: key.keyFile, id: key.identity.id, workers: 1, inlineMaxMs: 0 }),
      );
    if (phases.has('echo')) echo = await meshLatency(ctx, 'echo', n, (url, key) => startEchoAgentProc(url, key.identity.id, key.keyFile));
    if (phases.has('paired')) paired = await pairedLatency(ctx, n, paid);
  } finally {
    await paid.close();
  }

  const meshErrors = [mesh, meshUnpaid, meshPool]
    .flatMap((m) => Object.values(m.errors as Record<string, number>))
    .reduce((a, b) => a + b, 0);
  const echoErrors = [echo.errors, paired.paired_errors]
    .flatMap((e) => Object.values(e as Record<string, number>))
    .reduce((a, b) => a + b, 0);
  return {
    bench: 'overhead',
    quick: ctx.quick,
    qos: 1,
    raw_p90_ms: round(raw.p90, 4),
    raw_max_ms: round(raw.max, 4),
    mesh_p90_ms: mesh.p90_ms,
    mesh_max_ms: mesh.max_ms,
    echo_p99_ms: echo.p99_ms,
    echo_max_ms: echo.max_ms,
    tcp_echo_p50_ms: tcp.p50_ms,
    tcp_echo_p99_ms: tcp.p99_ms,
    agent_pool_p50_ms: round(pool.p50, 4),
    agent_pool_p99_ms: round(pool.p99, 4),
    agent_inline_p50_ms: round(inline.p50, 4),
    agent_inline_p99_ms: round(inline.p99, 4),
    agent_inline_models: agentInline,
    mesh_minus_echo_p50_ms: minus(mesh, echo),
    mesh_receipts: mesh.paid,
    unpaid_mesh_p50_ms: meshUnpaid.p50_ms,
    unpaid_mesh_p99_ms: meshUnpaid.p99_ms,
    unpaid_mesh_minus_echo_p50_ms: minus(meshUnpaid, echo),
    unpaid_agent_exec_p50_ms: meshUnpaid.agent_exec_p50_ms,
    mesh_pool_p50_ms: meshPool.p50_ms,
    mesh_pool_p99_ms: meshPool.p99_ms,
    mesh_pool_minus_echo_p50_ms: minus(meshPool, echo),
    mesh_pool_agent_exec_p50_ms: meshPool.agent_exec_p50_ms,
    agent_exec_p50_ms: mesh.agent_exec_p50_ms,
    agent_queue_p50_ms: mesh.agent_queue_p50_ms,
    ...paired,
    errors: { mesh: mesh.errors, unpaid_mesh: meshUnpaid.errors, mesh_pool: meshPool.errors, echo: echo.errors },
    error_count: meshErrors + echoErrors,
    retried: { mesh: mesh.retried, unpaid_mesh: meshUnpaid.retried, mesh_pool: meshPool.retried, echo: echo.retried },
    cpu: { mesh: mesh.cpu, unpaid_mesh: meshUnpaid.cpu, mesh_pool: meshPool.cpu, echo: echo.cpu },
    agent_workers: 1,
    warmup: WARMUP,
    ...environment(),
    // The contract's fields last, so they are easy to find at the end of the line.
    model: MODEL,
    raw_p50_ms: round(raw.p50, 4),
    raw_p99_ms: round(raw.p99, 4),
    mesh_p50_ms: mesh.p50_ms,
    mesh_p99_ms: mesh.p99_ms,
    echo_p50_ms: echo.p50_ms,
    overhead_p50_ms: minus(mesh, { p50_ms: raw.p50 }),
    n,
  };
}
