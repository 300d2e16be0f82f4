/**
 * `npm run bench -- agent [--quick] [--reps R] [--idle-ms 2000] [--settle-ms 15000] [--workers W] [--inline-max-ms MS]`
 *
 * How fast an edge agent becomes useful and what it costs at rest. A `edge-mesh broker` process runs and
 * this process subscribes to `mesh/v1/agent/+/status` on it. Each repetition spawns
 * `node cli/bin/edge-mesh.mjs agent --models DIR --key FILE` (CLI defaults: one worker unless --workers is
 * given) and measures:
 *   ready_ms     from just before spawn() to the agent's retained `status` (state online) arriving at the
 *                subscriber: process start, the compiled CLI's module loading (no TypeScript loader), sha256
 *                checks, worker threads, model sessions, warm-up runs (the latency measurement), MQTT
 *                connect and announce.
 *   idle_rss_mb  VmRSS of the agent process (worker threads included, they share it) after --idle-ms
 *                (2 s) of idleness following the announcement; VmHWM (peak) is reported too, and the
 *                split of VmRSS into RssAnon (heaps, sessions: the process's own) and RssFile (mapped
 *                files: the node binary and onnxruntime's library, pages the kernel can share and drop).
 *   settled_rss_mb  VmRSS after --settle-ms of idleness (full mode 15 s; quick mode only when given): V8's
 *                memory reducer shrinks an idle process's heaps some seconds in, so this is what an agent
 *                that has been idle a while holds.
 * Cases: "all" (the four models of .mesh-data/models), "kws" (a temp models folder holding only the
 * wake-word model, whose manifest has just that entry) and "kws_pool" (the same folder with
 * `--inline-max-ms 0`: the wake-word model on a worker thread instead of inline, for comparison in the same
 * run), interleaved, R repetitions each (quick 3, full 5); each figure is the median. Each case also says
 * which models ran inline and how many worker threads the agent started (from its 'agent ready' log), and
 * the process's thread count. Every agent starts with the launch settings of edge-agent/src/launch.ts
 * (allocator pools, libuv and V8 helper threads), as `edge-mesh up` and a device's service start it,
 * except "kws_bare": the "kws" case started as plain `node edge-mesh.mjs agent`, for comparison; `launch`
 * in the result says which settings were applied (none that the environment already set). `--inline-max-ms` is passed to the "all" and "kws" agents (CLI default
 * otherwise). The run refuses a build older than its sources (lib.ts, assertBuilt): the agent is the
 * compiled CLI. The headline (`model`, `ready_ms`, `idle_rss_mb`) is the all-models case with
 * `models` listing them; `kws` holds the single-model case. For scale, `process_floor_ms` is the median
 * spawn-to-exit time of `node -e 0` and of `edge-mesh --help` (node + CLI imports), and `floor_rss_mb` the
 * idle RSS of a bare `node` process (`node`), of a node process whose one worker thread holds an
 * onnxruntime session of the wake-word model and nothing else (`node_worker_ort_kws`: the least an agent
 * serving it from a worker can weigh), and of a node process holding that session on its main thread
 * (`node_ort_kws`: the least an agent serving it inline can weigh).
 * In full mode a variant of both cases with one worker more than the default runs too (`workers_N`): what
 * a worker costs.
 */
import { spawn } from 'node:child_process';
import { copyFile, mkdtemp, rm, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { MANIFEST_FILE } from '@edge-mesh/agent';
import { agentLaunch } from '@edge-mesh/agent/launch';
import { openMeshConnection, round } from '@edge-mesh/client';
import { ensureModelsFolder } from '@edge-mesh/demo';
import { type AgentStatus, decodeMessage, topics } from '@edge-mesh/protocol';
import {
  admitted,
  agentReadyFacts,
  assertBuilt,
  type BenchContext,
  type BenchResult,
  CLI,
  environment,
  MODELS_DIR,
  median,
  parseJson,
  procStatusMb,
  procThreads,
  ROOT,
  sleep,
  spawnProc,
  startBrokerProc,
} from './lib.ts';

interface Rep {
  ready_ms: number;
  /** The agent's own 'agent ready' readyMs: startAgent() to models loaded (before connecting). */
  agent_logged_ready_ms: number | null;
  idle_rss_mb: number;
  settled_rss_mb: number | null;
  rss_anon_mb: number;
  rss_file_mb: number;
  peak_rss_mb: number;
  threads: number;
  workers: number | null;
  inline_models: string[] | null;
  worker_threads: number | null;
}

/**
 * Idle VmRSS of `node <args>` once it prints "ready" and has idled `idleMs`: the floors the agent is
 * compared with (a bare node process; one worker thread holding one onnxruntime session).
 */
async function idleRssMb(name: string, args: string[], idleMs: number): Promise<number> {
  const proc = spawnProc(name, args);
  await proc.waitLine('stdout', (l) => l === 'ready', 20_000, 'ready');
  await sleep(idleMs);
  const rss = procStatusMb(proc.pid, 'VmRSS');
  await proc.stop();
  return rss;
}

/** onnxruntime-node and one session of `modelFile` on the main thread, as an agent whose model runs inline holds it. */
function ortMainFloorScript(modelFile: string): string {
  const agentDir = path.join(ROOT, 'edge-agent', 'package.json');
  return `const ort = require(require('node:module').createRequire(${JSON.stringify(agentDir)}).resolve('onnxruntime-node'));
    ort.InferenceSession.create(${JSON.stringify(modelFile)}, { intraOpNumThreads: 1, interOpNumThreads: 1, executionMode: 'sequential' })
      .then((session) => {
        console.log('ready');
        setInterval(() => session, 1000);
      });`;
}

/** A worker thread that loads onnxruntime-node and one session of `modelFile`, as an agent's worker does. */
function ortFloorScript(modelFile: string): string {
  const agentDir = path.join(ROOT, 'edge-agent', 'package.json');
  const worker = `
    const { parentPort } = require('node:worker_threads');
    const ort = require(require('node:module').createRequire(${JSON.stringify(agentDir)}).resolve('onnxruntime-node'));
    ort.InferenceSession.create(${JSON.stringify(modelFile)}, { intraOpNumThreads: 1, interOpNumThreads: 1, executionMode: 'sequential' })
      .then((session) => {
        parentPort.postMessage('ready');
        setInterval(() => session, 1000);
      });`;
  return `const { Worker } = require('node:worker_threads');
    new Worker(${JSON.stringify(worker)}, { eval: true }).on('message', (m) => console.log(m));`;
}

function spawnTimeMs(args: string[]): Promise<number> {
  return new Promise((resolve, reject) => {
    const t0 = performance.now();
    const child = spawn(process.execPath, args, { cwd: ROOT, stdio: 'ignore' });
    child.once('error', reject);
    child.once('exit', () => resolve(performance.now() - t0));
  });
}

export async function run(ctx: BenchContext): Promise<BenchResult> {
  const { quick, log, args } = ctx;
  const reps = typeof args.reps === 'string' ? Number(args.reps) : quick ? 3 : 5;
  const idleMs = typeof args['idle-ms'] === 'string' ? Number(args['idle-ms']) : 2_000;
  const settleMs = typeof args['settle-ms'] === 'string' ? Number(args['settle-ms']) : quick ? undefined : 15_000;
  const fixedWorkers = typeof args.workers === 'string' ? Number(args.workers) : undefined;
  const inlineMaxMs = typeof args['inline-max-ms'] === 'string' ? Number(args['inline-max-ms']) : undefined;
  assertBuilt();

  const manifest = await ensureModelsFolder(MODELS_DIR);
  const kwsEntry = manifest.models.find((m) => m.name === 'kws');
  if (!kwsEntry) throw new Error('the models folder has no kws entry');
  const kwsDir = await mkdtemp(path.join(os.tmpdir(), 'edge-mesh-bench-kws-'));
  try {
    await copyFile(path.join(MODELS_DIR, kwsEntry.file), path.join(kwsDir, kwsEntry.file));
    await writeFile(path.join(kwsDir, MANIFEST_FILE), `${JSON.stringify({ models: [kwsEntry] }, null, 2)}\n`);

    const floors = { node_ms: [] as number[], cli_help_ms: [] as number[] };
    for (let i = 0; i < (quick ? 1 : 3); i++) {
      floors.node_ms.push(await spawnTimeMs(['-e', '0']));
      floors.cli_help_ms.push(await spawnTimeMs([CLI, '--help']));
    }

    const floorRss = {
      node: round(await idleRssMb('node floor', ['-e', "console.log('ready'); setInterval(() => {}, 1000)"], idleMs), 1),
      node_worker_ort_kws: round(await idleRssMb('onnxruntime floor', ['-e', ortFloorScript(path.join(kwsDir, kwsEntry.file))], idleMs), 1),
      node_ort_kws: round(
        await idleRssMb('onnxruntime main floor', ['-e', ortMainFloorScript(path.join(kwsDir, kwsEntry.file))], idleMs),
        1,
      ),
    };
    log(
      `agent: floors: idle node ${floorRss.node} MB, node + one worker with a kws session ${floorRss.node_worker_ort_kws} MB, node with a kws session on its main thread ${floorRss.node_ort_kws} MB`,
    );

    const broker = await startBrokerProc();
    const waiters = new Map<string, (t: number, status: AgentStatus) => void>();
    const watcherKey = await admitted(broker.url, 'router');
    const watcher = openMeshConnection(broker.url, {
      identity: watcherKey.identity,
      onConnect: (c) => void c.subscribe(topics.allAgentStatus(), { qos: 1 }),
    });
    watcher.client.on('message', (_topic, payload) => {
      const t = performance.now();
      try {
        const status = decodeMessage(payload, ['status']);
        if (status.state === 'online') waiters.get(status.agent)?.(t, status);
      } catch {
        /* not ours */
      }
    });
    await watcher.firstConnect;
    await sleep(100); // the SUBACK

    const once = async (
      label: string,
      modelsDir: string,
      i: number,
      workers: number | undefined,
      inline: number | undefined = inlineMaxMs,
      launched = true,
    ): Promise<Rep> => {
      const key = await admitted(broker.url, 'agent');
      const id = key.identity.id;
      const online = new Promise<[number, AgentStatus]>((resolve, reject) => {
        const timer = setTimeout(() => reject(new Error(`agent ${id} did not announce within 30 s`)), 30_000);
        waiters.set(id, (t, status) => {
          clearTimeout(timer);
          waiters.delete(id);
          resolve([t, status]);
        });
      });
      const cliArgs = [CLI, 'agent', '--models', modelsDir, '--broker', broker.url, '--key', key.keyFile, '--log-level', 'info'];
      if (workers) cliArgs.push('--workers', String(workers));
      if (inline !== undefined) cliArgs.push('--inline-max-ms', String(inline));
      const t0 = performance.now();
      // As `edge-mesh up` and a device's service start it (edge-agent/src/launch.ts), or bare for comparison.
      const launch = launched ? agentLaunch(process.env) : { env: {}, nodeArgs: [] };
      const proc = spawnProc(`agent ${label}-${i}`, [...launch.nodeArgs, ...cliArgs], { env: launch.env });
      const exitedEarly = proc.exited.then((code) => {
        throw new Error(`agent ${id} exited (${code}) before announcing; stderr:\n${proc.lines.stderr.slice(-10).join('\n')}`);
      });
      const [t1, status] = await Promise.race([online, exitedEarly]);
      const readyMs = t1 - t0;
      await sleep(idleMs);
      const rep: Rep = {
        ready_ms: round(readyMs, 1),
        agent_logged_ready_ms: null,
        idle_rss_mb: round(procStatusMb(proc.pid, 'VmRSS'), 1),
        settled_rss_mb: null,
        rss_anon_mb: round(procStatusMb(proc.pid, 'RssAnon'), 1),
        rss_file_mb: round(procStatusMb(proc.pid, 'RssFile'), 1),
        peak_rss_mb: round(procStatusMb(proc.pid, 'VmHWM'), 1),
        threads: procThreads(proc.pid),
        workers: status.workers ?? null,
        inline_models: agentReadyFacts(proc)?.inline ?? null,
        worker_threads: agentReadyFacts(proc)?.workerThreads ?? null,
      };
      if (settleMs !== undefined && settleMs > idleMs) {
        await sleep(settleMs - idleMs);
        rep.settled_rss_mb = round(procStatusMb(proc.pid, 'VmRSS'), 1);
      }
      for (const line of proc.lines.stderr) {
        const j = parseJson(line);
        if (j?.msg === 'agent ready' && typeof j.readyMs === 'number') rep.agent_logged_ready_ms = j.readyMs;
      }
      await proc.stop();
      log(
        `  ${label}${workers ? ` (workers ${workers})` : ''} #${i + 1}: ready ${rep.ready_ms} ms (agent's own ${rep.agent_logged_ready_ms} ms), idle RSS ${rep.idle_rss_mb} MB (anon ${rep.rss_anon_mb}, file ${rep.rss_file_mb})${rep.settled_rss_mb === null ? '' : `, settled ${rep.settled_rss_mb} MB`}, peak ${rep.peak_rss_mb} MB, ${rep.threads} threads, ${rep.worker_threads} worker threads, inline [${rep.inline_models}]`,
      );
      return rep;
    };

    const summarizeCase = (list: Rep[]) => ({
      ready_ms: round(median(list.map((r) => r.ready_ms)), 1),
      idle_rss_mb: round(median(list.map((r) => r.idle_rss_mb)), 1),
      ...(settleMs !== undefined ? { settled_rss_mb: round(median(list.map((r) => r.settled_rss_mb ?? Number.NaN)), 1) } : {}),
      rss_anon_mb: round(median(list.map((r) => r.rss_anon_mb)), 1),
      rss_file_mb: round(median(list.map((r) => r.rss_file_mb)), 1),
      peak_rss_mb: round(median(list.map((r) => r.peak_rss_mb)), 1),
      agent_logged_ready_ms: round(median(list.map((r) => r.agent_logged_ready_ms ?? Number.NaN)), 1),
      workers: list[0]?.workers ?? null,
      threads: list[0]?.threads ?? null,
      worker_threads: list[0]?.worker_threads ?? null,
      inline_models: list[0]?.inline_models ?? null,
      ready_ms_all: list.map((r) => r.ready_ms),
      idle_rss_mb_all: list.map((r) => r.idle_rss_mb),
    });

    const runCases = async (workers: number | undefined) => {
      const all: Rep[] = [];
      const kws: Rep[] = [];
      const kwsPool: Rep[] = [];
      const kwsBare: Rep[] = [];
      for (let i = 0; i < reps; i++) {
        all.push(await once('all', MODELS_DIR, i, workers));
        kws.push(await once('kws', kwsDir, i, workers));
        kwsPool.push(await once('kws_pool', kwsDir, i, workers, 0));
        kwsBare.push(await once('kws_bare', kwsDir, i, workers, inlineMaxMs, false));
      }
      return { all: summarizeCase(all), kws: summarizeCase(kws), kws_pool: summarizeCase(kwsPool), kws_bare: summarizeCase(kwsBare) };
    };

    log(
      `agent: ${reps} repetitions per case, idle ${idleMs} ms${settleMs ? `, settled at ${settleMs} ms` : ''}, workers ${fixedWorkers ?? 'CLI default'}`,
    );
    const main = await runCases(fixedWorkers);
    let variant: { workers: number; cases: Awaited<ReturnType<typeof runCases>> } | undefined;
    const defaultWorkers = main.all.workers;
    if (!quick && fixedWorkers === undefined && defaultWorkers !== null) {
      log(`agent: workers ${defaultWorkers + 1} variant`);
      variant = { workers: defaultWorkers + 1, cases: await runCases(defaultWorkers + 1) };
    }
    await watcher.close();
    await broker.proc.stop();

    return {
      bench: 'agent',
      quick,
      reps,
      idle_ms: idleMs,
      ...(settleMs !== undefined ? { settle_ms: settleMs } : {}),
      models: manifest.models.map((m) => m.name),
      all: main.all,
      kws: main.kws,
      kws_pool: main.kws_pool,
      kws_bare: main.kws_bare,
      launch: agentLaunch(process.env),
      ...(inlineMaxMs !== undefined ? { inline_max_ms: inlineMaxMs } : {}),
      ...(variant ? { [`workers_${variant.workers}`]: variant.cases } : {}),
      process_floor_ms: { node: round(median(floors.node_ms), 1), cli_help: round(median(floors.cli_help_ms), 1) },
      floor_rss_mb: floorRss,
      ...environment(),
      model: 'all',
      ready_ms: main.all.ready_ms,
      idle_rss_mb: main.all.idle_rss_mb,
    };
  } finally {
    await rm(kwsDir, { recursive: true, force: true });
  }
}
