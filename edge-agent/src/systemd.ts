/**
 * Telling systemd how the agent is doing (sd_notify, see sd_notify(3) and systemd.service(5) "WatchdogSec="), for
 * the unit `Type=notify` with `WatchdogSec=` (packaging/deb/agent/edge-mesh-agent.service): READY=1 once the agent
 * has announced itself, WATCHDOG=1 every third of the watchdog period, STOPPING=1 when it drains. Off unless systemd
 * set NOTIFY_SOCKET.
 *
 * Node cannot send on a unix datagram socket, so each message is sent by `systemd-notify` (part of systemd), a child
 * process: the unit needs `NotifyAccess=all` for the manager to take it. Run without `--no-block`, systemd-notify
 * waits until the manager has read the message (a BARRIER=1 round, systemd-notify(1)), so the manager can still tell
 * which unit the short-lived sender belongs to. The pings are sent from a timer on the main event loop: a loop that
 * is stuck sends none, and systemd restarts the agent after `WatchdogSec`.
 */
import { execFile } from 'node:child_process';
import type { Logger } from 'pino';

export interface SystemdNotifier {
  /** READY=1: the agent serves. */
  ready(): void;
  /** STOPPING=1: the agent drains. */
  stopping(): void;
  /** Stops the watchdog pings. */
  close(): void;
}

export interface SystemdNotifierOptions {
  env?: Readonly<Record<string, string | undefined>>;
  logger: Logger;
  /** Sends one message (`systemd-notify` by default); calls `done` when it is through. */
  send?: (message: string, done: (err: Error | null) => void) => void;
  /** The process whose pings systemd expects (WATCHDOG_PID); this one by default. */
  pid?: number;
}

/** systemd-notify's own wait for the manager is 5 s; a child still running after this is ended. */
const SEND_TIMEOUT_MS = 10_000;

function sendWithSystemdNotify(message: string, done: (err: Error | null) => void): void {
  execFile('systemd-notify', message.split('\n'), { timeout: SEND_TIMEOUT_MS }, (err) => done(err));
}

/**
 * A notifier when systemd asked for one (NOTIFY_SOCKET set), else undefined. The watchdog pings start at once
 * when WATCHDOG_USEC is set (and WATCHDOG_PID, when set, names this process): the unit's watchdog runs while the
 * models load too.
 */
export function systemdNotifier(options: SystemdNotifierOptions): SystemdNotifier | undefined {
  const { env = process.env, logger, send = sendWithSystemdNotify, pid = process.pid } = options;
  if (!env.NOTIFY_SOCKET) return undefined;
  let failedOnce = false;
  let sending = 0;
  const notify = (message: string) => {
    // Children that pile up mean the manager is not reading; one more would not help.
    if (sending >= 2) return;
    sending++;
    send(message, (err) => {
      sending--;
      if (err && !failedOnce) {
        failedOnce = true;
        logger.warn({ err: err.message, message }, 'systemd-notify failed; systemd may not see the agent as ready or alive');
      }
    });
  };
  const watchdogUs = Number(env.WATCHDOG_USEC);
  const watchdogPid = env.WATCHDOG_PID === undefined ? pid : Number(env.WATCHDOG_PID);
  let timer: NodeJS.Timeout | undefined;
  if (Number.isFinite(watchdogUs) && watchdogUs > 0 && watchdogPid === pid) {
    const everyMs = Math.max(1, Math.floor(watchdogUs / 1000 / 3));
    timer = setInterval(() => notify('WATCHDOG=1'), everyMs);
    timer.unref();
    notify('WATCHDOG=1');
    logger.debug({ everyMs }, 'systemd watchdog pings on');
  }
  return {
    ready: () => notify('READY=1'),
    stopping: () => notify('STOPPING=1'),
    close: () => clearInterval(timer),
  };
}
