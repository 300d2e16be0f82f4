/**
 * The console's views on the command line (issue 15): `edge-mesh fleet ls`, `admissions ls`, `earnings` and
 * `admissions request`, run as child processes against `edge-mesh router --admin-key` (also a child process) on an
 * authenticated broker. They refuse to print without a credential, print tables and --json, and never pass an
 * escape sequence from a requester's name to the terminal.
 */
import assert from 'node:assert/strict';
import { execFile, spawn } from 'node:child_process';
import { writeFile } from 'node:fs/promises';
import path from 'node:path';
import { test } from 'node:test';
import { promisify } from 'node:util';
import { admit, generateIdentity } from '@edge-mesh/protocol';
import { makeApiKey } from '@edge-mesh/router';
import { agentFor, brokerFor, keyFileFor, ROOT, tempDir } from './helpers.ts';

const run = promisify(execFile);
const BIN = path.join(ROOT, 'cli/bin/edge-mesh.mjs');

function edgeMesh(args: string[], env: Record<string, string> = {}) {
  return run(process.execPath, [BIN, ...args], { timeout: 30_000, env: { ...process.env, ...env } });
}

async function refused(args: string[], env: Record<string, string> = {}): Promise<{ code: number; stderr: string }> {
  try {
    await edgeMesh(args, env);
  } catch (err) {
    const e = err as { code: number; stderr: string };
    return { code: e.code, stderr: e.stderr };
  }
  assert.fail(`edge-mesh ${args.join(' ')} succeeded`);
}

test('fleet ls, admissions ls, earnings and admissions request against edge-mesh router --admin-key', { timeout: 120_000 }, async (t) => {
  const operator = generateIdentity('operator');
  const broker = await brokerFor(t, {
    auth: { trustedOperators: [{ id: operator.id, publicKey: operator.publicKey }], dataDir: await tempDir(t, 'edge-mesh-console-cli-') },
  });
  const routerKey = generateIdentity('router');
  await broker.admit(admit(operator, routerKey));
  const agentKey = generateIdentity('agent');
  await broker.admit(admit(operator, agentKey));
  const agent = await agentFor(t, { brokerUrl: broker.url, identity: agentKey });

  const dir = await tempDir(t, 'edge-mesh-console-cli-');
  const viewer = makeApiKey('viewer', ['read']);
  const admin = makeApiKey('admin', ['read', 'operator']);
  const apiKeys = path.join(dir, 'api-keys.json');
  await writeFile(apiKeys, JSON.stringify([viewer.entry, admin.entry]));
  const viewerFile = path.join(dir, 'viewer.key');
  await writeFile(viewerFile, `${viewer.key}\n`, { mode: 0o600 });

  const router = spawn(
    process.execPath,
    [
      BIN,
      'router',
      '--broker',
      broker.url,
      '--key',
      await keyFileFor(t, routerKey),
      '--http-port',
      '0',
      '--http-api-keys',
      apiKeys,
      '--admin-key',
      await keyFileFor(t, operator),
      '--log-level',
      'warn',
    ],
    { stdio: ['ignore', 'pipe', 'pipe'] },
  );
  t.after(() => {
    if (router.exitCode === null) router.kill('SIGKILL');
  });
  let stderr = '';
  router.stderr!.on('data', (c: Buffer) => (stderr += c.toString()));
  const url = await new Promise<string>((resolve, reject) => {
    let out = '';
    const timer = setTimeout(() => reject(new Error(`router did not start:\n${stderr}`)), 30_000);
    router.stdout!.on('data', (c: Buffer) => {
      out += c.toString();
      const m = / serving (http:\/\/\S+)/.exec(out);
      if (m) {
        clearTimeout(timer);
        resolve(m[1]!);
      }
    });
    router.on('exit', (code) => reject(new Error(`router exited (${code}):\n${stderr}`)));
  });

  // Every view has --help.
  for (const cmd of [['fleet', 'ls'], ['admissions', 'ls'], ['earnings'], ['admissions', 'request']]) {
    const { stdout } = await edgeMesh([...cmd, '--help']);
    assert.match(stdout, /--router <url>/, cmd.join(' '));
  }

  // Without a credential the router refuses, and the CLI says so and how to fix it.
  const noKey = await refused(['fleet', 'ls', '--router', url], { MESH_API_KEY: '' });
  assert.notEqual(noKey.code, 0);
  assert.match(noKey.stderr, /MESH_UNAUTHORIZED/);
  assert.match(noKey.stderr, /--api-key-file/);

  // A device asks to join with an escape sequence in its name (it would clear the operator's screen).
  const device = generateIdentity('agent');
  const evilName = '\u001b[2J\u001b[Hroot\u202eevil';
  const { stdout: asked } = await edgeMesh([
    'admissions',
    'request',
    '--router',
    url,
    '--key',
    await keyFileFor(t, device),
    '--name',
    evilName,
  ]);
  assert.deepEqual(JSON.parse(asked), { id: device.id, role: 'agent', state: 'pending' });

  // fleet ls: a table with the agent, and the same as JSON; the key from a file or from MESH_API_KEY.
  const deadline = Date.now() + 20_000;
  let fleet = '';
  while (Date.now() < deadline) {
    fleet = (await edgeMesh(['fleet', 'ls', '--router', url, '--api-key-file', viewerFile])).stdout;
    if (fleet.includes(agent.id)) break;
    await new Promise((r) => setTimeout(r, 300));
  }
  assert.match(fleet, /^AGENT +STATE +VERSION +HARDWARE +MODELS/);
  assert.match(fleet, new RegExp(`${agent.id} +up .*kws@1`));
  const fleetJson = JSON.parse((await edgeMesh(['fleet', 'ls', '--router', url, '--json'], { MESH_API_KEY: viewer.key })).stdout) as {
    agents: { id: string; models: { name: string }[] }[];
  };
  assert.ok(fleetJson.agents.find((a) => a.id === agent.id)?.models.some((m) => m.name === 'kws'));

  // admissions ls: the pending request, its name shown with the control characters spelled out.
  const listed = (await edgeMesh(['admissions', 'ls', '--router', url], { MESH_API_KEY: viewer.key })).stdout;
  assert.ok(!listed.includes('\u001b') && !listed.includes('\u202e'), listed);
  assert.match(listed, new RegExp(`pending +${device.id} +agent +\\\\u\\{1b\\}\\[2J\\\\u\\{1b\\}\\[Hroot\\\\u\\{202e\\}evil`));
  assert.match(listed, new RegExp(`seen +${agent.id}`));

  // Admitted through the router's admin key (what the console's Admit button calls), it shows as admitted.
  const admitted = await fetch(`${url}/v1/admissions/admit`, {
    method: 'POST',
    headers: { authorization: `Bearer ${admin.key}`, 'content-type': 'application/json' },
    body: JSON.stringify({ id: device.id }),
  });
  assert.equal(admitted.status, 200, await admitted.clone().text());
  const after = JSON.parse((await edgeMesh(['admissions', 'ls', '--router', url, '--json'], { MESH_API_KEY: viewer.key })).stdout) as {
    admin: { operator: string };
    pending: unknown[];
    admitted: { id: string }[];
  };
  assert.equal(after.admin.operator, operator.id);
  assert.deepEqual(after.pending, []);
  assert.deepEqual(
    after.admitted.map((e) => e.id),
    [device.id],
  );
  // The broker really holds the admission: the device can now connect as an agent.
  const joined = await agentFor(t, { brokerUrl: broker.url, identity: device });
  assert.equal(joined.id, device.id);

  // earnings: one owner row for the unpaid agents, and a note that no chain is read.
  const earnings = await edgeMesh(['earnings', '--router', url], { MESH_API_KEY: viewer.key });
  assert.match(earnings.stdout, /^PAYOUT +AGENTS +REQUESTS +QUOTED-USD +SETTLED-USD\n\(none\) +\d+ +0 +0\.000000 +-/);
  assert.match(earnings.stderr, /reads no chain/);
  const earningsJson = JSON.parse((await edgeMesh(['earnings', '--router', url, '--json'], { MESH_API_KEY: viewer.key })).stdout) as {
    chain: boolean;
    owners: { agents: string[] }[];
  };
  assert.equal(earningsJson.chain, false);
  assert.ok(earningsJson.owners[0]!.agents.includes(agent.id));
});
