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

/** The MQTT engines the mesh runs on: its own broker, and the external engines docs/operations.md describes. */
export const BROKER_ENGINES = ['mesh', 'mosquitto', 'rabbitmq', 'nats'] as const;
export type BrokerEngine = (typeof BROKER_ENGINES)[number];

/** The settings an engine wants different from the mesh's defaults (see engineDefaults). */
export interface EngineDefaults {
  subscriptionQos?: 0;
  publishQos?: 0;
  /** Agents only. */
  retainStatus?: false;
  /** Agents only. */
  standbyConnection?: true;
}

/**
 * What `engine` wants different from the mesh's defaults, for `part` (the CLI's `--engine`; docs/operations.md,
 * "Running on a NATS cluster" and "Running on RabbitMQ"). On NATS 2.9 a QoS 1 subscription is a JetStream consumer
 * and a QoS 1 or retained PUBLISH is stored in JetStream from the connection's read loop, so everything goes at QoS 0
 * and an agent's status unretained; a reconnect waits for JetStream's leaders after a node's death, so agents keep a
 * standby connection. On RabbitMQ 3.10 a QoS 1 subscription is a durable queue on the node the client is connected
 * to: once that node dies, no other node lets the same client id subscribe again until it is back, so subscriptions
 * go at QoS 0 (a non-durable queue, gone with its node). mosquitto and the mesh's broker want nothing different.
 * Spread it under your own options: `connect({ ...engineDefaults('nats', 'client'), brokerUrl })`.
 */
export function engineDefaults(engine: BrokerEngine, part: 'agent' | 'client'): EngineDefaults {
  if (engine === 'rabbitmq') return { subscriptionQos: 0 };
  if (engine !== 'nats') return {};
  return part === 'agent'
    ? { subscriptionQos: 0, publishQos: 0, retainStatus: false, standbyConnection: true }
    : { subscriptionQos: 0, publishQos: 0 };
}
