/**
 * The load generator: its own process, talking to the mesh only through the SDK (`connect` →
 * `mesh.infer`, QoS 1), exactly as an app would.
 *
 *   node --import tsx bench/loadgen.ts --broker URL --key APP_KEYFILE --mode latency    --warmup 500 --n 10000
 *   node --import tsx bench/loadgen.ts --broker URL --key APP_KEYFILE --mode throughput --concurrency 64 \
 *        --warmup-ms 2000 --duration-ms 5000
 *
 * Protocol with the parent (one JSON object per stdout line):
 *   {"event":"ready"}      connected and a live agent serves the model; waits for a `go` line on stdin
 *   {"event":"measuring"}  warm-up done, the measured window starts (parent samples other processes' CPU)
 *   {"event":"window-end"} the measured window is over
 *   {"event":"result",...} the numbers; then the process exits
 * It exits by itself if stdin closes (the parent is gone) and has its own wall-clock cap (--max-ms).
 *
 * latency: closed loop, window 1: `warmup` requests, then `n` timed requests, each stamped with
 *   process.hrtime.bigint() around `await mesh.infer(...)` (single clock, in this process). With
 *   `--agents ID,ID,...` request i goes to agent i mod k (pinned), and the result adds each agent's
 *   p50 and p99 in `by_agent`: agents measured in turns, under the same moment-to-moment load.
 * throughput: `concurrency` closed loops; after `warmup-ms` counts the requests that complete within the
 *   next `duration-ms` (the measured window) and their latencies; loops then stop and in-flight
 *   requests drain. With `--agents A,B --slice-ms S` (paired throughput) the loops send to A for S ms,
 *   then to B for S ms, in turn from the start of the warm-up; for each slice of the window the result's
 *   `slices` gives the agent's index and its rps: the requests sent in that slice to its agent that
 *   complete after its first `settle-ms` (40) and before its end, ÷ (S − settle). The settle lets the
 *   previous slice's requests drain, which still hold loops and CPU when a slice begins.
 *   Errors are counted by code in both modes (they must be 0).
 * Paid: `--escrow ADDRESS --chain-id ID --rpc URL --data DIR` with the payer's EVM key in MESH_EVM_KEY pays for every
 *   request with vouchers on the escrow, as `edge-mesh demo app` does (payouts checked in the escrow's registry); the
 *   result then adds `lanes` (per agent: receipts linked, refused, held, owed and billed micro-dollars).
 */

import { readFileSync } from 'node:fs';
import { createInterface } from 'node:readline';
import { parseArgs } from 'node:util';
import { round, summarize } from '@edge-mesh/client';
import { sampleInputs } from '@edge-mesh/demo';
import { parseKeyFile } from '@edge-mesh/protocol';
import { connect, MeshError, type PaymentOptions } from '@edge-mesh/sdk';

const { values } = parseArgs({
  options: {
    broker: { type: 'string' },
    key: { type: 'string' },
    mode: { type: 'string', default: 'latency' },
    model: { type: 'string', default: 'kws' },
    warmup: { type: 'string', default: '500' },
    n: { type: 'string', default: '10000' },
    concurrency: { type: 'string', default: '64' },
    'warmup-ms': { type: 'string', default: '2000' },
    'duration-ms': { type: 'string', default: '5000' },
    'deadline-ms': { type: 'string', default: '5000' },
    'max-ms': { type: 'string', default: '600000' },
    agents: { type: 'string' },
    'slice-ms': { type: 'string' },
    'settle-ms': { type: 'string', default: '40' },
    escrow: { type: 'string' },
    'chain-id': { type: 'string' },
    rpc: { type: 'string' },
    data: { type: 'string' },
  },
});
const num = (k: keyof typeof values) => Number(values[k]);
const mode = values.mode as 'latency' | 'throughput';
const model = values.model!;
const deadlineMs = num('deadline-ms');
const pinned = values.agents?.split(',').filter(Boolean) ?? [];
const target = (i: number) => (pinned.length > 0 ? { deadlineMs, agentId: pinned[i % pinned.length]! } : { deadlineMs });

const emit = (event: string, data: Record<string, unknown> = {}) => process.stdout.write(`${JSON.stringify({ event, ...data })}\n`);

setTimeout(() => {
  process.stderr.write(`loadgen: --max-ms ${values['max-ms']} reached; exiting\n`);
  process.exit(3);
}, num('max-ms')).unref();

const stdinLines = createInterface({ input: process.stdin });
const go = new Promise<void>((resolve) => stdinLines.on('line', (l) => l.trim() === 'go' && resolve()));
stdinLines.on('close', () => process.exit(4));

/** The payer as `edge-mesh demo app` builds it from the same options (cli/src/demo.ts). */
async function paymentOptions(): Promise<PaymentOptions> {
  const key = process.env.MESH_EVM_KEY;
  if (!key || !values['chain-id'] || !values.rpc || !values.data) {
    process.stderr.write('loadgen: --escrow needs --chain-id, --rpc, --data and MESH_EVM_KEY\n');
    process.exit(2);
  }
  const { ethers } = await import('ethers');
  const chainId = BigInt(values['chain-id']);
  const provider = new ethers.JsonRpcProvider(values.rpc, chainId, { staticNetwork: ethers.Network.from(chainId), batchMaxCount: 1 });
  return { signer: new ethers.Wallet(key, provider), domain: { chainId, escrow: values.escrow! }, dataDir: values.data };
}
/** What the lanes hold, when paying: shows each request was billed and paid (refused 0). */
const lanes = () =>
  values.escrow
    ? {
        lanes: mesh.lanes().map((l) => ({
          agent: l.agentId,
          receipts: l.receipts,
          refused: l.refused,
          held: l.held,
          owed_micros: l.owedMicros,
          billed_micros: l.billedMicros,
          broken: l.broken ?? null,
        })),
        // Requests the SDK still remembers for receipts owed (sdk/src/payments.ts, SentRequests): 0 once all are in.
        paid_requests_remembered: mesh.counters.paidRequestsRemembered,
      }
    : {};

const identity = parseKeyFile(readFileSync(values.key!, 'utf8'), values.key);
const mesh = await connect({ brokerUrl: values.broker!, identity, ...(values.escrow ? { payment: await paymentOptions() } : {}) });
await mesh.waitForModel(model, 15_000, Math.max(1, new Set(pinned).size));
if (values.escrow) {
  // A lane opens once the agent's quote is read and its payout checked in the escrow: until then requests would go unpaid.
  const until = performance.now() + 15_000;
  while (mesh.lanes().length === 0 && performance.now() < until) await new Promise((r) => setTimeout(r, 50));
  if (mesh.lanes().length === 0) {
    process.stderr.write('loadgen: no payment lane opened in 15 s\n');
    process.exit(2);
  }
}
const inputs = sampleInputs(model, 1);
emit('ready', { agents: mesh.agents().map((a) => a.id) });
await go;

const errors: Record<string, number> = {};
let retried = 0;
const countError = (err: unknown) => {
  const code = err instanceof MeshError ? err.code : 'NON_MESH_ERROR';
  errors[code] = (errors[code] ?? 0) + 1;
};

if (mode === 'latency') {
  const warmup = num('warmup');
  const n = num('n');
  for (let i = 0; i < warmup; i++) {
    try {
      await mesh.infer(model, inputs, target(i));
    } catch (err) {
      countError(err);
    }
  }
  const warmupErrors = { ...errors };
  for (const k of Object.keys(errors)) delete errors[k];
  const latencies = new Float64Array(n);
  const execMs: number[] = [];
  const queueMs: number[] = [];
  const networkMs: number[] = [];
  const byAgent = new Map<string, number[]>(pinned.map((id) => [id, []]));
  let ok = 0;
  emit('measuring');
  const cpu0 = process.cpuUsage();
  const t0 = performance.now();
  for (let i = 0; i < n; i++) {
    const start = process.hrtime.bigint();
    try {
      const r = await mesh.infer(model, inputs, target(i));
      const ms = Number(process.hrtime.bigint() - start) / 1e6;
      latencies[ok++] = ms;
      byAgent.get(r.agentId)?.push(ms);
      if (r.attempts > 1) retried++;
      execMs.push(r.timings.execMs);
      queueMs.push(r.timings.queueMs);
      networkMs.push(r.timings.networkMs);
    } catch (err) {
      countError(err);
    }
  }
  const wallMs = performance.now() - t0;
  const cpu = process.cpuUsage(cpu0);
  emit('window-end');
  const s = summarize(latencies.subarray(0, ok));
  await mesh.receiptsIn();
  emit('result', {
    mode,
    model,
    n,
    ok,
    errors,
    warmup_errors: warmupErrors,
    retried,
    p50_ms: round(s.p50),
    p90_ms: round(s.p90),
    p99_ms: round(s.p99),
    max_ms: round(s.max),
    agent_exec_p50_ms: round(summarize(execMs).p50),
    agent_queue_p50_ms: round(summarize(queueMs).p50),
    sdk_network_p50_ms: round(summarize(networkMs).p50),
    wall_ms: Math.round(wallMs),
    cpu_ms: Math.round((cpu.user + cpu.system) / 1000),
    cores: round((cpu.user + cpu.system) / 1000 / wallMs, 2),
    ...lanes(),
    ...(pinned.length > 0
      ? {
          by_agent: Object.fromEntries(
            [...byAgent].map(([id, ms]) => {
              const a = summarize(Float64Array.from(ms));
              return [id, { n: ms.length, p50_ms: round(a.p50), p99_ms: round(a.p99) }];
            }),
          ),
        }
      : {}),
  });
} else {
  const concurrency = num('concurrency');
  const warmupMs = num('warmup-ms');
  const durationMs = num('duration-ms');
  const latencies: number[] = [];
  const queueMs: number[] = [];
  const execMs: number[] = [];
  let inWindow = 0;
  let total = 0;
  let stop = false;
  const began = performance.now();
  const windowStart = began + warmupMs;
  const windowEnd = windowStart + durationMs;
  const sliceMs = values['slice-ms'] === undefined ? 0 : num('slice-ms');
  const settleMs = num('settle-ms');
  if (sliceMs > 0 && (pinned.length < 2 || !(settleMs >= 0 && settleMs < sliceMs))) {
    process.stderr.write('loadgen: --slice-ms needs --agents with two or more ids and 0 <= --settle-ms < --slice-ms\n');
    process.exit(2);
  }
  const sliceOf = (t: number) => Math.floor((t - began) / sliceMs);
  /** Paired throughput: per slice of the run, the requests counted for it (sent in it to its agent, done after its settle). */
  const sliceCounts = new Map<number, number>();
  const loop = async () => {
    while (!stop) {
      const start = performance.now();
      const slice = sliceMs > 0 ? sliceOf(start) : 0;
      const options = sliceMs > 0 ? { deadlineMs, agentId: pinned[slice % pinned.length]! } : { deadlineMs };
      try {
        const r = await mesh.infer(model, inputs, options);
        const end = performance.now();
        total++;
        if (sliceMs > 0 && sliceOf(end) === slice && end - began - slice * sliceMs >= settleMs)
          sliceCounts.set(slice, (sliceCounts.get(slice) ?? 0) + 1);
        if (r.attempts > 1) retried++;
        if (start >= windowStart && end < windowEnd) {
          latencies.push(end - start);
          queueMs.push(r.timings.queueMs);
          execMs.push(r.timings.execMs);
        }
        if (end >= windowStart && end < windowEnd) inWindow++;
      } catch (err) {
        countError(err);
      }
    }
  };
  const loops = Array.from({ length: concurrency }, loop);
  let cpu0 = process.cpuUsage();
  let cpu = cpu0;
  await new Promise<void>((resolve) =>
    setTimeout(() => {
      cpu0 = process.cpuUsage();
      emit('measuring');
      resolve();
    }, windowStart - performance.now()),
  );
  await new Promise<void>((resolve) =>
    setTimeout(() => {
      cpu = process.cpuUsage(cpu0);
      stop = true;
      emit('window-end');
      resolve();
    }, windowEnd - performance.now()),
  );
  await Promise.all(loops);
  const s = summarize(latencies);
  // The slices wholly inside the window, in order.
  const slices: { agent: number; rps: number }[] = [];
  if (sliceMs > 0) {
    for (let k = Math.ceil((windowStart - began) / sliceMs); (k + 1) * sliceMs <= windowEnd - began; k++)
      slices.push({ agent: k % pinned.length, rps: round(((sliceCounts.get(k) ?? 0) * 1000) / (sliceMs - settleMs), 1) });
  }
  await mesh.receiptsIn();
  emit('result', {
    mode,
    model,
    concurrency,
    duration_ms: durationMs,
    completed_in_window: inWindow,
    rps: round((inWindow * 1000) / durationMs, 1),
    total_completed: total,
    errors,
    retried,
    p50_ms: round(s.p50),
    p99_ms: round(s.p99),
    max_ms: round(s.max),
    agent_queue_p50_ms: round(summarize(queueMs).p50),
    agent_exec_p50_ms: round(summarize(execMs).p50),
    cpu_ms: Math.round((cpu.user + cpu.system) / 1000),
    cores: round((cpu.user + cpu.system) / 1000 / durationMs, 2),
    ...(sliceMs > 0 ? { slice_ms: sliceMs, settle_ms: settleMs, agents: pinned, slices } : {}),
    ...lanes(),
  });
}
await mesh.close();
process.exit(0);
