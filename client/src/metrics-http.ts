/**
 * A tiny HTTP server for a Prometheus text (docs/operations.md, "Metrics"): GET /metrics answers what `render`
 * returns, anything else 404. node:http only: the metrics library stays with the part that renders (the agent and
 * the broker load prom-client only when their metrics port is set), so the SDK gains no dependency.
 */
import { MeshError } from '@edge-mesh/protocol';

/**
 * prom-client's default metrics export these gauges twice, with and without `_total`; `promtool check metrics`
 * reports the `_total` ones (only counters may end in `_total`). Each part removes them from its registry.
 */
export const PROMTOOL_REJECTED_DEFAULT_METRICS = [
  'nodejs_active_handles_total',
  'nodejs_active_requests_total',
  'nodejs_active_resources_total',
] as const;

export interface MetricsServerOptions {
  port: number;
  /** Default 127.0.0.1. */
  host?: string;
  render(): Promise<{ contentType: string; text: string }>;
  /** Called when a render fails (the scrape gets a 500). */
  onError?(err: unknown): void;
}

export interface MetricsServer {
  readonly port: number;
  /** `http://host:port/metrics`. */
  readonly url: string;
  close(): Promise<void>;
}

/** Listens; resolves once bound. A port that cannot be bound rejects with MESH_CONFIG. */
export async function serveMetrics(options: MetricsServerOptions): Promise<MetricsServer> {
  const { port, host = '127.0.0.1', render, onError } = options;
  // Loaded here, not at the top: every part imports the client layer, and only a metrics port needs node:http.
  const http = await import('node:http');
  const server = http.createServer((req, res) => {
    const path = (req.url ?? '').split('?')[0];
    if (req.method !== 'GET' || path !== '/metrics') {
      res.writeHead(404, { 'content-type': 'text/plain; charset=utf-8' }).end('not found\n');
      return;
    }
    render().then(
      ({ contentType, text }) => res.writeHead(200, { 'content-type': contentType }).end(text),
      (err: unknown) => {
        onError?.(err);
        res.writeHead(500, { 'content-type': 'text/plain; charset=utf-8' }).end('metrics failed\n');
      },
    );
  });
  server.keepAliveTimeout = 5_000;
  await new Promise<void>((resolve, reject) => {
    server.once('error', (err) =>
      reject(new MeshError('MESH_CONFIG', `metrics cannot listen on ${host}:${port}: ${err.message}`, { cause: err })),
    );
    server.listen(port, host, () => resolve());
  });
  const address = server.address();
  const bound = typeof address === 'object' && address ? address.port : port;
  let closing: Promise<void> | undefined;
  return {
    port: bound,
    url: `http://${host.includes(':') ? `[${host}]` : host}:${bound}/metrics`,
    close: () =>
      (closing ??= new Promise<void>((resolve) => {
        server.close(() => resolve());
        server.closeAllConnections();
      })),
  };
}
