/**
 * The operator console's views on the command line (docs/cli.md, "Fleet, admissions and earnings"):
 * `edge-mesh fleet ls`, `edge-mesh admissions ls`, `edge-mesh earnings` read the router's authenticated JSON
 * endpoints (the same ones the console page reads, router/src/console.ts) and print a table, or the JSON with --json;
 * `edge-mesh admissions request` is a device asking the router to be admitted.
 */
import { readFile } from 'node:fs/promises';
import { loadKeyFile } from '@edge-mesh/client';
import { isMeshErrorCode, MeshError } from '@edge-mesh/protocol';
import type { Command } from 'commander';

export const DEFAULT_ROUTER = 'http://127.0.0.1:8080';

interface ViewOptions {
  router: string;
  apiKeyFile?: string;
  json: boolean;
}

function viewFlags(cmd: Command): Command {
  return cmd
    .option('--router <url>', "the router's HTTP API (env MESH_ROUTER_URL)", process.env.MESH_ROUTER_URL ?? DEFAULT_ROUTER)
    .option('--api-key-file <file>', 'file holding an API key or mesh token with the read scope (env MESH_API_KEY holds the key itself)')
    .option('--json', "print the router's JSON answer instead of a table", false);
}

export async function credential(file: string | undefined): Promise<string | undefined> {
  if (file !== undefined) {
    try {
      return (await readFile(file, 'utf8')).trim();
    } catch (cause) {
      throw new MeshError('MESH_CONFIG', `cannot read --api-key-file ${file}: ${(cause as NodeJS.ErrnoException).code ?? cause}`, {
        cause,
      });
    }
  }
  return process.env.MESH_API_KEY?.trim() || undefined;
}

/**
 * Calls the router; a refusal becomes the MeshError its body names, so the CLI prints the code and message. A JSON
 * `body` is POSTed; `bytes` are sent with their own media type and method (a bundle upload is a PUT).
 */
export async function call(
  router: string,
  path: string,
  init: { key?: string | undefined; body?: unknown; bytes?: Uint8Array; mediaType?: string; method?: string; timeoutMs?: number } = {},
): Promise<unknown> {
  let res: Response;
  const hasBody = init.body !== undefined || init.bytes !== undefined;
  try {
    res = await fetch(new URL(path, router), {
      method: init.method ?? (hasBody ? 'POST' : 'GET'),
      headers: {
        ...(init.key ? { authorization: `Bearer ${init.key}` } : {}),
        ...(init.body !== undefined ? { 'content-type': 'application/json' } : {}),
        ...(init.bytes !== undefined ? { 'content-type': init.mediaType ?? 'application/octet-stream' } : {}),
      },
      ...(init.body !== undefined ? { body: JSON.stringify(init.body) } : {}),
      ...(init.bytes !== undefined ? { body: init.bytes } : {}),
      signal: AbortSignal.timeout(init.timeoutMs ?? 10_000),
    });
  } catch (cause) {
    throw new MeshError('MESH_NOT_CONNECTED', `cannot reach the router at ${router}: ${(cause as Error).message}`, { cause });
  }
  const body = (await res.json().catch(() => undefined)) as { error?: string; code?: string } | undefined;
  if (!res.ok) {
    const code = isMeshErrorCode(body?.code) ? body.code : 'MESH_INTERNAL';
    const hint = res.status === 401 ? ' (pass --api-key-file, or set MESH_API_KEY)' : '';
    throw new MeshError(code, `the router refused ${path}: ${body?.error ?? `HTTP ${res.status}`}${hint}`, {
      details: { status: res.status },
    });
  }
  return body;
}

/**
 * Text for a terminal: what agents and requesters send is untrusted, and an escape sequence in a name could rewrite
 * the screen. Control characters (C0, DEL, C1) and the bidirectional overrides are shown as \u{…} instead.
 */
export function terminalSafe(text: unknown): string {
  return String(text ?? '').replace(
    // biome-ignore lint/suspicious/noControlCharactersInRegex: finding control characters is this function's purpose
    /[\u0000-\u001f\u007f-\u009f\u200e\u200f\u202a-\u202e\u2066-\u2069]/g,
    (c) => `\\u{${c.codePointAt(0)!.toString(16)}}`,
  );
}

/** Columns padded to their widest cell; every cell goes through terminalSafe. */
export function table(header: string[], rows: unknown[][]): string {
  const cells = [header, ...rows.map((r) => r.map(terminalSafe))];
  const widths = header.map((_h, i) => Math.max(...cells.map((r) => (r[i] ?? '').length)));
  return `${cells.map((r) => r.map((c, i) => (i === r.length - 1 ? c : c.padEnd(widths[i]!))).join('  ')).join('\n')}\n`;
}

const usd = (micros: number | null | undefined) => (micros === null || micros === undefined ? '-' : (micros / 1e6).toFixed(6));
const fixed = (n: number | null | undefined, digits = 1) => (n === null || n === undefined ? '-' : n.toFixed(digits));

interface AgentView {
  id: string;
  up: boolean;
  state: string;
  version?: string;
  hardware?: { platform: string; arch: string; cpus: number; memoryMb: number; cpuModel: string };
  models: { name: string; version: string; latencyMs?: number; priceMicros?: number }[];
  load: { reportedInFlight: number; outstanding: number; rttMs: number | null; pFail: number; ejected: boolean } | null;
}

interface AdmissionsView {
  admin: { operator: string } | null;
  pending: { id: string; role: string; name: string; requestedMs: number }[];
  admitted: { id: string; role?: string; name: string; atMs: number; expiresMs?: number }[];
  revoked: { id: string; role?: string; name: string; atMs: number }[];
  seen: { id: string; up: boolean; state: string }[];
}

interface EarningsView {
  chain: boolean;
  chain_error?: string;
  owners: { payout: string | null; agents: string[]; requests: number; quoted_micros: number; settled_micros: number | null }[];
}

const print = (text: string): void => {
  process.stdout.write(text);
};
const iso = (ms: number | undefined) => (ms === undefined ? '-' : new Date(ms).toISOString().replace(/\.\d+Z$/, 'Z'));

export function registerConsoleCommands(program: Command): void {
  const fleet = program.command('fleet').description("the router's view of the fleet (the console's Fleet section)");
  viewFlags(
    fleet
      .command('ls')
      .description('list the agents the router knows: state, hardware, models and versions, load, round trip, failure rate, ejection'),
  ).action(async (opts: ViewOptions) => {
    const view = (await call(opts.router, '/v1/agents', { key: await credential(opts.apiKeyFile) })) as { agents: AgentView[] };
    if (opts.json) return print(`${JSON.stringify(view)}\n`);
    print(
      table(
        ['AGENT', 'STATE', 'VERSION', 'HARDWARE', 'MODELS', 'IN-FLIGHT', 'RTT-MS', 'FAIL-%', 'EJECTED'],
        view.agents.map((a) => [
          a.id,
          a.up ? 'up' : a.state,
          a.version ?? '-',
          a.hardware ? `${a.hardware.platform}/${a.hardware.arch} ${a.hardware.cpus}cpu ${Math.round(a.hardware.memoryMb / 1024)}GiB` : '-',
          a.models.map((m) => `${m.name}@${m.version}`).join(',') || '-',
          a.load ? `${a.load.reportedInFlight}/${a.load.outstanding}` : '-',
          fixed(a.load?.rttMs),
          a.load ? fixed(a.load.pFail * 100) : '-',
          a.load?.ejected ? 'yes' : 'no',
        ]),
      ),
    );
  });

  const admissions = program
    .command('admissions')
    .description("join requests and the router's admissions (the console's Admissions section)");
  viewFlags(
    admissions
      .command('ls')
      .description('list pending join requests, the admissions and revocations made from the router, and the agents it sees'),
  ).action(async (opts: ViewOptions) => {
    const view = (await call(opts.router, '/v1/admissions', { key: await credential(opts.apiKeyFile) })) as AdmissionsView;
    if (opts.json) return print(`${JSON.stringify(view)}\n`);
    const rows: unknown[][] = [
      ...view.pending.map((p) => ['pending', p.id, p.role, p.name, iso(p.requestedMs), '-']),
      ...view.admitted.map((e) => ['admitted', e.id, e.role ?? '-', e.name, iso(e.atMs), iso(e.expiresMs)]),
      ...view.revoked.map((e) => ['revoked', e.id, e.role ?? '-', e.name, iso(e.atMs), '-']),
      ...view.seen
        .filter((s) => !view.admitted.some((e) => e.id === s.id) && !view.revoked.some((e) => e.id === s.id))
        .map((s) => ['seen', s.id, s.id.split('-')[0], '', '-', '-']),
    ];
    print(table(['STATE', 'ID', 'ROLE', 'NAME (UNVERIFIED)', 'SINCE', 'EXPIRES'], rows));
    if (view.admin === null)
      process.stderr.write('edge-mesh: this router has no operator key for admissions (edge-mesh router --admin-key)\n');
  });
  admissions
    .command('request')
    .description('ask a router to admit this device or app: its operator then admits it from the console (or `edge-mesh admit`)')
    .requiredOption('--key <file>', 'the key file of the device or app (only its public half is sent)')
    .option('--name <text>', 'a label for the operator (at most 64 characters; the operator checks the id, not the name)', '')
    .option('--router <url>', "the router's HTTP API (env MESH_ROUTER_URL)", process.env.MESH_ROUTER_URL ?? DEFAULT_ROUTER)
    .action(async (opts: { key: string; name: string; router: string }) => {
      const identity = await loadKeyFile(opts.key);
      const answer = await call(opts.router, '/v1/admissions/requests', {
        body: { role: identity.role, public_key: Buffer.from(identity.publicKey).toString('base64url'), name: opts.name },
      });
      print(`${JSON.stringify(answer)}\n`);
    });

  viewFlags(
    program
      .command('earnings')
      .description(
        "earnings per device owner (payout address): agents, requests served through the router, their quoted value, and what the escrow settled (the console's Earnings section)",
      ),
  ).action(async (opts: ViewOptions) => {
    const view = (await call(opts.router, '/v1/earnings', { key: await credential(opts.apiKeyFile) })) as EarningsView;
    if (opts.json) return print(`${JSON.stringify(view)}\n`);
    print(
      table(
        ['PAYOUT', 'AGENTS', 'REQUESTS', 'QUOTED-USD', 'SETTLED-USD'],
        view.owners.map((o) => [o.payout ?? '(none)', o.agents.length, o.requests, usd(o.quoted_micros), usd(o.settled_micros)]),
      ),
    );
    if (!view.chain)
      process.stderr.write('edge-mesh: the router reads no chain (edge-mesh router --rpc --escrow): nothing settled is shown\n');
    else if (view.chain_error) process.stderr.write(`edge-mesh: the chain could not be read: ${terminalSafe(view.chain_error)}\n`);
  });
}
