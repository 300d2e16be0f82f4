/**
 * The SDK as an app gets it: `npm pack` of the SDK and the workspace packages it depends on, installed
 * from the tarballs into a fresh folder outside the repository, then a plain `.mjs` file that imports
 * `@edge-mesh/sdk`, connects to a mesh this test starts (an authenticated broker and a real agent) with
 * an admitted app key, and gets an inference. The install must hold no native addon and stay small.
 */
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { readdir, stat, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { test } from 'node:test';
import { promisify } from 'node:util';
import { admit, encodeKeyFile, generateIdentity, tensorToJson } from '@edge-mesh/protocol';
import { agentFor, brokerFor, meshFor, ROOT, tempDir } from './helpers.ts';

const run = promisify(execFile);
/** The acceptance limit for an app's node_modules, in bytes (file sizes summed). */
const MAX_INSTALL_BYTES = 15_000_000;

async function walk(dir: string): Promise<{ bytes: number; addons: string[] }> {
  let bytes = 0;
  const addons: string[] = [];
  for (const entry of await readdir(dir, { withFileTypes: true })) {
    const full = path.join(dir, entry.name);
    if (entry.isDirectory()) {
      const sub = await walk(full);
      bytes += sub.bytes;
      addons.push(...sub.addons);
    } else if (entry.isFile()) {
      bytes += (await stat(full)).size;
      if (entry.name.endsWith('.node')) addons.push(full);
    }
  }
  return { bytes, addons };
}

const APP = `import { readFile } from 'node:fs/promises';
import { connect, parseKeyFile } from '@edge-mesh/sdk';

const [brokerUrl, keyFile] = process.argv.slice(2);
const identity = parseKeyFile(await readFile(keyFile, 'utf8'));
const mesh = await connect({ brokerUrl, identity });
try {
  await mesh.waitForModel('kws', 10000);
  const name = mesh.models().find((m) => m.name === 'kws').inputs[0].name;
  const data = new Float32Array(25 * 96).map((_, i) => Math.sin(i / 7));
  const result = await mesh.infer('kws', { [name]: { dtype: 'float32', shape: [1, 25, 96], data } }, { deadlineMs: 5000 });
  const outputs = Object.fromEntries(Object.entries(result.outputs).map(([k, t]) => [k, { dtype: t.dtype, shape: t.shape, data: Array.from(t.data) }]));
  process.stdout.write(JSON.stringify({ agentId: result.agentId, outputs }) + '\\n');
} finally {
  await mesh.close();
}
`;

test('an app installs the SDK from its tarballs, with no native addon, under 15 MB, and gets an inference', async (t) => {
  const dir = await tempDir(t, 'edge-mesh-sdk-app-');
  const tarballs = path.join(dir, 'tarballs');
  const app = path.join(dir, 'app');
  await run('mkdir', ['-p', tarballs, app]);
  await run('npm', ['pack', '-w', 'protocol', '-w', 'client', '-w', 'sdk', '--pack-destination', tarballs, '--silent'], { cwd: ROOT });
  const packed = (await readdir(tarballs)).filter((f) => f.endsWith('.tgz')).map((f) => path.join(tarballs, f));
  assert.equal(packed.length, 3, packed.join(', '));
  await writeFile(path.join(app, 'package.json'), JSON.stringify({ name: 'an-iot-app', version: '1.0.0', private: true, type: 'module' }));
  // The app folder lies outside the repository: nothing resolves from the workspace's node_modules.
  assert.ok(!app.startsWith(ROOT));
  await run('npm', ['install', '--no-audit', '--no-fund', '--silent', ...packed], { cwd: app, timeout: 180_000 });
  const installed = await walk(path.join(app, 'node_modules'));
  t.diagnostic(`node_modules: ${(installed.bytes / 1e6).toFixed(2)} MB, addons: ${installed.addons.length}`);
  assert.deepEqual(installed.addons, [], 'no native addon in an app that only sends requests');
  assert.ok(installed.bytes <= MAX_INSTALL_BYTES, `node_modules holds ${installed.bytes} bytes (limit ${MAX_INSTALL_BYTES})`);

  // A mesh as an operator runs it: an authenticated broker, an admitted agent and an admitted app key.
  const operator = generateIdentity('operator');
  const broker = await brokerFor(t, {
    auth: { trustedOperators: [{ id: operator.id, publicKey: operator.publicKey }], dataDir: await tempDir(t) },
  });
  const agentKey = generateIdentity('agent');
  const appKey = generateIdentity('app');
  const compareKey = generateIdentity('app');
  for (const who of [agentKey, appKey, compareKey]) await broker.admit(admit(operator, who));
  const agent = await agentFor(t, { brokerUrl: broker.url, identity: agentKey });
  const keyFile = path.join(app, 'app.key');
  await writeFile(keyFile, encodeKeyFile(appKey), { mode: 0o600 });
  await writeFile(path.join(app, 'infer.mjs'), APP);

  const { stdout } = await run(process.execPath, ['infer.mjs', broker.url, keyFile], { cwd: app, timeout: 60_000 });
  const answer = JSON.parse(stdout.trim()) as {
    agentId: string;
    outputs: Record<string, { dtype: string; shape: number[]; data: number[] }>;
  };
  assert.equal(answer.agentId, agent.id);

  // The same input through the workspace's SDK gives the same numbers: the installed SDK really ran the model.
  const inputName = agent.models.find((m) => m.name === 'kws')!.inputs[0]!.name;
  const data = new Float32Array(25 * 96).map((_, i) => Math.sin(i / 7));
  const direct = await meshFor(t, { brokerUrl: broker.url, identity: compareKey });
  await direct.waitForModel('kws');
  const expected = await direct.infer('kws', { [inputName]: { dtype: 'float32', shape: [1, 25, 96], data } }, { deadlineMs: 5_000 });
  const want = Object.fromEntries(Object.entries(expected.outputs).map(([k, v]) => [k, tensorToJson(v)]));
  assert.deepEqual(Object.keys(answer.outputs).sort(), Object.keys(want).sort());
  for (const [name, got] of Object.entries(answer.outputs)) {
    assert.deepEqual(got.shape, want[name]!.shape);
    assert.deepEqual(got.data, want[name]!.data, `output ${name}`);
  }
});
