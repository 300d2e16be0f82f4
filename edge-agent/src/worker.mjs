// @ts-check
/**
 * One inference worker: holds an onnxruntime session per model for its whole life (creating and
 * releasing sessions repeatedly leaks) and runs one job at a time, so `session.run`, which blocks
 * the thread it runs on, never blocks the agent's event loop.
 *
 * Plain JavaScript (type-checked through JSDoc) so a worker starts without a TypeScript loader:
 * each loader costs a thread, ~30 MB and ~250 ms per worker. Its messages are typed in
 * worker-protocol.ts.
 */
import os from 'node:os';
import { parentPort } from 'node:worker_threads';
// The errors module alone: the whole protocol package would cost every worker its schema compilers.
import { MeshError } from '@edge-mesh/protocol/errors';
import { createSession, fromResults, toFeeds, warmupFeeds } from './ort-session.mjs';

/** @typedef {import('onnxruntime-node').InferenceSession} InferenceSession */
/** @typedef {import('./worker-protocol.ts').ToWorker} ToWorker */
/** @typedef {import('./worker-protocol.ts').FromWorker} FromWorker */
/** @typedef {import('./worker-protocol.ts').LoadedModel} LoadedModel */
/** @typedef {import('./worker-protocol.ts').WorkerModelSpec} WorkerModelSpec */
/** @typedef {import('./worker-protocol.ts').LoadPriority} LoadPriority */
/** @typedef {import('@edge-mesh/protocol').Tensor} Tensor */

if (!parentPort) throw new MeshError('MESH_INTERNAL', 'worker.mjs must run in a worker thread');
const port = parentPort;
/** @type {Map<string, InferenceSession>} */
const sessions = new Map();

/**
 * @param {FromWorker} message
 * @param {ArrayBuffer[]} [transfer]
 */
function send(message, transfer = []) {
  port.postMessage(message, transfer);
}

/**
 * This thread's nice value, or undefined where it cannot be read. On Linux, setpriority(PRIO_PROCESS, 0) (what
 * os.getPriority(0) and os.setPriority(0, …) call through libuv's uv_os_setpriority) names the calling thread only,
 * so the worker lowers itself and not the agent's event loop (docs/agent.md, "Starting without starving the neighbours").
 * @returns {number | undefined}
 */
function threadPriority() {
  try {
    return os.getPriority(0);
  } catch {
    return undefined;
  }
}

/**
 * Raises this thread's nice value by `nice` (capped at 19, the lowest priority) for the loading and warm-up that
 * follow, so a restarting agent does not take CPU from its neighbours' inference. Returns the value before and now.
 * @param {number} nice
 * @returns {{ before: number, during: number } | undefined}
 */
function lowerPriority(nice) {
  const before = threadPriority();
  if (before === undefined || nice <= 0) return before === undefined ? undefined : { before, during: before };
  try {
    os.setPriority(0, Math.min(19, before + nice));
  } catch {
    /* not allowed here: load at the priority we have */
  }
  return { before, during: threadPriority() ?? before };
}

/**
 * Back to the priority the thread had before loading. Lowering a nice value needs CAP_SYS_NICE (or RLIMIT_NICE) on
 * Linux; without it the worker keeps serving at the lower priority, which `after` reports.
 * @param {number} before
 */
function restorePriority(before) {
  try {
    os.setPriority(0, before);
  } catch {
    /* reported in `after` */
  }
}

/**
 * @param {WorkerModelSpec} spec
 * @param {number} intraOpThreads
 * @param {number} warmupRuns
 * @returns {Promise<LoadedModel>}
 */
async function load(spec, intraOpThreads, warmupRuns) {
  const { session, provider, inputs, outputs } = await createSession(spec, intraOpThreads);
  sessions.set(spec.name, session);
  const feeds = warmupFeeds(inputs, spec.warmup);
  /** @type {number[]} */
  const times = [];
  // The first run pays for lazy allocations; it is not part of the measurement.
  await session.run(feeds);
  for (let i = 0; i < warmupRuns; i++) {
    const t0 = performance.now();
    await session.run(feeds);
    times.push(performance.now() - t0);
  }
  times.sort((a, b) => a - b);
  return { name: spec.name, inputs, outputs, provider, latencyMs: times[Math.floor(times.length / 2)] ?? 0 };
}

/**
 * @param {number} job
 * @param {string} model
 * @param {Record<string, Tensor>} inputs
 */
async function run(job, model, inputs) {
  const session = sessions.get(model);
  const t0 = performance.now();
  if (!session) {
    send({ type: 'failed', job, message: `model ${model} is not loaded in this worker`, execMs: 0 });
    return;
  }
  try {
    const results = await session.run(toFeeds(inputs));
    const execMs = performance.now() - t0;
    const outputs = fromResults(results);
    /** @type {Set<ArrayBuffer>} */
    const transfer = new Set();
    for (const t of Object.values(outputs)) if (t.data.buffer instanceof ArrayBuffer) transfer.add(t.data.buffer);
    send({ type: 'done', job, outputs, execMs }, [...transfer]);
  } catch (err) {
    send({ type: 'failed', job, message: err instanceof Error ? err.message : String(err), execMs: performance.now() - t0 });
  }
}

/** Loading and batches run in arrival order, one job at a time. */
let queue = Promise.resolve();
let closing = false;

port.on('message', (/** @type {ToWorker} */ message) => {
  switch (message.type) {
    case 'run':
      queue = queue.then(async () => {
        for (const { job, model, inputs } of message.jobs) {
          if (closing) return;
          await run(job, model, inputs);
        }
      });
      return;
    case 'close':
      // Exit between jobs, never during one: a thread terminated from outside while onnxruntime runs
      // aborts the whole process when the run returns (pool.ts, close).
      closing = true;
      queue = queue.then(() => process.exit(0));
      return;
    case 'init':
      queue = queue.then(async () => {
        try {
          /** @type {LoadedModel[]} */
          const loaded = [];
          const before = lowerPriority(message.loadNice);
          try {
            for (const spec of message.models) {
              loaded.push(await load(spec, message.intraOpThreads, message.warmupRuns));
              // Between two models, give the thread up for a turn.
              await new Promise((resolve) => setImmediate(resolve));
            }
          } finally {
            if (before !== undefined) restorePriority(before.before);
          }
          send({ type: 'ready', models: loaded, priority: before && { ...before, after: threadPriority() ?? before.before } });
        } catch (err) {
          send({ type: 'fatal', message: err instanceof Error ? err.message : String(err) });
        }
      });
      return;
  }
});
