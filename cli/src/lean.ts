/**
 * V8 settings for `edge-mesh agent`, a long-running process on small devices (docs/agent.md has the
 * measurements behind each). Both are process-wide, so only the agent command makes them, and a node
 * flag given on the command line or in NODE_OPTIONS for the same setting wins.
 *
 * - Young generation: V8 grows it while modules load (most of what loading allocates survives) and
 *   keeps the grown semi-spaces, 16 MB here, for the life of the process. Growth factor 1 holds them
 *   at their initial 1 MB; under load that means more frequent, equally short scavenges.
 * - Optimizing compiler: start-up code (schema compilers, option parsing) runs hot for a moment, and
 *   the optimizing compiler's scratch memory for it stays in the C allocator's per-thread pools
 *   after the process settles. With the optimizer off until the agent has started, that memory is
 *   never taken; the request path is optimized as usual once traffic makes it hot.
 *
 * This module has no imports beyond node:v8 so that cli/bin/edge-mesh.mjs can apply it before
 * anything else loads: set later, the young generation has already grown.
 */
import v8 from 'node:v8';

let optimizerDeferred = false;
let youngHeld = false;

const holdYoungGeneration = () => v8.setFlagsFromString('--semi-space-growth-factor=1');

const nodeFlags = (): string => [...process.execArgv, process.env.NODE_OPTIONS ?? ''].join(' ');

/** Called by the bin before the CLI loads, for the agent command only. */
export function leanAgentStart(): void {
  const given = nodeFlags();
  if (!/semi-space/.test(given)) {
    holdYoungGeneration();
    youngHeld = true;
  }
  if (!/--(no-)?(opt|turbofan)\b/.test(given)) {
    v8.setFlagsFromString('--no-turbofan');
    optimizerDeferred = true;
  }
}

/**
 * Called once the agent has started. The optimizing compiler is back for the request path. The growth
 * factor is set again: V8 puts it back to its minimum of 2 whenever it configures a new isolate's heap,
 * which each worker thread's start does (a worker that replaces a crashed one undoes it again).
 */
export function leanAgentStarted(): void {
  if (youngHeld) holdYoungGeneration();
  if (!optimizerDeferred) return;
  optimizerDeferred = false;
  v8.setFlagsFromString('--turbofan');
}
