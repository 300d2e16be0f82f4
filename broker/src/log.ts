/** Log helpers: floods from one source must not flood the log. */
import type { Logger } from 'pino';

export type WarnThrottled = (key: string, fields: Record<string, unknown>, msg: string) => void;

/** Warns once per `key` per second at most; the repeats go to debug. */
export function throttledWarn(log: Logger): WarnThrottled {
  const lastWarn = new Map<string, number>();
  return (key, fields, msg) => {
    const now = Date.now();
    const last = lastWarn.get(key);
    if (last !== undefined && now - last < 1000) {
      log.debug(fields, msg);
      return;
    }
    if (lastWarn.size > 10_000) lastWarn.clear();
    lastWarn.set(key, now);
    log.warn(fields, msg);
  };
}
