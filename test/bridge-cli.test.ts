/** `edge-mesh bridge`: help on every subcommand, provision / list / revoke on a registry, and `bridge run` serving a device. */
import assert from 'node:assert/strict';
import { execFile, spawn } from 'node:child_process';
import path from 'node:path';
import { describe, test } from 'node:test';
import { promisify } from 'node:util';
import { FrameType, udpDevice } from '@edge-mesh/firmware-bridge';
import { brokerFor, ROOT, tempDir, waitFor } from './helpers.ts';

const run = promisify(execFile);
const BIN = path.join(ROOT, 'cli/bin/edge-mesh.mjs');
const edgeMesh = (args: string[]) => run(process.execPath, [BIN, ...args], { timeout: 60_000 });

describe('edge-mesh bridge', () => {
  test('every bridge subcommand has --help', async () => {
    for (const cmd of [['bridge'], ['bridge', 'run'], ['bridge', 'provision'], ['bridge', 'revoke'], ['bridge', 'list']]) {
      const { stdout } = await edgeMesh([...cmd, '--help']);
      assert.match(stdout, /Usage: edge-mesh bridge/, cmd.join(' '));
      assert.match(stdout, /Options:/, cmd.join(' '));
    }
  });

  test('provision prints what to flash, list hides keys, revoke marks the device; bridge run serves a device over UDP', async (t) => {
    const dir = await tempDir(t);
    const registry = path.join(dir, 'devices');
    const header = (await edgeMesh(['bridge', 'provision', '--registry', registry, '--name', 'porch'])).stdout;
    assert.match(header, /#define FB_DEVICE_ID 0x[0-9a-f]{8}u/);
    assert.match(header, /FB_DEVICE_KEY\[32\] = \{/);
    const dev = JSON.parse((await edgeMesh(['bridge', 'provision', '--registry', registry, '--json'])).stdout) as {
      device_id: number;
      long_id: string;
      key: string;
    };
    const listed = (await edgeMesh(['bridge', 'list', '--registry', registry])).stdout
      .trim()
      .split('\n')
      .map((l) => JSON.parse(l) as Record<string, unknown>);
    assert.equal(listed.length, 2);
    assert.ok(listed.every((d) => !('key' in d)) && !JSON.stringify(listed).includes(dev.key), 'no key in the listing');
    const porch = listed.find((d) => d.name === 'porch')!;
    await edgeMesh(['bridge', 'revoke', String(porch.long_id), '--registry', registry]);
    await assert.rejects(edgeMesh(['bridge', 'revoke', 'not-a-device', '--registry', registry]), /not a device id/);

    // `bridge run` on an open broker (no agent: the device gets a coded NO_AGENT error, which proves the round trip).
    const broker = await brokerFor(t);
    const child = spawn(process.execPath, [BIN, 'bridge', '--broker', broker.url, '--registry', registry, '--udp-port', '0'], {
      stdio: ['ignore', 'ignore', 'pipe'],
    });
    t.after(() => {
      if (child.exitCode === null) child.kill('SIGKILL');
    });
    let stderr = '';
    child.stderr!.on('data', (c: Buffer) => (stderr += c.toString()));
    await waitFor(() => /"msg":"bridge ready"/.test(stderr), 30_000, `bridge ready:\n${stderr}`);
    const port = Number(/"port":(\d+),"msg":"bridge listening on UDP"/.exec(stderr)![1]);
    const { device, close } = await udpDevice({
      deviceId: dev.device_id,
      key: Buffer.from(dev.key, 'hex'),
      epoch: 1,
      host: '127.0.0.1',
      port,
    });
    t.after(close);
    const welcome = await device.hello();
    assert.equal(welcome.type, FrameType.WELCOME);
    const reply = await device.infer(1, { tag: 77, bytes: Buffer.alloc(4800) }, { shape: [1, 25, 96], deadlineMs: 200 });
    assert.equal(reply.type, FrameType.ERROR);
    child.kill('SIGTERM');
    await new Promise((r) => child.once('exit', r));
    assert.match(stderr, /"msg":"bridge stopping"/);
  });
});
