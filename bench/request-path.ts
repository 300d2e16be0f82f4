/**
 * `npm run bench -- request-path [--quick] [--n N] [--rounds R] [--paths agent,instant,echo]`: the agent's own CPU
 * per request, in this process, without MQTT. `--paths` runs only the paths named (for a profile of one path).
 *
 * Three paths, each fed the same wake-word (`kws`) requests as the SDK encodes them, 64 outstanding, 16
 * handed over per event-loop turn (as requests arrive in a read from the broker), one after another in R
 * rounds (quick 3, full 5) of N requests each (quick 10,000, full 30,000), after 3,000 untimed ones:
 *
 * agent:   the agent's request path as startAgent wires it: AgentRequests (decode, replay guard, tensor
 *          checks, reply encoding) → Scheduler → InlineExecutor running `kws` on onnxruntime on this
 *          thread; the reply is handed to a no-op where the agent would publish it.
 * instant: the same with an executor that answers every run at once (a 4-byte output, on the next
 *          check phase as onnxruntime's own runs are): the agent's machinery without the model.
 * echo:    what the echo agent (bench/echo-agent.ts) does per request besides MQTT: decodeMessage of the
 *          request and encodeMessage of its reply.
 *
 * Each path's figure is process CPU time (user + system) over a round ÷ N, the median over rounds.
 * Request deadlines are a minute out and the guard remembers 100,000 ids, so no round fills it.
 * A CPU figure moves less with other work on the machine than a latency does, but it still rises with
 * it (caches, preemption): compare paths within one run.
 */
import path from 'node:path';
import { round } from '@edge-mesh/client';
import { ensureModelsFolder, sampleInputs } from '@edge-mesh/demo';
import { decodeMessage, encodeMessage, encodeTensorMap, type InferRequest, newRequestId, PROTOCOL_VERSION } from '@edge-mesh/protocol';
import pino from 'pino';
import type { Executor, JobCallback } from '../edge-agent/src/executor.ts';
import { Faults } from '../edge-agent/src/faults.ts';
import { loadInline } from '../edge-agent/src/inline.ts';
import { DEFAULT_INLINE_BATCH_MAX } from '../edge-agent/src/options.ts';
import { AgentRequests, ReplayGuard } from '../edge-agent/src/requests.ts';
import { Scheduler } from '../edge-agent/src/scheduler.ts';
import { newAgentCounters } from '../edge-agent/src/types.ts';
import { type BenchContext, type BenchResult, environment, MODELS_DIR, median } from './lib.ts';

const MODEL = 'kws';
const OUTSTANDING = 64;
const PER_TURN = 16;
const WARMUP = 3_000;
const AGENT_ID = 'a'.repeat(43);
const SENDER_ID = 'b'.repeat(43);

type Handler = (senderId: string, payload: Buffer) => void;

/** Answers every run on the next check phase with a 4-byte output: the agent's path without a model. */
class InstantExecutor implements Executor {
  handoffMs = 0;
  onIdle: () => void = () => {};
  private running = 0;

  get freeCapacity(): number {
    return this.running < OUTSTANDING ? 1 : 0;
  }

  run(_model: string, _inputs: unknown, callback: JobCallback): void {
    this.running++;
    setImmediate(() => {
      this.running--;
      callback(undefined, { outputs: { '39': { dtype: 'float32', shape: [1, 1], data: new Float32Array(1) } }, execMs: 0.001 });
      this.onIdle();
    });
  }
}

export async function run(ctx: BenchContext): Promise<BenchResult> {
  const n = typeof ctx.args.n === 'string' ? Number(ctx.args.n) : ctx.quick ? 10_000 : 30_000;
  const rounds = typeof ctx.args.rounds === 'string' ? Number(ctx.args.rounds) : ctx.quick ? 3 : 5;
  if (!(Number.isInteger(n) && n > 0 && Number.isInteger(rounds) && rounds > 0))
    throw new Error('--n and --rounds must be positive integers');
  const names = ['agent', 'instant', 'echo'];
  const chosen = typeof ctx.args.paths === 'string' ? ctx.args.paths.split(',') : names;
  for (const name of chosen) if (!names.includes(name)) throw new Error(`--paths: no path ${name} (${names.join(', ')})`);
  const manifest = await ensureModelsFolder(MODELS_DIR);
  const entry = manifest.models.find((m) => m.name === MODEL)!;
  const wireInputs = encodeTensorMap(sampleInputs(MODEL, 1));
  const request = (): Buffer =>
    encodeMessage({
      v: PROTOCOL_VERSION,
      kind: 'req',
      id: newRequestId(),
      deadline: Date.now() + 60_000,
      model: MODEL,
      inputs: wireInputs,
    });

  let replies = 0;
  let onReply = () => {};
  const replied = () => {
    replies++;
    onReply();
  };

  const { executor: inline, loaded } = await loadInline(
    [{ name: MODEL, path: path.join(MODELS_DIR, entry.file), providers: ['cpu'], warmup: entry.warmup }],
    { intraOpThreads: 1, warmupRuns: 5, inlineMaxMs: 0.5, inlineBatchMax: DEFAULT_INLINE_BATCH_MAX },
  );
  if (!inline) throw new Error(`${MODEL} does not run inline on this machine (its warm-up p99 is over 0.5 ms)`);
  const agentPath = (executor: Executor): Handler => {
    const requests = new AgentRequests({
      agentId: AGENT_ID,
      maxMessageBytes: 4 * 1024 * 1024,
      maxElements: 1 << 24,
      models: new Map(loaded.map((m) => [m.name, m])),
      units: new Map(),
      replays: new ReplayGuard(100_000),
      payments: undefined,
      counters: newAgentCounters(),
      faults: new Faults(),
      logger: pino({ level: 'silent' }),
      reply: replied,
      closed: () => false,
    });
    const scheduler = new Scheduler(1_024, requests.finished);
    scheduler.addModel(MODEL, loaded[0]!.latencyMs, executor);
    requests.attach(scheduler);
    return requests.onRequest;
  };
  const echoOutputs = { '39': { dtype: 'float32', shape: [1, 1], data: new Uint8Array(4) } };
  const echo: Handler = (_senderId, payload) => {
    const req: InferRequest = decodeMessage(payload, ['req']);
    encodeMessage({
      v: PROTOCOL_VERSION,
      kind: 'res',
      id: req.id,
      agent: AGENT_ID,
      model: req.model,
      outputs: echoOutputs,
      queueMs: 0,
      execMs: 0,
      rif: 0,
      workMs: 0,
    });
    replied();
  };
  // A fresh agent path (and replay guard) per round, so that every round starts from the same state.
  const paths: Record<string, () => Handler> = {
    agent: () => agentPath(inline),
    instant: () => agentPath(new InstantExecutor()),
    echo: () => echo,
  };

  /** CPU µs per request for `count` requests through `handle`, at most OUTSTANDING unanswered. */
  const measure = async (handle: Handler, count: number): Promise<number> => {
    const payloads = Array.from({ length: count }, request);
    replies = 0;
    let sent = 0;
    const done = new Promise<void>((resolve) => {
      onReply = () => {
        if (replies === count) resolve();
      };
    });
    const pump = () => {
      for (let k = 0; k < PER_TURN && sent < count && sent - replies < OUTSTANDING; k++) handle(SENDER_ID, payloads[sent++]!);
      if (sent < count) setImmediate(pump);
    };
    const before = process.cpuUsage();
    pump();
    await done;
    const used = process.cpuUsage(before);
    return (used.user + used.system) / count;
  };

  const selected = Object.entries(paths).filter(([name]) => chosen.includes(name));
  const samples: Record<string, number[]> = Object.fromEntries(selected.map(([name]) => [name, []]));
  try {
    for (const [, make] of selected) await measure(make(), WARMUP);
    for (let r = 0; r < rounds; r++) {
      for (const [name, make] of selected) samples[name]!.push(round(await measure(make(), n), 2));
      ctx.log(
        `  round ${r + 1}: ${Object.entries(samples)
          .map(([k, v]) => `${k} ${v[r]} µs`)
          .join(', ')}`,
      );
    }
  } finally {
    await inline.close();
  }
  const med = (name: string) => (samples[name] ? round(median(samples[name]), 2) : null);
  const diff = (a: string, b: string) => (samples[a] && samples[b] ? round(med(a)! - med(b)!, 2) : null);
  return {
    bench: 'request-path',
    quick: ctx.quick,
    model: MODEL,
    n,
    rounds,
    outstanding: OUTSTANDING,
    samples_us: samples,
    ...environment(),
    agent_cpu_us_per_request: med('agent'),
    instant_cpu_us_per_request: med('instant'),
    echo_cpu_us_per_request: med('echo'),
    model_us_per_request: diff('agent', 'instant'),
    machinery_us_per_request: diff('instant', 'echo'),
  };
}
