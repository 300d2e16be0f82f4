/**
 * The firmware bridge inside `edge-mesh up`: a bridge process (`edge-mesh bridge run`, its own
 * `bridge.key`, admitted by the local operator) on a free UDP port, with one simulated device
 * provisioned in a registry made for the run. The device is a process of its own (`edge-mesh bridge
 * sim-device`, hidden) that speaks the frame protocol over UDP: HELLO, then wake-word requests as int16
 * windows with a scale, a few per second. Its key reaches that process through the environment, never
 * the command line.
 */
import { mkdir, rm } from 'node:fs/promises';
import { setTimeout as sleep } from 'node:timers/promises';
import { round, summarize } from '@edge-mesh/client';
import type { BridgeStopSummary, DeviceSummary } from './parts.ts';
import { sampleInputs } from './sample-inputs.ts';

export interface BridgeDemoSummary extends BridgeStopSummary {
  devices: number;
  /** What the device process itself counted (sent, answered, device-side p50). */
  device: DeviceSummary | undefined;
}

/** A fresh registry folder holding one provisioned device; the registry is closed again for the bridge to open. */
export async function provisionDemoDevice(registryDir: string): Promise<{ deviceId: number; longId: string; key: string }> {
  const { DeviceRegistry } = await import('@edge-mesh/firmware-bridge');
  await rm(registryDir, { recursive: true, force: true });
  await mkdir(registryDir, { recursive: true });
  const registry = await DeviceRegistry.open(registryDir);
  try {
    const record = await registry.provision({ name: 'sim-device-1' });
    return { deviceId: record.deviceId, longId: record.longId, key: record.key };
  } finally {
    await registry.close();
  }
}

/**
 * The simulated device's loop (run by the hidden `edge-mesh bridge sim-device`): HELLO, then requests
 * until `stop` resolves; returns what it counted.
 */
export async function runSimDevice(
  options: { host: string; port: number; deviceId: number; key: string; ratePerS: number; onReady?: () => void | Promise<void> },
  stop: Promise<unknown>,
): Promise<DeviceSummary> {
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
  // One abort for every pause: racing each pause against the long-lived `stop` promise would leave one
  // reaction per request on it until the end of the run (measured: 30 MB of heap per 100,000 pauses).
  const paused = new AbortController();
  let stopping = false;
  void stop.then(() => {
    stopping = true;
    paused.abort();
  });
  try {
    await device.hello({ fw: 'sim-device 1.0', keepaliveS: 30 });
    await options.onReady?.();
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
      await sleep(1000 / options.ratePerS, undefined, { signal: paused.signal }).catch(() => undefined);
    }
  } finally {
    await close();
  }
  const s = latencies.length ? summarize(latencies) : undefined;
  return { sent, ok, errors, p50_ms: s ? round(s.p50) : null };
}
