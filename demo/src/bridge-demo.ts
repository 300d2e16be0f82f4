/**
 * The firmware bridge inside `edge-mesh up`: a bridge (its own `bridge.key`, admitted by the local
 * operator) on a free UDP port, with one simulated device provisioned in memory. The device is a
 * separate process (`edge-mesh bridge sim-device`, hidden) that speaks the frame protocol over UDP:
 * HELLO, then wake-word requests as int16 windows with a scale, a few per second. Its key reaches
 * the child through the environment, never the command line.
 */
import { type ChildProcess, spawn } from 'node:child_process';
import path from 'node:path';
import { ensureKeyFile, round, summarize } from '@edge-mesh/client';
import { admit, type Identity } from '@edge-mesh/protocol';
import { connect, type Mesh } from '@edge-mesh/sdk';
import type { Logger } from 'pino';
import { sampleInputs } from './sample-inputs.ts';

export interface BridgeDemoSummary {
  devices: number;
  /** Requests the bridge forwarded for its device, and how they ended. */
  requests: number;
  ok: number;
  errors: number;
  retransmits: number;
  /** Bridge-side latency of a device request (frame in → reply out), ms. */
  p50_ms: number | null;
  /** What the device process itself counted (sent, answered, device-side p50). */
  device: { sent: number; ok: number; errors: number; p50_ms: number | null } | undefined;
}

export interface BridgeDemo {
  readonly bridgeId: string;
  stop(): Promise<void>;
  summary(): BridgeDemoSummary;
}

/** The edge-mesh command of this checkout (the demo runs inside the workspace, beside the cli package). */
const CLI_BIN = path.resolve(import.meta.dirname, '..', '..', 'cli', 'bin', 'edge-mesh.mjs');

export async function startBridgeDemo(options: {
  brokerUrl: string;
  operator: Identity;
  admit: (record: ReturnType<typeof admit>) => Promise<unknown>;
  dataDir: string;
  logger: Logger;
  print: (line: string) => void;
  ratePerS?: number;
}): Promise<BridgeDemo> {
  const { Bridge, DeviceRegistry, listenUdp } = await import('@edge-mesh/firmware-bridge');
  const identity = await ensureKeyFile(path.join(options.dataDir, 'keys', 'bridge.key'), 'bridge', { warn: (m) => options.logger.warn(m) });
  await options.admit(admit(options.operator, identity));
  const mesh: Mesh = await connect({ brokerUrl: options.brokerUrl, identity, logger: options.logger });
  const registry = DeviceRegistry.inMemory();
  const device = await registry.provision({ name: 'sim-device-1' });
  const latencies: number[] = [];
  const bridge = new Bridge({ mesh, registry, models: ['kws'], logger: options.logger });
  bridge.on('request', (r: { latencyMs: number }) => latencies.push(r.latencyMs));
  const udp = await listenUdp(bridge, { port: 0, host: '127.0.0.1' });
  let deviceReport: BridgeDemoSummary['device'];
  const child: ChildProcess = spawn(
    process.execPath,
    [
      CLI_BIN,
      'bridge',
      'sim-device',
      '--port',
      String(udp.port),
      '--device-id',
      String(device.deviceId),
      '--rate',
      String(options.ratePerS ?? 5),
    ],
    { stdio: ['ignore', 'pipe', 'inherit'], env: { ...process.env, FB_DEVICE_KEY: device.key } },
  );
  let out = '';
  child.stdout!.on('data', (c: Buffer) => (out += c.toString()));
  const exited = new Promise<void>((resolve) => child.once('exit', () => resolve()));
  options.print(
    `firmware bridge ${identity.id.slice(0, 14)}… on udp://127.0.0.1:${udp.port}, serving simulated device ${device.longId} (a separate process)`,
  );
  return {
    bridgeId: identity.id,
    async stop() {
      if (child.exitCode === null) child.kill('SIGTERM');
      await Promise.race([exited, new Promise((r) => setTimeout(r, 3_000))]);
      if (child.exitCode === null) child.kill('SIGKILL');
      const last = out.trim().split('\n').at(-1);
      try {
        deviceReport = last ? (JSON.parse(last) as BridgeDemoSummary['device']) : undefined;
      } catch {
        deviceReport = undefined;
      }
      await udp.close();
      await bridge.close();
      await mesh.close();
      await registry.close();
    },
    summary() {
      const s = latencies.length ? summarize(latencies) : undefined;
      return {
        devices: registry.list().length,
        requests: bridge.stats.requests,
        ok: bridge.stats.ok,
        errors: bridge.stats.errors,
        retransmits: bridge.stats.retransmits,
        p50_ms: s ? round(s.p50) : null,
        device: deviceReport,
      };
    },
  };
}

/** The simulated device's loop (run by the hidden `edge-mesh bridge sim-device`): prints one JSON summary on SIGTERM. */
export async function runSimDevice(options: {
  host: string;
  port: number;
  deviceId: number;
  key: string;
  ratePerS: number;
}): Promise<void> {
  const { FrameType, int16Tensor, K, udpDevice } = await import('@edge-mesh/firmware-bridge');
  const { device, close } = await udpDevice({
    deviceId: options.deviceId,
    key: Buffer.from(options.key, 'hex'),
    epoch: 1,
    host: options.host,
    port: options.port,
  });
  let sent = 0;
  let ok = 0;
  let errors = 0;
  const latencies: number[] = [];
  let stopping = false;
  const stopped = new Promise<void>((resolve) => {
    process.once('SIGTERM', () => resolve());
    process.once('SIGINT', () => resolve());
  }).then(() => {
    stopping = true;
  });
  await device.hello({ fw: 'sim-device 1.0', keepaliveS: 30 });
  const modelId = device.models.get('kws') ?? 1;
  let seed = 1;
  while (!stopping) {
    // A wake-word feature window quantised to int16 with a per-window scale, as a sensor would send it.
    const features = sampleInputs('kws', seed++)['onnx::Flatten_0']!.data as Float32Array;
    let peak = 1e-9;
    for (const v of features) peak = Math.max(peak, Math.abs(v));
    const scale = Math.fround(peak / 32767);
    const samples = Int16Array.from(features, (v) => Math.round(v / scale));
    const started = performance.now();
    sent++;
    try {
      const reply = await device.infer(modelId, int16Tensor(samples), {
        scale,
        shape: [1, 25, 96],
        deadlineMs: 500,
        timeoutMs: 500,
        tries: 3,
      });
      if (reply.type === FrameType.INFER_RESP && reply.body instanceof Map && reply.body.has(K.inferResp.label)) {
        ok++;
        latencies.push(performance.now() - started);
      } else errors++;
    } catch {
      errors++;
    }
    await Promise.race([stopped, new Promise((r) => setTimeout(r, 1000 / options.ratePerS))]);
  }
  await close();
  const s = latencies.length ? summarize(latencies) : undefined;
  process.stdout.write(`${JSON.stringify({ sent, ok, errors, p50_ms: s ? round(s.p50) : null })}\n`);
}
