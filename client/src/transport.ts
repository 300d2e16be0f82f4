/** Connection rules every mesh client follows (pure: no sockets here). */

/** MQTT 3.1.1: aedes 1.2 refuses v5, and request/reply addressing lives in topics and payloads anyway. */
export const MQTT_PROTOCOL_VERSION = 4;

export interface BackoffOptions {
  baseMs?: number;
  maxMs?: number;
}

/**
 * Delay before reconnect attempt `attempt` (0-based): exponential up to `maxMs`, with the upper half
 * jittered so a fleet that lost its broker does not reconnect in lock step. The first retry comes within
 * 100 ms and the cap is 1 s, so a client is back at most about a second after its broker is
 * (docs/operations.md, "Recovery").
 */
export function reconnectDelayMs(attempt: number, { baseMs = 100, maxMs = 1_000 }: BackoffOptions = {}, random = Math.random): number {
  const ceiling = Math.min(maxMs, baseMs * 2 ** Math.min(attempt, 30));
  return Math.round(ceiling / 2 + random() * (ceiling / 2));
}
