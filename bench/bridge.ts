/**
 * `npm run bench -- bridge [--quick]`: the firmware bridge's throughput in authenticated frames and
 * the latency it adds to a wake-word inference.
 *
 * Processes: `edge-mesh broker` (authenticated), `edge-mesh agent --workers 1`, `edge-mesh bridge`
 * (UDP on loopback, its own admitted bridge key, a registry provisioned before it starts), and this
 * process as the load generator: simulated devices speaking the frame protocol over UDP, and an SDK
 * client (admitted app key) for the direct baseline.
 *
 * frames_per_s:  POLL frames from 8 devices, 64 outstanding in all, closed loop for D seconds. Each
 *                frame is verified (header, replay window, ChaCha20-Poly1305), decoded and answered
 *                with a sealed ACK; only answered frames count.
 * added_p50_ms:  p50 of kws through device → UDP → bridge → mesh → agent and back (sequential, the
 *                window sent as int16 with a scale) minus p50 of the same kws request sent directly
 *                with the SDK from this process (sequential), measured alternately in blocks.
 * infer_frames_per_s: INFER_REQ frames through the bridge to the agent at 16 outstanding (extra).
 */
import { mkdtempSync, rmSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { round, summarize } from '@edge-mesh/client';
import { ensureModelsFolder, sampleInputs } from '@edge-mesh/demo';
import { DeviceRegistry, FrameType, int16Tensor, type SimDevice, udpDevice } from '@edge-mesh/firmware-bridge';
import { connect } from '@edge-mesh/sdk';
import {
  admitted,
  type BenchContext,
  type BenchResult,
  CLI,
  CpuMeter,
  environment,
  MODELS_DIR,
  spawnProc,
  startAgentProc,
  startBrokerProc,
} from './lib.ts';

const DEVICES = 8;
const OUTSTANDING = 64;

async function closedLoop(
  devices: SimDevice[],
  outstanding: number,
  durationMs: number,
  send: (d: SimDevice) => Promise<unknown>,
): Promise<{ done: number; failed: number; ms: number }> {
  let done = 0;
  let failed = 0;
  const until = performance.now() + durationMs;
  const started = performance.now();
  const worker = async (i: number) => {
    const d = devices[i % devices.length]!;
    while (performance.now() < until) {
      try {
        await send(d);
        done++;
      } catch {
        failed++;
      }
    }
  };
  await Promise.all(Array.from({ length: outstanding }, (_, i) => worker(i)));
  return { done, failed, ms: performance.now() - started };
}

export async function run(ctx: BenchContext): Promise<BenchResult> {
  const quick = ctx.quick;
  const n = Number(ctx.args.n ?? (quick ? 600 : 4000));
  const durationMs = Number(ctx.args['duration-ms'] ?? (quick ? 4000 : 15000));
  await ensureModelsFolder(MODELS_DIR);

  const { proc: broker, url } = await startBrokerProc();
  const agentKey = await admitted(url, 'agent');
  const bridgeKey = await admitted(url, 'bridge');
  const appKey = await admitted(url, 'app');
  const agent = await startAgentProc({ url, keyFile: agentKey.keyFile, id: agentKey.identity.id, workers: 1 });

  const dir = mkdtempSync(path.join(os.tmpdir(), 'edge-mesh-bench-bridge-'));
  try {
    const registryDir = path.join(dir, 'devices');
    const registry = await DeviceRegistry.open(registryDir);
    const records = [];
    for (let i = 0; i < DEVICES; i++) records.push(await registry.provision({ name: `bench-${i}` }));
    await registry.close();

    const bridge = spawnProc('bridge', [
      CLI,
      'bridge',
      '--broker',
      url,
      '--key',
      bridgeKey.keyFile,
      '--registry',
      registryDir,
      '--udp-port',
      '0',
      '--models',
      'kws',
      '--log-level',
      'info',
    ]);
    const listening = await bridge.waitLine('stderr', (l) => l.includes('"msg":"bridge listening on UDP"'), 30_000, 'its UDP port');
    const port = (JSON.parse(listening) as { port: number }).port;
    await bridge.waitLine('stderr', (l) => l.includes('"msg":"bridge ready"'), 30_000, 'bridge ready');

    const devices: SimDevice[] = [];
    const closers: (() => Promise<void>)[] = [];
    for (const r of records) {
      const { device, close } = await udpDevice({
        deviceId: r.deviceId,
        key: Buffer.from(r.key, 'hex'),
        epoch: 1,
        host: '127.0.0.1',
        port,
      });
      devices.push(device);
      closers.push(close);
    }
    const mesh = await connect({ brokerUrl: url, identity: appKey.identity });
    try {
      await mesh.waitForModel('kws', 20_000);
      for (const d of devices) await d.hello();
      const device = devices[0]!;
      const modelId = device.models.get('kws')!;

      // The same window both ways: int16 with a scale on the device hop, its float32 value directly.
      const features = sampleInputs('kws', 1)['onnx::Flatten_0']!.data as Float32Array;
      let peak = 1e-9;
      for (const v of features) peak = Math.max(peak, Math.abs(v));
      const scale = Math.fround(peak / 32767);
      const samples = Int16Array.from(features, (v) => Math.round(v / scale));
      const asFloat = Float32Array.from(samples, (v) => v * scale);
      const viaBridge = async () => {
        const reply = await device.infer(modelId, int16Tensor(samples), {
          scale,
          shape: [1, 25, 96],
          deadlineMs: 1000,
          timeoutMs: 1000,
          tries: 1,
        });
        if (reply.type !== FrameType.INFER_RESP) throw new Error(`bridge answered type ${reply.type}`);
      };
      const direct = () =>
        mesh.infer('kws', { 'onnx::Flatten_0': { dtype: 'float32', shape: [1, 25, 96], data: asFloat } }, { deadlineMs: 1000 });

      ctx.log(`bridge: warm-up, then ${n} sequential kws requests each way, alternating in blocks of 100`);
      for (let i = 0; i < 200; i++) {
        await viaBridge();
        await direct();
      }
      const bridgeMs: number[] = [];
      const directMs: number[] = [];
      for (let done = 0; done < n; done += 100) {
        for (let i = 0; i < 100; i++) {
          const t0 = performance.now();
          await direct();
          directMs.push(performance.now() - t0);
        }
        for (let i = 0; i < 100; i++) {
          const t0 = performance.now();
          await viaBridge();
          bridgeMs.push(performance.now() - t0);
        }
      }
      const b = summarize(bridgeMs);
      const d = summarize(directMs);

      ctx.log(`bridge: authenticated POLL frames from ${DEVICES} devices, ${OUTSTANDING} outstanding, ${durationMs} ms`);
      const meter = new CpuMeter({ broker: broker.pid, agent: agent.pid, bridge: bridge.pid });
      await closedLoop(devices, OUTSTANDING, 500, (dev) => dev.request(FrameType.POLL, new Map(), { timeoutMs: 1000, tries: 1 }));
      meter.begin();
      const frames = await closedLoop(devices, OUTSTANDING, durationMs, (dev) =>
        dev.request(FrameType.POLL, new Map(), { timeoutMs: 1000, tries: 1 }),
      );
      const cpu = meter.end();

      ctx.log(`bridge: kws INFER_REQ frames through the mesh, 16 outstanding, ${Math.round(durationMs / 2)} ms`);
      const infer = await closedLoop(devices, 16, durationMs / 2, (dev) =>
        dev.infer(modelId, int16Tensor(samples), { scale, shape: [1, 25, 96], deadlineMs: 2000, timeoutMs: 2000, tries: 1 }).then((r) => {
          if (r.type !== FrameType.INFER_RESP) throw new Error('error reply');
        }),
      );

      return {
        bench: 'bridge',
        quick,
        frames_per_s: Math.round((frames.done / frames.ms) * 1000),
        added_p50_ms: round(b.p50 - d.p50),
        bridge_p50_ms: round(b.p50),
        bridge_p99_ms: round(b.p99),
        direct_p50_ms: round(d.p50),
        direct_p99_ms: round(d.p99),
        n,
        frames: frames.done,
        frames_failed: frames.failed,
        infer_frames_per_s: Math.round((infer.done / infer.ms) * 1000),
        infer_failed: infer.failed,
        devices: DEVICES,
        outstanding: OUTSTANDING,
        cpu,
        env: environment(),
      };
    } finally {
      await mesh.close();
      for (const close of closers) await close();
      await bridge.stop();
    }
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}
