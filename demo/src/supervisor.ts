/**
 * Runs the parts of `edge-mesh up` as child processes and watches them (docs/operations.md, "The local
 * mesh"). Every part is an `edge-mesh` command of this checkout, started with an IPC channel over which
 * it reports `ready` and `summary` (demo/parts.ts), and in its own process group, so that a terminal's
 * Ctrl-C reaches only `up`, which then stops the parts in order. A part notices when `up` goes away,
 * even after a SIGKILL, because its channel closes (cli/supervised.ts).
 *
 * A part's stderr and stdout go, line by line, to `<logs>/<name>.log`; stderr lines at or above the
 * terminal level (and any stderr line that is not a JSON log line, such as an error message) are also
 * shown on `up`'s stderr, prefixed with the part's name. A part that exits while it is not being stopped fails the whole run: `failed`
 * rejects, naming the part, its exit code and its last lines.
 */
import { type ChildProcess, spawn } from 'node:child_process';
import { createWriteStream, type WriteStream } from 'node:fs';
import { mkdir } from 'node:fs/promises';
import path from 'node:path';
import { createInterface } from 'node:readline';
import { MeshError } from '@edge-mesh/protocol';
import { isPartMessage } from './parts.ts';

/** The edge-mesh command of this checkout (the demo runs inside the workspace, beside the cli package). */
export const CLI_BIN = path.resolve(import.meta.dirname, '..', '..', 'cli', 'bin', 'edge-mesh.mjs');

const LEVELS: Record<string, number> = { trace: 10, debug: 20, info: 30, warn: 40, error: 50, fatal: 60, silent: Infinity };
const TAIL_LINES = 20;

export interface PartSpec {
  /** Its name in logs and messages: broker, agent-1, router, bridge, device, app. */
  name: string;
  /** Arguments of the edge-mesh command. */
  args: string[];
  /** Added to the environment (secrets travel here, never on the command line); undefined removes a variable. */
  env?: Record<string, string | undefined>;
  /** Node flags placed before the command (an agent's launch settings, edge-agent/src/launch.ts). */
  nodeArgs?: readonly string[];
  /** Each stdout line goes here instead of the log (the sample app's reports). */
  onStdoutLine?: (line: string) => void;
  /** How long it may take to report `ready` (default 120 s: models load slowly on a busy Pi). */
  readyTimeoutMs?: number;
}

export interface PartExit {
  code: number | null;
  signal: NodeJS.Signals | null;
}

export class Part {
  readonly pid: number;
  /** The data of its `ready` message; rejects if it exits or times out first. */
  readonly ready: Promise<unknown>;
  /** The data of its `summary` message, once sent. */
  summary: unknown;
  readonly exited: Promise<PartExit>;
  exit: PartExit | undefined;
  /** Set while `up` stops it: its exit is then expected. */
  stopping = false;
  private readonly lines: string[] = [];

  constructor(
    readonly name: string,
    readonly child: ChildProcess,
    readyTimeoutMs: number,
  ) {
    this.pid = child.pid!;
    // 'close' comes after the output pipes are drained, so the last lines are in the tail by then.
    this.exited = new Promise((resolve) => {
      child.once('close', (code, signal) => {
        this.exit = { code, signal };
        resolve(this.exit);
      });
      // A process that never started has no 'close'.
      child.once('error', () => {
        if (child.pid === undefined) {
          this.exit = { code: null, signal: null };
          resolve(this.exit);
        }
      });
    });
    this.ready = new Promise((resolve, reject) => {
      const timer = setTimeout(
        () =>
          reject(
            new MeshError('MESH_TIMEOUT', `${this.describe()} did not report ready within ${readyTimeoutMs / 1000} s`, {
              details: { part: name, pid: this.pid, lastLines: this.tail() },
            }),
          ),
        readyTimeoutMs,
      );
      child.on('message', (message) => {
        if (!isPartMessage(message)) return;
        if (message.type === 'ready') {
          clearTimeout(timer);
          resolve(message.data);
        } else this.summary = message.data;
      });
      void this.exited.then((exit) => {
        clearTimeout(timer);
        reject(this.exitError(exit));
      });
    });
    this.ready.catch(() => {});
  }

  describe(): string {
    return `${this.name} (pid ${this.pid})`;
  }

  remember(line: string): void {
    this.lines.push(line);
    if (this.lines.length > TAIL_LINES) this.lines.shift();
  }

  /** Its last lines of output. */
  tail(): string[] {
    return [...this.lines];
  }

  exitError(exit: PartExit): MeshError {
    const how = exit.signal ? `was killed by ${exit.signal}` : `exited with code ${exit.code}`;
    return new MeshError('MESH_INTERNAL', `${this.describe()} ${how}`, {
      details: { part: this.name, pid: this.pid, code: exit.code, signal: exit.signal, lastLines: this.tail() },
    });
  }
}

export interface SupervisorOptions {
  /** Folder for `<name>.log` files (made; each run replaces them). */
  logDir: string;
  /** Log lines at this level or above also go to the terminal (default warn). */
  terminalLevel?: string;
  /** Where terminal lines go (default: stderr). */
  write?: (line: string) => void;
}

export class Supervisor {
  readonly parts: Part[] = [];
  /** Rejects when a part exits while nobody is stopping it. */
  readonly failed: Promise<never>;
  /** The first unexpected exit, once there is one. */
  failure: MeshError | undefined;
  private fail!: (err: MeshError) => void;
  private readonly logs: WriteStream[] = [];
  private readonly terminalLevel: number;
  private readonly write: (line: string) => void;
  private readonly onExit = () => {
    // Last resort when `up` exits without stopping a part (a crash); the parts also notice by themselves.
    for (const part of this.parts) if (part.exit === undefined) part.child.kill('SIGKILL');
  };

  constructor(private readonly options: SupervisorOptions) {
    this.terminalLevel = LEVELS[options.terminalLevel ?? 'warn'] ?? LEVELS.warn!;
    this.write = options.write ?? ((line) => process.stderr.write(`${line}\n`));
    this.failed = new Promise<never>((_, reject) => {
      this.fail = (err) => {
        this.failure ??= err;
        reject(err);
      };
    });
    this.failed.catch(() => {});
    process.once('exit', this.onExit);
  }

  async start(spec: PartSpec): Promise<Part> {
    await mkdir(this.options.logDir, { recursive: true });
    const log = createWriteStream(path.join(this.options.logDir, `${spec.name}.log`), { flags: 'w' });
    log.on('error', () => {});
    this.logs.push(log);
    const child = spawn(process.execPath, [...(spec.nodeArgs ?? []), CLI_BIN, ...spec.args], {
      stdio: ['ignore', 'pipe', 'pipe', 'ipc'],
      detached: true,
      env: { ...process.env, ...spec.env },
    });
    // spawn reports a failure to start as an 'error' event; the exit handler below does the rest.
    child.on('error', (err) => this.write(`[${spec.name}] could not start: ${err.message}`));
    const part = new Part(spec.name, child, spec.readyTimeoutMs ?? 120_000);
    this.parts.push(part);
    const onLine = (line: string, fromStdout: boolean) => {
      part.remember(line);
      log.write(`${line}\n`);
      if (fromStdout) {
        // A part's stdout says what `up` prints better itself (its URL, its id): it stays in the log.
        spec.onStdoutLine?.(line);
        return;
      }
      const shown = this.render(spec.name, line);
      if (shown !== undefined) this.write(shown);
    };
    createInterface({ input: child.stdout! }).on('line', (line) => onLine(line, true));
    createInterface({ input: child.stderr! }).on('line', (line) => onLine(line, false));
    void part.exited.then((exit) => {
      if (part.stopping) return;
      const err = part.exitError(exit);
      this.showTail(part, `${err.message} unexpectedly`);
      this.fail(err);
    });
    return part;
  }

  /** Waits for a part's `ready`, or fails as soon as any part fails. */
  async ready<T>(part: Part): Promise<T> {
    return (await Promise.race([part.ready, this.failed])) as T;
  }

  /** SIGTERM, then SIGKILL after `timeoutMs`; resolves once it has exited. */
  async stop(part: Part, timeoutMs = 10_000): Promise<PartExit> {
    part.stopping = true;
    if (part.exit) return part.exit;
    part.child.kill('SIGTERM');
    const timer = setTimeout(() => {
      this.write(`edge-mesh up: ${part.describe()} did not stop within ${timeoutMs / 1000} s; killing it`);
      part.child.kill('SIGKILL');
    }, timeoutMs);
    const exit = await part.exited;
    clearTimeout(timer);
    // A part exits with code 0 after a SIGTERM (or dies of it while still starting); an error code is worth its
    // last lines, as its figures may be missing.
    if (exit.signal === null && exit.code !== 0) {
      this.showTail(part, `${part.exitError(exit).message} while stopping`);
    }
    return exit;
  }

  private showTail(part: Part, what: string): void {
    this.write(`edge-mesh up: ${what}; its last lines (all in ${path.join(this.options.logDir, `${part.name}.log`)}):`);
    for (const line of part.tail()) this.write(`  ${formatLine(part.name, line).text}`);
  }

  /** Stops every part still running, the last started first; closes the log files. */
  async stopAll(timeoutMs = 10_000): Promise<void> {
    for (const part of [...this.parts].reverse()) await this.stop(part, timeoutMs);
    await Promise.all(this.logs.map((log) => new Promise<void>((resolve) => log.end(() => resolve()))));
    process.removeListener('exit', this.onExit);
  }

  /** A line for the terminal, or undefined when its level is below the terminal level. */
  private render(name: string, line: string): string | undefined {
    const { level, text } = formatLine(name, line);
    return level < this.terminalLevel ? undefined : text;
  }
}

/**
 * `[agent-1] warn: message key=value …` for a pino JSON line; `[agent-1] line` for anything else (an
 * error message, a stack trace), which counts as an error so that it is always shown.
 */
function formatLine(name: string, line: string): { level: number; text: string } {
  let entry: Record<string, unknown> | undefined;
  if (line.startsWith('{')) {
    try {
      entry = JSON.parse(line) as Record<string, unknown>;
    } catch {
      entry = undefined;
    }
  }
  if (!entry) return { level: LEVELS.error!, text: `[${name}] ${line}` };
  const level = typeof entry.level === 'number' ? entry.level : LEVELS.info!;
  const { level: _l, time: _t, pid: _p, hostname: _h, msg, ...rest } = entry;
  const levelName = Object.entries(LEVELS).find(([, n]) => n === level)?.[0] ?? String(level);
  const fields = Object.entries(rest)
    .map(([k, v]) => `${k}=${typeof v === 'string' ? v : JSON.stringify(v)}`)
    .join(' ');
  return { level, text: `[${name}] ${levelName}: ${String(msg ?? '')}${fields ? ` ${fields}` : ''}` };
}
