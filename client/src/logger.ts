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
