/**
 * Commands run by a supervisor. `edge-mesh up` starts every part as an `edge-mesh` command with an IPC
 * channel (docs/operations.md): the part reports `ready` and `summary` messages over it, and stops when
 * that channel closes, which happens whenever the supervisor goes away, SIGKILL included. Run by hand
 * (no channel), the same commands behave as before and these helpers do nothing.
 */
import type { PartMessage } from '@edge-mesh/demo';

/** True when this process was started with an IPC channel (by `edge-mesh up`). */
export const supervised = typeof process.send === 'function';

/** After its supervisor vanished a part gets this long to stop cleanly, then exits anyway. */
const ORPHAN_GRACE_MS = 5_000;

const stopWaiters = new Set<(reason: string) => void>();
let orphaned = false;
let onDisconnect: (() => void) | undefined;

function supervisorGone(): void {
  if (orphaned) return;
  orphaned = true;
  for (const wake of stopWaiters) wake('supervisor gone');
  // Nobody reads this process's output any more; a stop that hangs must not leave it running.
  setTimeout(() => process.exit(1), ORPHAN_GRACE_MS).unref();
}

/** Starts watching the supervisor's channel (once, before any command runs). */
export function watchSupervisor(): void {
  if (!supervised || onDisconnect) return;
  onDisconnect = supervisorGone;
  // The channel may already be gone if the supervisor died while this process was loading.
  if (!process.connected) supervisorGone();
  else process.once('disconnect', onDisconnect);
}

/**
 * Resolves with the reason when SIGINT or SIGTERM arrives, or the supervisor goes away (once); a
 * second signal exits at once.
 */
export function stopSignal(): Promise<string> {
  return new Promise((resolve) => {
    let seen = false;
    const onStop = (reason: string) => {
      if (seen) process.exit(130);
      seen = true;
      resolve(reason);
    };
    process.on('SIGINT', onStop);
    process.on('SIGTERM', onStop);
    if (orphaned) onStop('supervisor gone');
    else stopWaiters.add(onStop);
  });
}

/** Sends one message to the supervisor; resolves once it is written (at once when unsupervised). */
export function report<T>(type: PartMessage['type'], data: T): Promise<void> {
  if (!supervised || !process.connected) return Promise.resolve();
  const message: PartMessage<T> = { type, data };
  return new Promise((resolve) => {
    process.send!(message, undefined, {}, () => resolve());
  });
}

/** Closes the channel so the finished command can exit (an open channel keeps the process alive). */
export function leaveSupervisor(): void {
  if (onDisconnect) process.removeListener('disconnect', onDisconnect);
  if (process.connected) process.disconnect();
}
