/** `edge-mesh payout register` and `show` against a local chain started by `edge-mesh chain` (docs/cli.md). */
import assert from 'node:assert/strict';
import { type ChildProcess, spawn } from 'node:child_process';
import { once } from 'node:events';
import { mkdir, mkdtemp, rm, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { after, before, test } from 'node:test';
import { encodeKeyFile, generateIdentity, toHex } from '@edge-mesh/protocol';
import { ROOT } from './helpers.ts';

const CLI = path.join(ROOT, 'cli', 'bin', 'edge-mesh.mjs');

function edgeMesh(args: string[]): Promise<{ code: number; stdout: string; stderr: string }> {
  return new Promise((resolve) => {
    const child = spawn(process.execPath, [CLI, ...args], { stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (d: Buffer) => (stdout += d.toString()));
    child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
    child.on('close', (code) => resolve({ code: code ?? -1, stdout, stderr }));
  });
}

let dir: string;
let chainProc: ChildProcess;

before(async () => {
  dir = await mkdtemp(path.join(os.tmpdir(), 'edge-mesh-payout-'));
  await mkdir(path.join(dir, 'keys'));
  chainProc = spawn(
    process.execPath,
    [CLI, 'chain', '--port', '0', '--accounts', '3', '--out', path.join(dir, 'dep.json'), '--write-keys', path.join(dir, 'keys')],
    {
      stdio: ['ignore', 'pipe', 'pipe'],
    },
  );
  chainProc.stderr!.resume();
  await new Promise<void>((resolve, reject) => {
    let out = '';
    const timer = setTimeout(() => reject(new Error('edge-mesh chain printed nothing in 60 s')), 60_000);
    chainProc.stdout!.on('data', (d: Buffer) => {
      out += d.toString();
      if (out.includes('\n')) {
        clearTimeout(timer);
        resolve();
      }
    });
    chainProc.once('exit', (code) => reject(new Error(`edge-mesh chain exited with ${code}`)));
  });
});

after(async () => {
  if (chainProc && chainProc.exitCode === null) {
    chainProc.kill('SIGTERM');
    await once(chainProc, 'exit');
  }
  if (dir) await rm(dir, { recursive: true, force: true });
});

test("payout register puts an agent's key in the registry under the payout account; show reads it back", async () => {
  const agent = generateIdentity('agent');
  const agentKey = path.join(dir, 'agent.key');
  await writeFile(agentKey, encodeKeyFile(agent), { mode: 0o600 });
  const dep = ['--deployment', path.join(dir, 'dep.json')];
  const payoutKey = (await import('node:fs/promises')).readdir(path.join(dir, 'keys')).then((f) => path.join(dir, 'keys', f.sort()[1]!));
  const reg = await edgeMesh(['payout', 'register', '--agent-key', agentKey, '--key', await payoutKey, ...dep]);
  assert.equal(reg.code, 0, reg.stderr);
  const out = JSON.parse(reg.stdout.trim()) as { payout: string; agent: string; tx: string };
  assert.equal(out.agent, agent.id);
  const show = await edgeMesh(['payout', 'show', '--payout', out.payout, ...dep]);
  assert.equal(show.code, 0, show.stderr);
  const shown = JSON.parse(show.stdout.trim()) as { registered: boolean; agentKey: string; agent: string };
  assert.deepEqual(shown, { payout: out.payout, registered: true, agentKey: toHex(agent.publicKey), agent: agent.id });
  // An address nobody registered.
  const none = JSON.parse((await edgeMesh(['payout', 'show', '--payout', `0x${'12'.repeat(20)}`, ...dep])).stdout.trim()) as {
    registered: boolean;
  };
  assert.equal(none.registered, false);
  // Without a payout key: a coded configuration error.
  const noKey = await edgeMesh(['payout', 'register', '--agent-key', agentKey, ...dep]);
  assert.notEqual(noKey.code, 0);
  assert.match(noKey.stderr, /MESH_CONFIG/);
});
