/**
 * The load generator of `npm run bench -- leases`: its own process, an app as `npm start`'s sample app is one, sending
 * wake-word requests at a steady rate on one of three paths:
 *   leased     through the SDK with a router named (`connect({ router })`): the SDK asks the router for route leases and
 *              sends to the agents itself;
 *   forwarded  through the router's KServe HTTP API (binary tensors): the router picks and forwards;
 *   mixed      both, as `npm start` mixes them: every tenth request forwarded, the rest leased.
 *
 *   node --import tsx bench/lease-loadgen.ts --broker URL --key APP_KEYFILE
 *
 * Protocol with the parent, one JSON object per line. On stdin, one run at a time:
 *   {"path":"leased","router":ID,"http":URL,"agents":3,"rate":100,"warmupMs":1500,"durationMs":5000,"deadlineMs":500}
 * On stdout: {"event":"ready"} once it can take a run, then per run {"event":"measuring"} when the measured window
 * starts (the parent reads the agents' counters), {"event":"window-end"}, and {"event":"result", ...} once every
 * request sent in the window has ended. Each run connects a fresh SDK client (no memory of earlier runs), and the
 * window's requests are those sent in it, open loop: one every 1000/rate ms whatever the answers do.
 *
 * Only what the protocol carries reaches the picking: the SDK reads the agents' statuses, load reports and replies,
 * the router the same. The result names the agent that answered each request (`served_by`), from the SDK's result or
 * the HTTP answer's `parameters.agent`.
 */
import { readFileSync } from 'node:fs';
import { createInterface } from 'node:readline';
import { parseArgs } from 'node:util';
import { round, summarize } from '@edge-mesh/client';
import { kserveInfer, sampleInputs } from '@edge-mesh/demo';
import { parseKeyFile } from '@edge-mesh/protocol';
import { connect, type Mesh, MeshError } from '@edge-mesh/sdk';

const { values } = parseArgs({
  options: {
    broker: { type: 'string' },
    key: { type: 'string' },
    model: { type: 'string', default: 'kws' },
    'max-ms': { type: 'string', default: '3600000' },
  },
});
const model = values.model!;
const identity = parseKeyFile(readFileSync(values.key!, 'utf8'), values.key);
const emit = (event: string, data: Record<string, unknown> = {}) => process.stdout.write(`${JSON.stringify({ event, ...data })}\n`);

setTimeout(() => {
  process.stderr.write(`lease-loadgen: --max-ms ${values['max-ms']} reached; exiting\n`);
  process.exit(3);
}, Number(values['max-ms'])).unref();

type Path = 'leased' | 'forwarded' | 'mixed';
interface RunCommand {
  path: Path;
  router: string;
  http: string;
  agents: number;
  rate: number;
  warmupMs: number;
  durationMs: number;
  deadlineMs: number;
}

interface Outcome {
  sentAt: number;
  ms: number;
  via: 'leased' | 'forwarded';
  agent: string | undefined;
  code: string | undefined;
  attempts: number | undefined;
  routed: boolean | undefined;
}

const sleep = (ms: number) => new Promise<void>((resolve) => setTimeout(resolve, ms));
/** The mix `npm start` sends (demo/src/sample-app.ts, bench/contention.ts): every tenth request through the router's HTTP API. */
const forwardedInMix = (n: number) => n % 10 === 4;

async function runOnce(cmd: RunCommand): Promise<Record<string, unknown>> {
  const mesh: Mesh = await connect({ brokerUrl: values.broker!, identity, router: cmd.router });
  try {
    await mesh.waitForModel(model, 15_000, cmd.agents);
    const inputs = Array.from({ length: 8 }, (_, i) => sampleInputs(model, i));
    const outcomes: Outcome[] = [];
    const inFlight = new Set<Promise<void>>();
    const gapMs = 1000 / cmd.rate;
    const began = performance.now();
    const windowStart = began + cmd.warmupMs;
    const windowEnd = windowStart + cmd.durationMs;
    let measuring = false;
    let counters0 = mesh.counters;
    for (let i = 0; ; i++) {
      const due = began + i * gapMs;
      if (due >= windowEnd) break;
      const wait = due - performance.now();
      if (wait > 0) await sleep(wait);
      if (!measuring && performance.now() >= windowStart) {
        measuring = true;
        counters0 = mesh.counters;
        emit('measuring');
      }
      const via = cmd.path === 'forwarded' || (cmd.path === 'mixed' && forwardedInMix(i)) ? 'forwarded' : 'leased';
      const sentAt = performance.now();
      const input = inputs[i % inputs.length]!;
      const p = (
        via === 'forwarded'
          ? kserveInfer(cmd.http, model, input, cmd.deadlineMs).then((r) => ({ agent: r.agentId, attempts: undefined, routed: undefined }))
          : mesh
              .infer(model, input, { deadlineMs: cmd.deadlineMs })
              .then((r) => ({ agent: r.agentId, attempts: r.attempts, routed: r.routedBy !== undefined }))
      )
        .then(
          (r) => {
            if (sentAt >= windowStart) outcomes.push({ sentAt, ms: performance.now() - sentAt, via, code: undefined, ...r });
          },
          (err: unknown) => {
            if (sentAt < windowStart) return;
            const code = err instanceof MeshError ? err.code : 'NON_MESH_ERROR';
            outcomes.push({ sentAt, ms: performance.now() - sentAt, via, agent: undefined, code, attempts: undefined, routed: undefined });
          },
        )
        .finally(() => inFlight.delete(p));
      inFlight.add(p);
    }
    const wait = windowEnd - performance.now();
    if (wait > 0) await sleep(wait);
    const counters1 = mesh.counters;
    emit('window-end');
    await Promise.all(inFlight);
    return {
      path: cmd.path,
      ...summary(outcomes),
      ...(cmd.path === 'mixed'
        ? {
            by_via: {
              leased: summary(outcomes.filter((o) => o.via === 'leased')),
              forwarded: summary(outcomes.filter((o) => o.via === 'forwarded')),
            },
          }
        : {}),
      // The SDK's own count over the window: requests whose first attempt a lease chose, and those it chose by itself.
      sdk: {
        leases: counters1.leases - counters0.leases,
        routed: counters1.routed - counters0.routed,
        lease_fallbacks: counters1.leaseFallbacks - counters0.leaseFallbacks,
        retries: counters1.retries - counters0.retries,
        hedges: counters1.hedges - counters0.hedges,
        timeouts: counters1.timeouts - counters0.timeouts,
      },
    };
  } finally {
    await mesh.close();
  }
}

function summary(outcomes: Outcome[]) {
  const ok = outcomes.filter((o) => o.code === undefined);
  const s = ok.length > 0 ? summarize(ok.map((o) => o.ms)) : undefined;
  const errors: Record<string, number> = {};
  const servedBy: Record<string, number> = {};
  for (const o of outcomes) {
    if (o.code !== undefined) errors[o.code] = (errors[o.code] ?? 0) + 1;
    else servedBy[o.agent ?? 'unknown'] = (servedBy[o.agent ?? 'unknown'] ?? 0) + 1;
  }
  return {
    requests: outcomes.length,
    errors: outcomes.length - ok.length,
    errors_by_code: errors,
    p50_ms: s ? round(s.p50) : null,
    p99_ms: s ? round(s.p99) : null,
    max_ms: s ? round(s.max) : null,
    served_by: servedBy,
    // Answered after more than one attempt (leased requests only: the HTTP answer does not say).
    retried: ok.filter((o) => (o.attempts ?? 1) > 1).length,
  };
}

const lines = createInterface({ input: process.stdin });
lines.on('close', () => process.exit(4));
let busy = Promise.resolve();
lines.on('line', (line) => {
  if (line.trim() === '') return;
  busy = busy.then(async () => {
    try {
      const cmd = JSON.parse(line) as RunCommand;
      emit('result', await runOnce(cmd));
    } catch (err) {
      emit('result', { error: (err as Error).message ?? String(err) });
    }
  });
});
emit('ready');
