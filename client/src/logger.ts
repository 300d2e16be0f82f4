/**
 * The logger every part takes: the four pino methods it calls, so a pino logger fits as it is and a
 * library user is not made to install one. Log fields first, then a short message.
 */
export interface MeshLogger {
  debug(fields: object, message?: string): void;
  info(fields: object, message?: string): void;
  warn(fields: object, message?: string): void;
  error(fields: object, message?: string): void;
  /** pino's child loggers; parts add their own fields (part, id) when the logger has it. */
  child?(bindings: Record<string, unknown>): MeshLogger;
}

const nothing = (): void => {};

/** Logs nothing: the default of every library front door. */
export const SILENT_LOGGER: MeshLogger = { debug: nothing, info: nothing, warn: nothing, error: nothing };

/** `logger.child(bindings)` when the logger has children, else the logger itself. */
export function childLogger(logger: MeshLogger | undefined, bindings: Record<string, unknown>): MeshLogger {
  if (!logger) return SILENT_LOGGER;
  return logger.child ? logger.child(bindings) : logger;
}

/** A warning that a flood from one source must not repeat: `key` names the source and the event. */
export type WarnThrottled = (key: string, fields: object, message: string) => void;

/**
 * Warns once per `key` per second at most; the repeats go to debug with the same fields and message. The broker keys
 * by address and reason, the agent by sender and event: a stranger sending thousands of refused messages a second
 * writes one warning a second, not thousands, and the log keeps room for everyone else's.
 */
export function throttledWarn(log: MeshLogger): WarnThrottled {
  const lastWarn = new Map<string, number>();
  return (key, fields, message) => {
    const now = Date.now();
    const last = lastWarn.get(key);
    if (last !== undefined && now - last < 1000) {
      log.debug(fields, message);
      return;
    }
    if (lastWarn.size > 10_000) lastWarn.clear();
    lastWarn.set(key, now);
    log.warn(fields, message);
  };
}
