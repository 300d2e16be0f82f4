/**
 * V8 settings for `edge-mesh agent`, a long-running process on small devices (docs/agent.md has the
 * measurements). Process-wide, so only the agent command makes them, and a node flag given on the
 * command line or in NODE_OPTIONS for the same setting wins.
 *
 * Young generation: V8 grows it while modules load (most of what loading allocates survives) and keeps
 * the grown semi-spaces, 16 MB here, for the life of the process. Growth factor 1 holds them at their
 * initial 1 MB; under load that means more frequent, equally short scavenges. Only a heap-sizing flag is
 * changed at run time; flags that change code generation are left alone, since Node documents changing
 * V8 settings after start-up as unpredictable.
 *
 * This module has no imports beyond node:v8 so that cli/bin/edge-mesh.mjs can apply it before
 * anything else loads: set later, the young generation has already grown.
 */
import v8 from 'node:v8';

let youngHeld = false;

const holdYoungGeneration = () => v8.setFlagsFromString('--semi-space-growth-factor=1');

const nodeFlags = (): string => [...process.execArgv, process.env.NODE_OPTIONS ?? ''].join(' ');

/** Called by the bin before the CLI loads, for the agent command only. */
export function leanAgentStart(): void {
  if (/semi-space/.test(nodeFlags())) return;
  holdYoungGeneration();
  youngHeld = true;
}

/**
 * Called once the agent has started. The growth factor is set again: V8 puts it back to its minimum of 2
 * whenever it configures a new isolate's heap, which each worker thread's start does (a worker that
 * replaces a crashed one undoes it again until the agent restarts).
 */
export function leanAgentStarted(): void {
  if (youngHeld) holdYoungGeneration();
}
