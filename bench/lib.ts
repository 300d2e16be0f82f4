/**
 * Shared plumbing for the benchmarks (not a benchmark itself).
 *
 * - Child processes: every broker, agent and load generator is a separate OS process spawned through
 *   `spawnProc`, tracked in one set and stopped by PID (SIGTERM, then SIGKILL after a grace period) by
 *   `stopAll`, which run.ts calls on success, on error and on its wall-clock timeout. An `exit` hook
 *   SIGKILLs anything still alive if the parent dies some other way.
 * - Lines: children talk to the parent in lines (stdout JSON events, stderr pino logs); `waitLine`
 *   waits for a matching line with a timeout and fails early if the child exits.
 * - /proc readers: per-process CPU time (utime + stime) and resident memory by PID.
 * - Machine and version facts included in every result.
 * - The build check: the processes spawned run the compiled code (cli/bin/edge-mesh.mjs loads dist/).
 */
import { type ChildProcess, spawn } from 'node:child_process';
import { createWriteStream, mkdtempSync, readdirSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { createInterface } from 'node:readline';
import { fileURLToPath } from 'node:url';
import { agentLaunch } from '@edge-mesh/agent/launch';
import { sendAdminRecord } from '@edge-mesh/client';
import { admit, encodeKeyFile, generateIdentity, type Identity, type Role } from '@edge-mesh/protocol';

export const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
export const CLI = path.join(ROOT, 'cli', 'bin', 'edge-mesh.mjs');
export const MODELS_DIR = path.join(ROOT, '.mesh-data', 'models');

/**
 * The benchmarks run the mesh as deployed: an authenticated broker that trusts one operator, and
 * agents, echo agents and load generators with their own admitted keys (in a temp folder).
 */
const KEYS_DIR = mkdtempSync(path.join(os.tmpdir(), 'edge-mesh-bench-'));
process.on('exit', () => rmSync(KEYS_DIR, { recursive: true, force: true }));
const operator = generateIdentity('operator');
const operatorKeyFile = keyFile(operator);

function keyFile(identity: Identity): string {
  const file = path.join(KEYS_DIR, `${identity.id}.key`);
  writeFileSync(file, encodeKeyFile(identity), { mode: 0o600 });
  return file;
}

/** The newest modification time of the files under `dir`, and which file has it. */
function newestFile(dir: string): { file: string; mtimeMs: number } {
  let newest = { file: '', mtimeMs: 0 };
  for (const entry of readdirSync(dir, { withFileTypes: true, recursive: true })) {
    if (!entry.isFile()) continue;
    const file = path.join(entry.parentPath, entry.name);
    const { mtimeMs } = statSync(file);
    if (mtimeMs > newest.mtimeMs) newest = { file, mtimeMs };
  }
  return newest;
}

/**
 * The agent, broker and load generators a benchmark spawns run `cli/bin/edge-mesh.mjs`, which loads the
 * compiled packages (dist/), not the sources: refuse to measure a build older than its sources (it would
 * report figures of code that is not in the working tree), or an environment that would make a spawned
 * node load the sources (the source condition or a TypeScript loader in NODE_OPTIONS).
 */
export function assertBuilt(packages = ['protocol', 'client', 'edge-agent', 'broker', 'sdk', 'cli']): void {
  const stale: string[] = [];
  for (const pkg of packages) {
    let builtMs: number;
    try {
      // tsc -b writes (or touches) the build info whenever it builds the package.
      builtMs = statSync(path.join(ROOT, pkg, 'dist', '.tsbuildinfo')).mtimeMs;
    } catch {
      stale.push(`${pkg} (not built)`);
      continue;
    }
    const newest = newestFile(path.join(ROOT, pkg, 'src'));
    if (newest.mtimeMs > builtMs) stale.push(path.relative(ROOT, newest.file));
  }
  if (stale.length > 0) throw new Error(`the build is older than its sources (${stale.join(', ')}): run npm run build first`);
  if (/@edge-mesh\/source|tsx/.test(process.env.NODE_OPTIONS ?? ''))
    throw new Error('NODE_OPTIONS would make the spawned processes run the sources; unset it to measure the compiled code');
}

/** A fresh identity with its key file, admitted nowhere (for an external broker's own credentials). */
export function unadmitted(role: Role): { identity: Identity; keyFile: string } {
  const identity = generateIdentity(role);
  return { identity, keyFile: keyFile(identity) };
}

/** The benchmarks' own temp folder (removed at exit). */
export function benchTempDir(name: string): string {
  return mkdtempSync(path.join(KEYS_DIR, `${name}-`));
}

/** A fresh identity admitted on the broker at `url`; returns it with its key file. */
export async function admitted(url: string, role: Role): Promise<{ identity: Identity; keyFile: string }> {
  const identity = generateIdentity(role);
  await sendAdminRecord(url, operator, admit(operator, identity), identity.id, 10_000);
  return { identity, keyFile: keyFile(identity) };
}

export interface BenchContext {
  quick: boolean;
  /** Progress output (stderr), so stdout ends with the result line alone. */
  log: (line: string) => void;
  /** Extra `--key value` / `--flag` arguments after the benchmark name. */
  args: Record<string, string | true>;
}

export type BenchResult = Record<string, unknown>;

export const sleep = (ms: number) => new Promise<void>((resolve) => setTimeout(resolve, ms));

type Stream = 'stdout' | 'stderr';

export interface Proc {
  readonly name: string;
  readonly child: ChildProcess;
  readonly pid: number;
  readonly lines: Record<Stream, string[]>;
  /** Resolves with the exit code (or the signal name) once the process has exited. */
  readonly exited: Promise<number | string>;
  readonly hasExited: () => boolean;
  /** First line (already seen or future) on `stream` for which `match` is true. */
  waitLine(stream: Stream, match: (line: string) => boolean, timeoutMs: number, what?: string): Promise<string>;
  /** Writes a line to the child's stdin (spawned with `stdin: true`). */
  send(line: string): void;
  /** SIGTERM, then SIGKILL after `graceMs`; resolves once the process is gone. */
  stop(graceMs?: number): Promise<void>;
}

const live = new Set<Proc>();

process.on('exit', () => {
  for (const p of live) {
    try {
      process.kill(p.pid, 'SIGKILL');
    } catch {
      /* already gone */
    }
  }
});

const MAX_KEPT_LINES = 2_000;

export function spawnProc(
  name: string,
  args: string[],
  options: { stdin?: boolean; env?: NodeJS.ProcessEnv; command?: string } = {},
): Proc {
  // `command` runs another program (a broker engine such as mosquitto) under the same bookkeeping; default node.
  const child = spawn(options.command ?? process.execPath, args, {
    cwd: ROOT,
    stdio: [options.stdin ? 'pipe' : 'ignore', 'pipe', 'pipe'],
    env: { ...process.env, ...options.env },
  });
  if (child.pid === undefined) throw new Error(`could not spawn ${name}`);
  const lines: Record<Stream, string[]> = { stdout: [], stderr: [] };
  const listeners: Record<Stream, Set<(line: string) => void>> = { stdout: new Set(), stderr: new Set() };
  // BENCH_PROC_LOG_DIR=DIR writes each process's whole output to DIR/NAME-PID.log (e.g. a node's --trace-gc lines).
  const logDir = process.env.BENCH_PROC_LOG_DIR;
  const log = logDir ? createWriteStream(path.join(logDir, `${name.replace(/[^\w.-]+/g, '_')}-${child.pid}.log`)) : undefined;
  if (log) child.once('close', () => log.end());
  for (const stream of ['stdout', 'stderr'] as const) {
    createInterface({ input: child[stream]! }).on('line', (line) => {
      log?.write(`${stream} ${line}\n`);
      const kept = lines[stream];
      kept.push(line);
      if (kept.length > MAX_KEPT_LINES) kept.splice(0, kept.length - MAX_KEPT_LINES);
      for (const l of [...listeners[stream]]) l(line);
    });
  }
  let done = false;
  const exited = new Promise<number | string>((resolve) => {
    child.once('exit', (code, signal) => {
      done = true;
      live.delete(proc);
      resolve(code ?? signal ?? 'unknown');
    });
  });
  const exitListeners = new Set<() => void>();
  void exited.then(() => {
    for (const l of [...exitListeners]) l();
  });
  child.stdin?.on('error', () => {});

  const proc: Proc = {
    name,
    child,
    pid: child.pid,
    lines,
    exited,
    hasExited: () => done,
    waitLine(stream, match, timeoutMs, what = 'expected line') {
      const seen = lines[stream].find(match);
      if (seen !== undefined) return Promise.resolve(seen);
      return new Promise<string>((resolve, reject) => {
        const cleanup = () => {
          clearTimeout(timer);
          listeners[stream].delete(onLine);
          exitListeners.delete(onExit);
        };
        const onLine = (line: string) => {
          if (!match(line)) return;
          cleanup();
          resolve(line);
        };
        const onExit = () => {
          cleanup();
          reject(new Error(`${name} exited before printing ${what}; stderr tail:\n${lines.stderr.slice(-15).join('\n')}`));
        };
        const timer = setTimeout(() => {
          cleanup();
          reject(new Error(`${name}: no ${what} within ${timeoutMs} ms; stderr tail:\n${lines.stderr.slice(-15).join('\n')}`));
        }, timeoutMs);
        listeners[stream].add(onLine);
        if (done) onExit();
        else exitListeners.add(onExit);
      });
    },
    send(line) {
      child.stdin?.write(`${line}\n`);
    },
    async stop(graceMs = 3_000) {
      if (done) return;
      try {
        process.kill(child.pid!, 'SIGTERM');
      } catch {
        /* gone */
      }
      const killer = setTimeout(() => {
        try {
          process.kill(child.pid!, 'SIGKILL');
        } catch {
          /* gone */
        }
      }, graceMs);
      await exited;
      clearTimeout(killer);
    },
  };
  live.add(proc);
  return proc;
}

/** Stops every child still running, all in parallel, each by its own PID. */
export async function stopAll(graceMs = 3_000): Promise<void> {
  await Promise.all([...live].map((p) => p.stop(graceMs)));
}

/** Parses a JSON line, or undefined. */
export function parseJson(line: string): Record<string, unknown> | undefined {
  if (!line.startsWith('{')) return undefined;
  try {
    return JSON.parse(line) as Record<string, unknown>;
  } catch {
    return undefined;
  }
}

/** A stdout line that is a JSON event `{ "event": name, ... }`. */
export const isEvent = (name: string) => (line: string) => parseJson(line)?.event === name;

// ── /proc readers ────────────────────────────────────────────────────────────────────────────

const CLK_TCK = 100; // `getconf CLK_TCK` on Linux/x64 and arm64

/** CPU time (user + system, all threads) the process has used so far, in ms; NaN when unreadable. */
export function cpuMs(pid: number): number {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
    const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
    // After "pid (comm) ", field 3 (state) is index 0; utime is field 14, stime field 15.
    return ((Number(fields[11]) + Number(fields[12])) * 1000) / CLK_TCK;
  } catch {
    return Number.NaN;
  }
}

/** A `VmRSS`-style field of /proc/PID/status in MB; NaN when unreadable. */
export function procStatusMb(pid: number, field = 'VmRSS'): number {
  try {
    const status = readFileSync(`/proc/${pid}/status`, 'utf8');
    const m = new RegExp(`^${field}:\\s+(\\d+) kB`, 'm').exec(status);
    return m ? Number(m[1]) / 1024 : Number.NaN;
  } catch {
    return Number.NaN;
  }
}

export function procThreads(pid: number): number {
  try {
    const m = /^Threads:\s+(\d+)/m.exec(readFileSync(`/proc/${pid}/status`, 'utf8'));
    return m ? Number(m[1]) : Number.NaN;
  } catch {
    return Number.NaN;
  }
}

/** Busy CPU time of the whole machine so far (all cores, everything but idle and iowait), in ms. */
export function machineBusyMs(): number {
  try {
    const line = readFileSync('/proc/stat', 'utf8').split('\n', 1)[0]!;
    const v = line.trim().split(/\s+/).slice(1).map(Number);
    const total = v.slice(0, 8).reduce((a, b) => a + b, 0); // user..steal; guest is already inside user
    return ((total - v[3]! - v[4]!) * 1000) / CLK_TCK;
  } catch {
    return Number.NaN;
  }
}

export type CpuReport = Record<string, { cpu_ms: number; cores: number }>;

/**
 * Samples the CPU time of several processes at two moments; `cores` = CPU ms / wall ms. Also reports
 * `machine` (every process on the box) and `others` (machine minus the named processes and this one),
 * because other work on a shared 2-core machine skews every latency figure.
 */
export class CpuMeter {
  private start = new Map<string, number>();
  private t0 = 0;
  constructor(private readonly procs: Record<string, number>) {}
  begin(): void {
    this.t0 = performance.now();
    for (const [name, pid] of Object.entries(this.procs)) this.start.set(name, cpuMs(pid));
    this.start.set('__self', cpuMs(process.pid));
    this.start.set('__machine', machineBusyMs());
  }
  end(): CpuReport {
    const wall = performance.now() - this.t0;
    const out: CpuReport = {};
    const entry = (used: number) => ({ cpu_ms: Math.round(used), cores: Math.round((used / wall) * 100) / 100 });
    let ours = cpuMs(process.pid) - this.start.get('__self')!;
    for (const [name, pid] of Object.entries(this.procs)) {
      const used = cpuMs(pid) - (this.start.get(name) ?? Number.NaN);
      ours += used;
      out[name] = entry(used);
    }
    const machine = machineBusyMs() - this.start.get('__machine')!;
    out.machine = entry(machine);
    out.others = entry(Math.max(0, machine - ours));
    return out;
  }
}

// ── processes of the mesh ───────────────────────────────────────────────────────────────────

/** `edge-mesh broker --port 0`; its first stdout line is its URL. */
export async function startBrokerProc(name = 'broker'): Promise<{ proc: Proc; url: string }> {
  const proc = spawnProc(name, [
    CLI,
    'broker',
    '--port',
    '0',
    '--host',
    '127.0.0.1',
    '--operator',
    operatorKeyFile,
    '--data',
    path.join(KEYS_DIR, `${name.replace(/\W/g, '-')}-${Date.now()}`),
    '--log-level',
    'warn',
  ]);
  const url = (await proc.waitLine('stdout', (l) => l.startsWith('mqtt://127.0.0.1:'), 20_000, 'its URL')).trim();
  return { proc, url };
}

export interface AgentProcOptions {
  url: string;
  /** An admitted agent key file (see `admitted`). */
  keyFile: string;
  id: string;
  modelsDir?: string;
  workers?: number;
  queueLimit?: number;
  /** --inline-max-ms (0: every model on the worker pool); the CLI's default when absent. */
  inlineMaxMs?: number;
  name?: string;
  /** More `edge-mesh agent` options, e.g. ['--no-admission']. */
  extraArgs?: string[];
  /** More environment for the agent process, e.g. MESH_AGENT_FAULTS (docs/agent.md, "Injected faults"). */
  env?: NodeJS.ProcessEnv;
}

/** `edge-mesh agent`; resolves once it logs 'announced' (its retained status reached the broker). */
export async function startAgentProc(o: AgentProcOptions): Promise<Proc> {
  const args = [CLI, 'agent', '--models', o.modelsDir ?? MODELS_DIR, '--broker', o.url, '--key', o.keyFile, '--log-level', 'info'];
  if (o.workers) args.push('--workers', String(o.workers));
  if (o.queueLimit) args.push('--queue-limit', String(o.queueLimit));
  if (o.inlineMaxMs !== undefined) args.push('--inline-max-ms', String(o.inlineMaxMs));
  if (o.extraArgs) args.push(...o.extraArgs);
  // BENCH_AGENT_ARGS (space-separated) adds `edge-mesh agent` options, e.g. `--inline-batch-max 1` for an A/B run.
  args.push(...(process.env.BENCH_AGENT_ARGS?.split(' ').filter(Boolean) ?? []));
  // As `edge-mesh up` and a device's service start it (edge-agent/src/launch.ts: allocator pools, libuv and V8
  // helper threads). BENCH_AGENT_NODE_ARGS (space-separated) goes to the agents' node too, e.g.
  // `--cpu-prof --cpu-prof-dir=/tmp/prof`.
  const launch = agentLaunch(process.env);
  const nodeArgs = process.env.BENCH_AGENT_NODE_ARGS?.split(' ').filter(Boolean) ?? [];
  const proc = spawnProc(o.name ?? `agent ${o.id}`, [...launch.nodeArgs, ...nodeArgs, ...args], { env: { ...launch.env, ...o.env } });
  await proc.waitLine('stderr', (l) => l.includes('"msg":"announced"'), 30_000, "'announced'");
  return proc;
}

/** What an `edge-mesh agent` process logged as ready: the models that run inline and its worker threads (null before). */
export function agentReadyFacts(proc: Proc): { inline: string[]; workerThreads: number; readyMs: number } | null {
  for (const line of proc.lines.stderr) {
    const j = parseJson(line);
    if (j?.msg === 'agent ready')
      return { inline: (j.inline as string[]) ?? [], workerThreads: Number(j.workerThreads), readyMs: Number(j.readyMs) };
  }
  return null;
}

/** bench/echo-agent.ts: answers kws requests without inference; prints {"event":"ready"} once announced. */
export async function startEchoAgentProc(url: string, id: string, keyFilePath: string): Promise<Proc> {
  // BENCH_AGENT_NODE_ARGS goes to the echo agent's node too, so both sides of a comparison can be profiled.
  const nodeArgs = process.env.BENCH_AGENT_NODE_ARGS?.split(' ').filter(Boolean) ?? [];
  const proc = spawnProc(`echo ${id}`, [
    ...nodeArgs,
    '--import',
    'tsx',
    path.join(ROOT, 'bench', 'echo-agent.ts'),
    '--broker',
    url,
    '--key',
    keyFilePath,
  ]);
  await proc.waitLine('stdout', isEvent('ready'), 20_000, 'ready event');
  return proc;
}

export interface LoadgenOptions {
  url: string;
  /** An admitted app key file (see `admitted`). */
  keyFile: string;
  id: string;
  mode: 'latency' | 'throughput';
  model?: string;
  warmup?: number;
  n?: number;
  concurrency?: number;
  warmupMs?: number;
  durationMs?: number;
  deadlineMs?: number;
  /** Latency mode: pin request i to agents[i mod k] and report each agent's figures (`by_agent`). */
  agents?: string[];
  /** Throughput mode with `agents`: send to each agent in turn for this long, and report each slice's rps. */
  sliceMs?: number;
  /** Pays for every request (bench/loadgen.ts, "Paid"): its options, and MESH_EVM_KEY in `env`. */
  payment?: { args: string[]; env: Record<string, string> };
}

/**
 * Stops a load generator that has given its result: it exits by itself then, and is given up to 3 s for it, so that a node
 * flag such as --cpu-prof (BENCH_LOADGEN_NODE_ARGS) can write its file before a stop signal would cut it off.
 */
export async function stopLoadgen(proc: Proc): Promise<void> {
  await Promise.race([proc.exited, sleep(3_000)]);
  await proc.stop();
}

/** bench/loadgen.ts; resolves once it is connected and sees the model ({"event":"ready"}); send 'go' to start. */
export async function startLoadgenProc(o: LoadgenOptions): Promise<Proc> {
  // BENCH_LOADGEN_NODE_ARGS (space-separated) goes to the load generators' node, as BENCH_AGENT_NODE_ARGS to the agents'.
  const args = [
    ...(process.env.BENCH_LOADGEN_NODE_ARGS?.split(' ').filter(Boolean) ?? []),
    '--import',
    'tsx',
    path.join(ROOT, 'bench', 'loadgen.ts'),
    '--broker',
    o.url,
    '--key',
    o.keyFile,
    '--mode',
    o.mode,
    '--model',
    o.model ?? 'kws',
  ];
  const opt = (flag: string, v: number | undefined) => {
    if (v !== undefined) args.push(flag, String(v));
  };
  opt('--warmup', o.warmup);
  opt('--n', o.n);
  opt('--concurrency', o.concurrency);
  opt('--warmup-ms', o.warmupMs);
  opt('--duration-ms', o.durationMs);
  opt('--deadline-ms', o.deadlineMs);
  opt('--slice-ms', o.sliceMs);
  if (o.agents) args.push('--agents', o.agents.join(','));
  if (o.payment) args.push(...o.payment.args);
  const proc = spawnProc(`loadgen ${o.id}`, args, { stdin: true, ...(o.payment ? { env: o.payment.env } : {}) });
  await proc.waitLine('stdout', isEvent('ready'), 20_000, 'ready event');
  return proc;
}

/** The loadgen's final `{"event":"result", ...}` line. */
export async function loadgenResult(proc: Proc, timeoutMs: number): Promise<Record<string, unknown>> {
  const line = await proc.waitLine('stdout', isEvent('result'), timeoutMs, 'result');
  return parseJson(line)!;
}

// ── facts ────────────────────────────────────────────────────────────────────────────────────

function pkgVersion(pkg: string): string | undefined {
  try {
    return (JSON.parse(readFileSync(path.join(ROOT, 'node_modules', pkg, 'package.json'), 'utf8')) as { version?: string }).version;
  } catch {
    return undefined;
  }
}

export function environment(): Record<string, unknown> {
  return {
    node: process.version,
    cpus: os.availableParallelism(),
    cpu_model: os.cpus()[0]?.model ?? 'unknown',
    platform: `${os.platform()}-${os.arch()}`,
    versions: { 'onnxruntime-node': pkgVersion('onnxruntime-node'), aedes: pkgVersion('aedes'), mqtt: pkgVersion('mqtt') },
  };
}

export function median(values: number[]): number {
  if (values.length === 0) return Number.NaN;
  const s = [...values].sort((a, b) => a - b);
  const mid = Math.floor(s.length / 2);
  return s.length % 2 ? s[mid]! : (s[mid - 1]! + s[mid]!) / 2;
}

/** Unique-ish id suffix for agent and client ids (valid mesh ids are [a-z0-9-]). */
export function idSuffix(): string {
  return `${process.pid.toString(36)}-${Math.floor(Math.random() * 36 ** 4).toString(36)}`;
}
