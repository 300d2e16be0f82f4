/**
 * Configuration of the long-running commands (cli/src/config.ts): every key of every role set by a file, by a
 * MESH_<ROLE>_* variable and by its flag, in that order of strength; `config check` naming every problem at once;
 * a broker run from a file; `--version` and the exit codes. The CLI runs as users run it, as a child process.
 */
import assert from 'node:assert/strict';
import { execFile, spawn } from 'node:child_process';
import { once } from 'node:events';
import { writeFile } from 'node:fs/promises';
import path from 'node:path';
import { describe, test } from 'node:test';
import { promisify } from 'node:util';
import { freePort } from '@edge-mesh/demo';
import mqtt from 'mqtt';
import { ROOT, tempDir } from './helpers.ts';

const BIN = path.join(ROOT, 'cli/bin/edge-mesh.mjs');
const ROLES = ['broker', 'agent', 'router', 'bridge', 'relay'] as const;

async function cli(args: string[], env: Record<string, string> = {}): Promise<{ code: number; stdout: string; stderr: string }> {
  try {
    const { stdout, stderr } = await promisify(execFile)(process.execPath, [BIN, ...args], {
      env: { ...process.env, ...env },
      timeout: 60_000,
    });
    return { code: 0, stdout, stderr };
  } catch (err) {
    const e = err as { code?: number; stdout?: string; stderr?: string };
    return { code: e.code ?? -1, stdout: e.stdout ?? '', stderr: e.stderr ?? '' };
  }
}

interface Property {
  type?: string;
  enum?: string[];
  minimum?: number;
  default?: unknown;
  'x-flag': string;
  'x-env': string;
}

/** A value for each key that differs from its default and that its flag accepts, as the file, env and flag give it. */
function sample(
  role: string,
  key: string,
  p: Property,
): { file: unknown; env: string; flags: string[]; expected: unknown; expectedEnv?: unknown } {
  // The options whose flags parse with their own rules.
  const custom: Record<string, { text: string; expected: unknown }> =
    role === 'bridge'
      ? { udpPort: { text: '5999', expected: 5999 }, models: { text: 'kws,vad', expected: ['kws', 'vad'] } }
      : role === 'router'
        ? { httpTrustProxy: { text: '10.0.0.2,10.1.0.0/16', expected: ['10.0.0.2', '10.1.0.0/16'] } }
        : role === 'agent'
          ? { confirmations: { text: 'safe', expected: 'safe' } }
          : {};
  if (p.type === 'boolean') {
    const value = p.default !== true;
    return { file: value, env: String(value), flags: [p['x-flag']], expected: value };
  }
  if (p.type === 'array') {
    return { file: ['a1', 'a2'], env: 'a1', flags: [p['x-flag'], 'a1', p['x-flag'], 'a2'], expected: ['a1', 'a2'], expectedEnv: ['a1'] };
  }
  const text =
    custom[key]?.text ??
    (p.enum
      ? p.enum.find((c) => c !== p.default)!
      : p.type === 'integer'
        ? String((p.minimum ?? 0) + 7)
        : p.type === 'number'
          ? '2.5'
          : `v-${key}`);
  const expected = custom[key]?.expected ?? (p.type === 'integer' || p.type === 'number' ? Number(text) : text);
  return { file: p.type === 'integer' || p.type === 'number' ? Number(text) : text, env: text, flags: [p['x-flag'], text], expected };
}

describe('edge-mesh configuration', { timeout: 240_000 }, () => {
  for (const role of ROLES) {
    test(`${role}: every key set by a file, by its MESH_${role.toUpperCase()}_* variable and by its flag`, async (t) => {
      const dir = await tempDir(t);
      const schema = JSON.parse((await cli(['config', 'schema', role])).stdout) as { properties: Record<string, Property> };
      const keys = Object.keys(schema.properties).filter((k) => k !== '$schema');
      assert.ok(keys.length >= 5, `${role} has settings: ${keys.join(', ')}`);
      const samples = Object.fromEntries(keys.map((k) => [k, sample(role, k, schema.properties[k]!)]));

      const file = path.join(dir, `${role}.json`);
      await writeFile(file, JSON.stringify(Object.fromEntries(keys.map((k) => [k, samples[k]!.file]))));
      assert.equal((await cli(['config', 'check', role, file])).code, 0);
      const env = Object.fromEntries(keys.map((k) => [schema.properties[k]!['x-env'], samples[k]!.env]));
      const flags = keys.flatMap((k) => samples[k]!.flags);

      const show = async (args: string[], vars: Record<string, string> = {}) => {
        const r = await cli(['config', 'show', role, ...args], vars);
        assert.equal(r.code, 0, r.stderr);
        return JSON.parse(r.stdout.trim().split('\n').at(-1)!) as Record<string, { value: unknown; source: string }>;
      };
      const byFile = await show(['--config', file]);
      const byEnv = await show([], env);
      const byFlag = await show(flags);
      for (const k of keys) {
        const s = samples[k]!;
        assert.deepEqual(byFile[k], { value: s.expected, source: 'config' }, `${role} ${k} by file`);
        assert.deepEqual(byEnv[k], { value: s.expectedEnv ?? s.expected, source: 'env' }, `${role} ${k} by env`);
        assert.deepEqual(byFlag[k], { value: s.expected, source: 'cli' }, `${role} ${k} by flag`);
      }

      // The order of strength: flag over env over file.
      const key = keys.find((k) => schema.properties[k]!.type === 'integer')!;
      const p = schema.properties[key]!;
      const base = (p.minimum ?? 0) + 1;
      await writeFile(file, JSON.stringify({ ...Object.fromEntries(keys.map((k) => [k, samples[k]!.file])), [key]: base }));
      assert.deepEqual((await show(['--config', file]))[key], { value: base, source: 'config' });
      assert.deepEqual((await show(['--config', file], { [p['x-env']]: String(base + 1) }))[key], { value: base + 1, source: 'env' });
      assert.deepEqual((await show(['--config', file, p['x-flag'], String(base + 2)], { [p['x-env']]: String(base + 1) }))[key], {
        value: base + 2,
        source: 'cli',
      });
    });
  }

  test('config check names every bad key and value at once and exits 78', async (t) => {
    const dir = await tempDir(t);
    const file = path.join(dir, 'agent.json');
    await writeFile(
      file,
      JSON.stringify({
        models: '/m',
        workers: 'two',
        bogus: 1,
        logLevel: 'loud',
        serveUnpaid: 'yes',
        queueLimit: -3,
        heartbeatMs: 500,
        confirmations: 'soon',
      }),
    );
    const r = await cli(['config', 'check', 'agent', file]);
    assert.equal(r.code, 78, r.stderr);
    assert.match(r.stderr, /MESH_CONFIG: .*6 problems/);
    for (const what of [
      /confirmations must be a number of blocks \(0 or more\), safe or finalized/,
      /workers must be a positive integer/,
      /unknown key "bogus"/,
      /logLevel must be one of/,
      /serveUnpaid must be true or false/,
    ]) {
      assert.match(r.stderr, what);
    }
    assert.doesNotMatch(r.stderr, /heartbeatMs/, 'a valid key is not a problem');
    // Not JSON, and a command started with a bad file refuses to start with the same code.
    await writeFile(file, '{ models: ');
    assert.equal((await cli(['config', 'check', 'agent', file])).code, 78);
    const started = await cli(['agent', '--config', file]);
    assert.equal(started.code, 78);
    assert.match(started.stderr, /MESH_CONFIG: .* is not JSON/);
    // A bad variable too.
    const badEnv = await cli(['config', 'show', 'agent', '--models', '/m'], { MESH_AGENT_WORKERS: 'many' });
    assert.equal(badEnv.code, 78);
    assert.match(badEnv.stderr, /MESH_AGENT_WORKERS: workers must be a positive integer/);
  });

  test('a required option may come from the file; without it the usage error exits 64', async (t) => {
    const dir = await tempDir(t);
    const missing = await cli(['agent']);
    assert.equal(missing.code, 64);
    assert.match(missing.stderr, /required option '--models <dir>' not specified/);
    const file = path.join(dir, 'agent.json');
    await writeFile(file, JSON.stringify({ models: dir }));
    const shown = JSON.parse((await cli(['config', 'show', 'agent', '--config', file])).stdout);
    assert.deepEqual(shown.models, { value: dir, source: 'config' });
  });

  test('--engine nats makes QoS 0 and an unretained status the defaults, --engine rabbitmq QoS 0 subscriptions; a flag, a variable or the file still wins', async (t) => {
    const dir = await tempDir(t);
    const show = async (role: string, args: string[], vars: Record<string, string> = {}) => {
      const r = await cli(['config', 'show', role, ...args], vars);
      assert.equal(r.code, 0, r.stderr);
      const o = JSON.parse(r.stdout) as Record<string, { value: unknown; source: string }>;
      return { sub: o.subscriptionQos, pub: o.publishQos, retain: o.retainStatus };
    };
    const agent = ['--models', dir];
    const engine = (value: unknown) => ({ value, source: 'engine' });
    assert.deepEqual(await show('agent', agent), {
      sub: { value: '1', source: 'default' },
      pub: { value: '1', source: 'default' },
      retain: { value: true, source: 'default' },
    });
    assert.deepEqual(await show('agent', [...agent, '--engine', 'nats']), { sub: engine('0'), pub: engine('0'), retain: engine(false) });
    assert.deepEqual(await show('agent', [...agent, '--engine', 'mosquitto']), await show('agent', agent));
    // RabbitMQ: QoS 0 subscriptions only (a QoS 1 one is a durable queue that pins the client id to its node).
    assert.deepEqual(await show('agent', [...agent, '--engine', 'rabbitmq']), {
      sub: engine('0'),
      pub: { value: '1', source: 'default' },
      retain: { value: true, source: 'default' },
    });
    // The engine may come from a variable or the file; a setting given any way wins over the engine's.
    assert.deepEqual(await show('agent', agent, { MESH_AGENT_ENGINE: 'nats', MESH_AGENT_PUBLISH_QOS: '1' }), {
      sub: engine('0'),
      pub: { value: '1', source: 'env' },
      retain: engine(false),
    });
    const file = path.join(dir, 'agent.json');
    await writeFile(file, JSON.stringify({ engine: 'nats', retainStatus: true }));
    assert.deepEqual(await show('agent', ['--config', file, '--models', dir, '--subscription-qos', '1']), {
      sub: { value: '1', source: 'cli' },
      pub: engine('0'),
      retain: { value: true, source: 'config' },
    });
    // The router has no status to retain: only the QoS settings.
    assert.deepEqual(await show('router', ['--engine', 'nats']), { sub: engine('0'), pub: engine('0'), retain: undefined });
    const bad = await cli(['agent', ...agent, '--engine', 'kafka']);
    assert.equal(bad.code, 64);
    assert.match(bad.stderr, /Allowed choices are mesh, mosquitto, rabbitmq, nats/);
  });

  test('a broker runs from its configuration file', async (t) => {
    const dir = await tempDir(t);
    const port = await freePort();
    const file = path.join(dir, 'broker.json');
    await writeFile(file, JSON.stringify({ port, host: '127.0.0.1', insecure: true, data: path.join(dir, 'broker'), logLevel: 'warn' }));
    const broker = spawn(process.execPath, [BIN, 'broker', '--config', file], { stdio: ['ignore', 'pipe', 'pipe'] });
    t.after(() => {
      if (broker.exitCode === null) broker.kill('SIGKILL');
    });
    let err = '';
    broker.stderr.on('data', (d: Buffer) => (err += d.toString()));
    // Connect until it listens on the port its file names (or it exits).
    let connected = false;
    const until = Date.now() + 30_000;
    while (!connected && broker.exitCode === null && Date.now() < until) {
      const c = await mqtt.connectAsync(`mqtt://127.0.0.1:${port}`, { reconnectPeriod: 0, connectTimeout: 1_000 }).catch(() => undefined);
      if (c) {
        connected = true;
        await c.endAsync();
      } else await new Promise((r) => setTimeout(r, 100));
    }
    assert.ok(connected, `the broker listens on ${port}: ${err}`);
    broker.kill('SIGTERM');
    await once(broker, 'exit');
  });

  test('--version prints the package version; usage errors exit 64', async () => {
    const v = await cli(['--version']);
    assert.equal(v.code, 0);
    assert.match(v.stdout.trim(), /^\d+\.\d+\.\d+/);
    assert.equal((await cli(['frobnicate'])).code, 64);
    assert.equal((await cli(['broker', '--port', 'many'])).code, 64);
    assert.equal((await cli(['--help'])).code, 0);
  });
});
