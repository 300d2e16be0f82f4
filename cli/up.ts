/**
 * `edge-mesh up`: the whole local mesh in one process on embedded defaults: an aedes broker, edge
 * agents serving the real models from their npm packages, and the sample app.
 */
import path from 'node:path';
import type { Logger } from 'pino';
import { startBroker, type BrokerHandle } from '../broker/index.ts';
import { startAgent, type AgentHandle } from '../edge-agent/index.ts';
import { round } from '../protocol/index.ts';
import { connect, type Mesh } from '../sdk/index.ts';
import { ensureModelsFolder } from './models.ts';
import { SampleApp } from './sample-app.ts';

export interface UpOptions {
  dataDir: string;
  port: number;
  host: string;
  agents: number;
  workers: number;
  ratePerS: number;
  durationS: number | undefined;
  reportEveryS: number;
  json: boolean;
  logger: Logger;
  /** Where human-readable progress goes. */
  print: (line: string) => void;
}

export interface UpSummary {
  requests: number;
  ok: number;
  errors: number;
  agents: number;
  models: Record<string, { requests: number; p50_ms: number | null; p99_ms: number | null }>;
  per_agent: Record<string, { requests: number; p50_ms: number | null; p99_ms: number | null }>;
  error_codes: Record<string, number>;
  duration_s: number;
  broker_url: string;
}

async function listen(port: number, host: string, logger: Logger): Promise<BrokerHandle> {
  try {
    return await startBroker({ port, host, logger });
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== 'EADDRINUSE' || port === 0) throw err;
    logger.warn({ port }, `port ${port} is in use; the local broker takes a free port instead`);
    return startBroker({ port: 0, host, logger });
  }
}

export async function runUp(options: UpOptions, stopSignal: Promise<void>): Promise<UpSummary> {
  const { dataDir, logger, print } = options;
  const started = performance.now();
  const modelsDir = path.join(dataDir, 'models');
  const manifest = await ensureModelsFolder(modelsDir, { logger: { info: (m) => logger.info(m), warn: (m) => logger.warn(m) } });
  const modelNames = manifest.models.map((m) => m.name);

  const broker = await listen(options.port, options.host, logger);
  const agents: AgentHandle[] = [];
  let mesh: Mesh | undefined;
  let app: SampleApp | undefined;
  let reporter: NodeJS.Timeout | undefined;
  try {
    print(`broker listening on ${broker.url}`);
    for (let i = 1; i <= options.agents; i++) {
      agents.push(await startAgent({ brokerUrl: broker.url, modelsDir, agentId: `agent-${i}`, workers: options.workers, logger }));
    }
    for (const agent of agents) {
      const models = agent.models.map((m) => `${m.name} ${m.latencyMs.toFixed(2)} ms`).join(', ');
      print(`${agent.id} serving ${models}`);
    }
    mesh = await connect({ brokerUrl: broker.url, clientId: 'sample-app', logger });
    for (const model of modelNames) await mesh.waitForModel(model, 10_000, agents.length);
    app = new SampleApp({ mesh, models: modelNames, ratePerS: options.ratePerS, logger });
    print(`sample app sending ${options.ratePerS} requests/s over ${modelNames.join(', ')}; Ctrl-C stops`);
    app.start();
    const runningApp = app;
    reporter = setInterval(() => print(runningApp.report()), options.reportEveryS * 1000);
    const timeout = options.durationS === undefined ? new Promise<void>(() => {}) : new Promise<void>((r) => setTimeout(r, options.durationS! * 1000));
    await Promise.race([stopSignal, timeout]);
    print('stopping: waiting for outstanding requests');
    clearInterval(reporter);
    await app.stop();
    print(app.report());
  } finally {
    if (reporter) clearInterval(reporter);
    await app?.stop();
    await mesh?.close();
    await Promise.all(agents.map((a) => a.drain(5_000)));
    await broker.close();
  }

  const totals = app!.totals();
  const models: UpSummary['models'] = {};
  for (const [name, t] of app!.byModel.byKey) {
    const s = t.total();
    models[name] = { requests: s.requests, p50_ms: s.p50_ms, p99_ms: s.p99_ms };
  }
  const perAgent: UpSummary['per_agent'] = {};
  for (const [name, t] of app!.byAgent.byKey) {
    const s = t.total();
    perAgent[name] = { requests: s.requests, p50_ms: s.p50_ms, p99_ms: s.p99_ms };
  }
  return {
    ...totals,
    agents: agents.length,
    models,
    per_agent: perAgent,
    error_codes: app!.errorCodes,
    duration_s: round((performance.now() - started) / 1000, 1),
    broker_url: broker.url,
  };
}
