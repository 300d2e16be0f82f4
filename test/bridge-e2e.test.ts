/**
 * The firmware bridge end to end: an authenticated broker on port 0, a real ONNX agent, the bridge
 * as an admitted `bridge` client, and the compiled C reference client talking to it over UDP and
 * over a real pseudo-terminal pair made by socat. Results must equal a direct mesh request.
 * Needs gcc (or cc), libsodium-dev and socat; each test says so and skips when one is missing.
 */
import assert from 'node:assert/strict';
import { execFile, spawn, spawnSync } from 'node:child_process';
import { existsSync, mkdtempSync, rmSync } from 'node:fs';
import { writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { describe, type TestContext, test } from 'node:test';
import { promisify } from 'node:util';
import { mulberry32, openMeshConnection } from '@edge-mesh/client';
import {
  attachSerial,
  Bridge,
  type DeviceRecord,
  DeviceRegistry,
  encodeSerialFrame,
  FrameType,
  int16Tensor,
  K,
  listenUdp,
  SerialDeframer,
  SimDevice,
  udpDevice,
  Want,
} from '@edge-mesh/firmware-bridge';
import { admit, decodeCbor, generateIdentity, topics } from '@edge-mesh/protocol';
import type { Mesh } from '@edge-mesh/sdk';
import { SerialPortMock } from 'serialport';
import { agentFor, brokerFor, meshFor, ROOT, tempDir, waitFor } from './helpers.ts';

const run = promisify(execFile);
const C_DIR = path.join(ROOT, 'firmware-bridge/c');
const KWS_INPUT_SHAPE = [1, 25, 96];
const SCALE = 1 / 4096;

const have = (cmd: string, args: string[]) => spawnSync(cmd, args, { stdio: 'ignore' }).status === 0;
const compiler = have('gcc', ['--version']) ? 'gcc' : have('cc', ['--version']) ? 'cc' : undefined;
const sodium = existsSync('/usr/include/sodium.h') || existsSync('/usr/local/include/sodium.h');
const socat = have('socat', ['-V']);
const NEED_C = !compiler
  ? 'no C compiler (gcc or cc) on this machine: install gcc to build the C reference client'
  : !sodium
    ? 'libsodium-dev is not installed (apt-get install -y libsodium-dev; .ci/run does this)'
    : false;
const NEED_PTY = NEED_C || (!socat ? 'socat is not installed (apt-get install -y socat; .ci/run does this)' : false);

let built: Promise<string> | undefined;
/** Builds the C client once per test process into a temp folder (removed at exit); resolves to the folder. */
function buildC(_t: TestContext): Promise<string> {
  built ??= (async () => {
    const out = mkdtempSync(path.join(os.tmpdir(), 'edge-mesh-fbc-'));
    process.on('exit', () => rmSync(out, { recursive: true, force: true }));
    // The same commands as firmware-bridge/c/Makefile, without needing make.
    const src = ['fb_client.c', 'fb_cbor.c', 'fb_link.c', 'fb_crypto_sodium.c'].map((f) => path.join(C_DIR, f));
    const flags = ['-std=c99', '-Wall', '-Wextra', '-Wpedantic', '-Werror', '-O2'];
    await Promise.all([
      run(compiler!, [...flags, '-o', path.join(out, 'fb_host'), ...src, path.join(C_DIR, 'host/fb_host.c'), '-lsodium'], {
        timeout: 120_000,
      }),
      run(compiler!, [...flags, '-o', path.join(out, 'fb_vectors'), ...src, path.join(C_DIR, 'test/fb_vectors.c'), '-lsodium'], {
        timeout: 120_000,
      }),
      run(compiler!, [...flags, '-o', path.join(out, 'fb_silence'), ...src, path.join(C_DIR, 'test/fb_silence.c'), '-lsodium'], {
        timeout: 120_000,
      }),
    ]);
    return out;
  })();
  return built;
}

function window(seed: number): Int16Array {
  const rng = mulberry32(seed);
  return Int16Array.from({ length: 2400 }, () => Math.round((rng() * 2 - 1) * 8000));
}

function asFloat(samples: Int16Array, scale: number): Float32Array {
  const s = Math.fround(scale);
  return Float32Array.from(samples, (v) => v * s);
}

/** Broker (authenticated), agent, the bridge's mesh client, a registry with one device, the bridge. */
async function meshWithBridge(t: TestContext) {
  const operator = generateIdentity('operator');
  const broker = await brokerFor(t, {
    auth: { trustedOperators: [{ id: operator.id, publicKey: operator.publicKey }], dataDir: await tempDir(t) },
  });
  const agentId = generateIdentity('agent');
  const bridgeId = generateIdentity('bridge');
  const appId = generateIdentity('app');
  for (const who of [agentId, bridgeId, appId]) await broker.admit(admit(operator, who));
  await agentFor(t, { brokerUrl: broker.url, identity: agentId });
  const mesh = await meshFor(t, { brokerUrl: broker.url, identity: bridgeId });
  await mesh.waitForModel('kws');
  const registry = await DeviceRegistry.open(await tempDir(t, 'edge-mesh-reg-'));
  t.after(() => registry.close());
  const device = await registry.provision({ name: 'test-sensor' });
  const bridge = new Bridge({ mesh, registry, models: ['kws', 'ocr-cls'], availabilityTickMs: 50 });
  t.after(() => bridge.close());
  return { broker, mesh, registry, device, bridge, appId };
}

async function direct(mesh: Mesh, samples: Int16Array): Promise<string> {
  const result = await mesh.infer(
    'kws',
    { 'onnx::Flatten_0': { dtype: 'float32', shape: KWS_INPUT_SHAPE, data: asFloat(samples, SCALE) } },
    { deadlineMs: 5_000 },
  );
  const out = Object.values(result.outputs)[0]!.data as Float32Array;
  return Buffer.from(out.buffer, out.byteOffset, out.byteLength).toString('hex');
}

interface CLine {
  what: string;
  ok: boolean;
  output_hex?: string;
  label?: number;
  epoch?: number;
  seq?: number;
  rc?: number;
  error?: number;
  payload_hex?: string;
}

async function runC(t: TestContext, device: DeviceRecord, link: string[], samples: Int16Array, extra: string[] = []): Promise<CLine[]> {
  const bin = path.join(await buildC(t), 'fb_host');
  const dir = await tempDir(t, 'edge-mesh-fbdev-');
  const input = path.join(dir, 'window.i16');
  await writeFile(input, Buffer.from(samples.buffer, samples.byteOffset, samples.byteLength));
  const args = [
    ...link,
    '--device-id',
    String(device.deviceId),
    '--key',
    device.key,
    '--epoch-file',
    path.join(dir, 'epoch'),
    '--model',
    'kws',
    '--input',
    input,
    '--scale',
    String(SCALE),
    '--shape',
    KWS_INPUT_SHAPE.join(','),
    '--deadline',
    '5000',
    '--raw',
    ...extra,
  ];
  const { stdout } = await run(bin, args, { timeout: 60_000 });
  return stdout
    .trim()
    .split('\n')
    .map((l) => JSON.parse(l) as CLine);
}

describe('C reference client against the bridge', () => {
  test('golden vectors: the C client seals, frames and opens byte for byte like the TypeScript side', { skip: NEED_C }, async (t) => {
    const bin = path.join(await buildC(t), 'fb_vectors');
    const golden = (await import('../firmware-bridge/vectors/golden.json', { with: { type: 'json' } })).default as {
      vectors: Record<string, string | number>[];
    };
    const lines = golden.vectors
      .map((v) => [v.name, v.key, v.type, v.deviceId, v.epoch, v.seq, v.direction, v.body || '-', v.packet, v.serialFrame].join(' '))
      .join('\n');
    const child = spawn(bin, [], { stdio: ['pipe', 'pipe', 'inherit'] });
    let out = '';
    child.stdout.on('data', (c: Buffer) => (out += c.toString()));
    child.stdin.end(`${lines}\n`);
    const code = await new Promise<number | null>((r) => child.on('exit', r));
    assert.equal(code, 0, out);
    assert.match(out, new RegExp(`${golden.vectors.length} of ${golden.vectors.length} vectors passed`));
  });

  test('a bridge that never answers: the C client skips its sequence past any floor first, then starts new epochs ever more rarely', {
    skip: NEED_C,
  }, async (t) => {
    const bin = path.join(await buildC(t), 'fb_silence');
    const polls = 3_600;
    const lines = (await run(bin, [String(polls)])).stdout.trim().split('\n');
    const stored = Number(lines.pop()!.replace('stored ', ''));
    const frames = lines.map((l) => l.split(' ').map(Number) as [number, number]);
    assert.equal(frames.length, polls, 'one try per exchange in this run');
    // Three silent exchanges: the same epoch, the sequence 128 further on (past a floor the bridge wrote ahead of use).
    assert.deepEqual(frames.slice(0, 4), [
      [1, 1],
      [1, 2],
      [1, 3],
      [1, 132],
    ]);
    // New epochs after 6 silent exchanges, then after twice as many each time, at most 1,024 apart.
    const starts = frames.flatMap(([epoch], i) => (i > 0 && epoch !== frames[i - 1]![0] ? [i] : []));
    assert.deepEqual(starts, [6, 12, 24, 48, 96, 192, 384, 768, 1_536, 2_560, 3_584]);
    assert.equal(stored, 1 + starts.length, 'the boot epoch and one write per new epoch');
  });

  test('over UDP: results equal a direct mesh request, a retransmit gets the same reply and runs once', { skip: NEED_C }, async (t) => {
    const { mesh, device, bridge } = await meshWithBridge(t);
    const udp = await listenUdp(bridge, { port: 0 });
    t.after(() => udp.close());
    const samples = window(7);
    const expected = await direct(mesh, samples);
    const lines = await runC(t, device, ['--udp', `127.0.0.1:${udp.port}`], samples, ['--count', '2', '--retransmit']);
    assert.deepEqual(
      lines.map((l) => [l.what, l.ok]),
      [
        ['hello', true],
        ['infer', true],
        ['retransmit', true],
        ['infer', true],
        ['retransmit', true],
      ],
    );
    for (const l of lines.slice(1)) assert.equal(l.output_hex, expected, `${l.what} output equals the direct mesh request`);
    assert.equal(bridge.stats.requests, 2, 'each request ran once');
    assert.equal(bridge.stats.retransmits, 2, 'each retransmit got the cached reply');
    assert.equal(bridge.availability(device.deviceId), 'online');
  });

  test('over a real pseudo-terminal pair (socat): results equal a direct mesh request', { skip: NEED_PTY }, async (t) => {
    const { mesh, device, bridge } = await meshWithBridge(t);
    const dir = await tempDir(t, 'edge-mesh-pty-');
    const bridgeEnd = path.join(dir, 'bridge');
    const deviceEnd = path.join(dir, 'device');
    const pair = spawn('socat', [`pty,raw,echo=0,link=${bridgeEnd}`, `pty,raw,echo=0,link=${deviceEnd}`], { stdio: 'ignore' });
    t.after(() => {
      pair.kill('SIGTERM');
    });
    await waitFor(() => existsSync(bridgeEnd) && existsSync(deviceEnd), 5_000, 'socat pty pair');
    const { openSerial } = await import('@edge-mesh/firmware-bridge');
    const serial = await openSerial(bridge, bridgeEnd);
    t.after(() => serial.close());
    const samples = window(11);
    const expected = await direct(mesh, samples);
    // Line noise before the first frame: the deframer must drop it and resync.
    await writeFile(deviceEnd, Buffer.from([0x13, 0x37, 0xff, 0x00, 0x42, 0x00]));
    const lines = await runC(t, device, ['--serial', deviceEnd], samples, ['--count', '2', '--retransmit']);
    assert.deepEqual(
      lines.map((l) => [l.what, l.ok]),
      [
        ['hello', true],
        ['infer', true],
        ['retransmit', true],
        ['infer', true],
        ['retransmit', true],
      ],
    );
    for (const l of lines.slice(1)) assert.equal(l.output_hex, expected);
    assert.equal(bridge.stats.requests, 2);
    assert.ok(serial.counters.badCobs + serial.counters.badCrc >= 1, 'the noise was counted and dropped');
  });

  test('a rebooted C device (next epoch) is served; the old epoch is refused; a downlink waits for its poll', {
    skip: NEED_C,
  }, async (t) => {
    const { device, bridge } = await meshWithBridge(t);
    const udp = await listenUdp(bridge, { port: 0 });
    t.after(() => udp.close());
    const samples = window(3);
    const link = ['--udp', `127.0.0.1:${udp.port}`];
    const bin = path.join(await buildC(t), 'fb_host');
    const dir = await tempDir(t);
    const epochFile = path.join(dir, 'epoch');
    const input = path.join(dir, 'w.i16');
    await writeFile(input, Buffer.from(samples.buffer));
    const base = [
      ...link,
      '--device-id',
      String(device.deviceId),
      '--key',
      device.key,
      '--epoch-file',
      epochFile,
      '--model',
      'kws',
      '--input',
      input,
      '--scale',
      String(SCALE),
      '--shape',
      '1,25,96',
    ];
    const first = (await run(bin, base)).stdout
      .trim()
      .split('\n')
      .map((l) => JSON.parse(l) as CLine);
    const second = (await run(bin, base)).stdout
      .trim()
      .split('\n')
      .map((l) => JSON.parse(l) as CLine);
    assert.equal(first[1]!.ok, true);
    assert.equal(second[1]!.ok, true);
    assert.equal(second[0]!.epoch, first[0]!.epoch! + 1, 'each boot starts a new epoch');
    // Reset the stored epoch: the device now sends an epoch the bridge has passed, and gets no answer.
    await writeFile(epochFile, `${first[0]!.epoch! - 1}\n`);
    const dropped = bridge.stats.dropped['stale-epoch'];
    await assert.rejects(run(bin, [...base, '--timeout', '150']));
    assert.ok(bridge.stats.dropped['stale-epoch'] > dropped, 'stale epoch refused');
    // A downlink queued for the device is delivered as the reply to its next poll.
    await writeFile(epochFile, `${second[0]!.epoch! + 5}\n`);
    bridge.queueDownlink(device.deviceId, Buffer.from('cafe', 'hex'));
    const polled = (
      await run(bin, [...link, '--device-id', String(device.deviceId), '--key', device.key, '--epoch-file', epochFile, '--poll'])
    ).stdout
      .trim()
      .split('\n')
      .map((l) => JSON.parse(l) as CLine);
    assert.deepEqual(polled.at(-1), { what: 'poll', rc: 1, payload_hex: 'cafe' });
  });
});

describe('bridge on the mesh', () => {
  test('serial mock: split frames, noise and bit flips between frames; results equal a direct mesh request', async (t) => {
    const { mesh, device, bridge } = await meshWithBridge(t);
    const path_ = '/dev/fb-mock';
    SerialPortMock.binding.createPort(path_, { echo: false, record: true });
    const port = new SerialPortMock({ path: path_, baudRate: 115_200 });
    await new Promise<void>((r) => port.on('open', () => r()));
    const serial = attachSerial(bridge, port, path_);
    t.after(() => serial.close());
    const replies: Buffer[] = [];
    const deframer = new SerialDeframer((p) => replies.push(p), 8192);
    // What the bridge writes to the port arrives in the mock's recording.
    let seen = 0;
    const pump = setInterval(() => {
      const rec = port.port?.recording;
      if (rec && rec.byteLength > seen) {
        deframer.push(rec.subarray(seen));
        seen = rec.byteLength;
      }
    }, 5);
    t.after(() => clearInterval(pump));
    const dev = new SimDevice({
      deviceId: device.deviceId,
      key: Buffer.from(device.key, 'hex'),
      epoch: 1,
      send: (packet) => {
        const frame = encodeSerialFrame(packet);
        // Noise with a bit flip, then the frame split at an odd place.
        const noise = Buffer.from([0x55, 0x00, 0x12, 0x34, 0x00]);
        port.port!.emitData(noise);
        const cut = Math.floor(frame.length / 3);
        port.port!.emitData(frame.subarray(0, cut));
        setTimeout(() => port.port!.emitData(frame.subarray(cut)), 2);
      },
    });
    const feed = setInterval(() => {
      while (replies.length) dev.receive(replies.shift()!);
    }, 5);
    t.after(() => clearInterval(feed));
    const hello = await dev.hello();
    assert.equal(hello.type, FrameType.WELCOME);
    const samples = window(5);
    const reply = await dev.infer(dev.models.get('kws')!, int16Tensor(samples), {
      scale: SCALE,
      shape: KWS_INPUT_SHAPE,
      deadlineMs: 5_000,
      want: Want.RAW,
    });
    assert.equal(reply.type, FrameType.INFER_RESP);
    const out = (reply.body as Map<number, unknown>).get(K.inferResp.output) as { bytes: Uint8Array };
    assert.equal(Buffer.from(out.bytes).toString('hex'), await direct(mesh, samples));
    assert.ok(serial.counters.badCobs + serial.counters.badCrc >= 2, 'noise counted');
  });

  test('availability is published retained on the mesh: online, asleep after SLEEP, offline when the bridge closes', async (t) => {
    const { broker, device, bridge, appId } = await meshWithBridge(t);
    const udp = await listenUdp(bridge, { port: 0 });
    t.after(() => udp.close());
    const states: string[] = [];
    const watcher = openMeshConnection(broker.url, {
      identity: appId,
      onConnect: (c) => c.subscribe(topics.allDeviceAvailability(), { qos: 1 }),
    });
    t.after(() => watcher.close());
    watcher.client.on('message', (topic, payload) => {
      assert.equal(topic, topics.deviceAvailability(bridge.id, device.longId));
      states.push((decodeCbor(payload) as { state: string }).state);
    });
    await watcher.firstConnect;
    const { device: dev, close } = await udpDevice({
      deviceId: device.deviceId,
      key: Buffer.from(device.key, 'hex'),
      epoch: 1,
      host: '127.0.0.1',
      port: udp.port,
    });
    t.after(close);
    await dev.hello({ sleepPeriodS: 60 });
    await waitFor(() => states.includes('online'), 5_000, 'online');
    await dev.request(FrameType.SLEEP, new Map([[K.sleep.durationS, 0]]));
    await waitFor(() => states.includes('asleep'), 5_000, 'asleep');
    // Closing the bridge marks its devices offline (retained).
    await bridge.close();
    await waitFor(() => states.includes('offline'), 5_000, 'offline on close');
    assert.deepEqual(states, ['online', 'asleep', 'offline']);
  });
});
