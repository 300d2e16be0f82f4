/**
 * The broker's Prometheus metrics (docs/operations.md, "Metrics"), loaded only with `metricsPort`: connections,
 * refused CONNECTs by reason and code, refused PUBLISHes and SUBSCRIBEs, bans and address limits, messages and bytes
 * in and out, and prom-client's process metrics. The numbers live in ./counters.ts; this module only reads them.
 */
import { PROMTOOL_REJECTED_DEFAULT_METRICS, serveMetrics } from '@edge-mesh/client';
import type { Logger } from 'pino';
import { Counter, collectDefaultMetrics, Gauge, Registry } from 'prom-client';
import type { BrokerCounters } from './counters.ts';

export interface BrokerMetricsSources {
  counters: BrokerCounters;
  connections(): number;
  /** Bytes read and written by sockets still open. */
  liveBytes(): { read: number; written: number };
  logger: Logger;
}

/** Starts the metrics server; resolves with it once bound (rejects with MESH_CONFIG when the port cannot be bound). */
export async function serveBrokerMetrics(sources: BrokerMetricsSources, port: number, host: string) {
  const { counters, logger } = sources;
  const registry = new Registry();
  collectDefaultMetrics({ register: registry });
  for (const name of PROMTOOL_REJECTED_DEFAULT_METRICS) registry.removeSingleMetric(name);
  const total = (name: string, help: string, read: () => number) =>
    new Counter({
      name,
      help,
      registers: [registry],
      collect() {
        this.reset();
        this.inc(read());
      },
    });
  new Gauge({
    name: 'edge_mesh_broker_connections',
    help: 'MQTT clients that completed CONNECT and are connected',
    registers: [registry],
    collect() {
      this.set(sources.connections());
    },
  });
  new Counter({
    name: 'edge_mesh_broker_connect_refusals_total',
    help: 'Refused CONNECTs by reason (auth failures, limits, policy) and MESH_* code',
    labelNames: ['reason', 'code'] as const,
    registers: [registry],
    collect() {
      this.reset();
      for (const [key, n] of counters.connectRefused) {
        const [reason = 'other', code = 'other'] = key.split('|');
        this.inc({ reason, code }, n);
      }
    },
  });
  for (const [name, help, map] of [
    ['edge_mesh_broker_publish_refusals_total', 'Refused PUBLISHes (topic policy, ACL, rate) by MESH_* code', counters.publishRefused],
    ['edge_mesh_broker_subscribe_refusals_total', 'Refused SUBSCRIBE filters by MESH_* code', counters.subscribeRefused],
  ] as const) {
    new Counter({
      name,
      help,
      labelNames: ['code'] as const,
      registers: [registry],
      collect() {
        this.reset();
        for (const [code, n] of map) this.inc({ code }, n);
      },
    });
  }
  total(
    'edge_mesh_broker_client_bans_total',
    'Bans of an (admitted id, address) pair after a burst of failed CONNECT tokens',
    () => counters.clientBans,
  );
  total(
    'edge_mesh_broker_address_limits_total',
    'Addresses limited after a storm of refused CONNECTs naming no admitted id',
    () => counters.addressLimits,
  );
  total('edge_mesh_broker_messages_received_total', 'PUBLISH packets accepted from clients', () => counters.messagesIn);
  total('edge_mesh_broker_messages_sent_total', 'Messages forwarded to subscribers', () => counters.messagesOut);
  total(
    'edge_mesh_broker_messages_dropped_slow_total',
    'QoS 0 messages not forwarded to a subscriber whose socket was not draining',
    () => counters.messagesDroppedSlow,
  );
  total(
    'edge_mesh_broker_slow_consumers_total',
    'Clients disconnected for a socket that did not drain in time',
    () => counters.slowConsumers,
  );
  total(
    'edge_mesh_broker_received_bytes_total',
    'Bytes read from client sockets (TLS included)',
    () => counters.bytesInClosed + sources.liveBytes().read,
  );
  total(
    'edge_mesh_broker_sent_bytes_total',
    'Bytes written to client sockets (TLS included)',
    () => counters.bytesOutClosed + sources.liveBytes().written,
  );
  return serveMetrics({
    port,
    host,
    render: async () => ({ contentType: registry.contentType, text: await registry.metrics() }),
    onError: (err) => logger.warn({ err: (err as Error).message }, 'metrics render failed'),
  });
}
