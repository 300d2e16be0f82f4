/**
 * `edge-mesh up`: the whole local mesh in one process on embedded defaults: an authenticated aedes
 * broker, edge agents serving the real models from their npm packages, a router with its HTTP API,
 * and the sample app. The app asks the router for route leases and sends straight to the agents;
 * every tenth request goes through the router's KServe HTTP endpoint instead, as a thin client's would.
 *
 * Keys live in `<data>/keys/` (mode 0600), made on first run and reused: `operator.key`, one
 * `agent-N.key` per agent, `router.key` and `app.key`. The operator is the broker's trusted operator
 * and admits the agents, the router and the app (admissions are kept in `<data>/broker/`) before they connect.
 */
import path from 'node:path';
import { type AgentHandle, startAgent } from '@edge-mesh/agent';
import { type BrokerOptions, startBroker } from '@edge-mesh/broker';
import { ensureKeyFile, round } from '@edge-mesh/client';
import { admit, type Identity } from '@edge-mesh/protocol';
import { type RouterHandle, startRouter } from '@edge-mesh/router';
import { connect, type Mesh } from '@edge-mesh/sdk';
import type { Logger } from 'pino';
import { type BridgeDemo, type BridgeDemoSummary, startBridgeDemo } from './bridge-demo.ts';
import { kserveInfer } from './kserve-client.ts';
import { ensureModelsFolder } from './models.ts';
import { SampleApp } from './sample-app.ts';
import { startUpSettlement, type UpSettlement, type UpSettlementSummary } from './up-settlement.ts';

export interface UpOptions {
  dataDir: string;
  port: number;
  host: string;
  agents: number;
  workers: number;
  ratePerS: number;
  durationS: number | undefined;
  reportEveryS: number;
  /** Router HTTP API port (a busy port falls back to a free one; 0 for any free port). */
  routerPort: number;
  json: boolean;
  /** Start a local chain, fund the app's lanes, and pay and settle every request (default true). */
  chain?: boolean;
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
  /** Keyed by agent id; `name` is its local label (agent-1, agent-2, …). */
  per_agent: Record<string, { name: string; requests: number; p50_ms: number | null; p99_ms: number | null }>;
  error_codes: Record<string, number>;
  /** How requests were routed: by the router's leases (SDK direct), by the SDK alone, or forwarded by the router over HTTP. */
  routing: {
    router: string;
    http_url: string;
    paths: Record<string, number>;
    leases_given: number;
    forwarded: number;
    retries: number;
    hedges: number;
  };
  duration_s: number;
  broker_url: string;
  /** The firmware bridge with its simulated device (bridge-demo.ts). */
  bridge: BridgeDemoSummary | undefined;
}

/** With the local chain (not `--no-chain`): receipts, owed_micros, settled_micros, settlement_txs. */
export type UpPaidSummary = UpSummary & Partial<UpSettlementSummary>;

/**
 * Starts a listener on `port`; when that port is taken (and was not 0), warns and starts it on a free
 * port instead. The address-in-use error may sit on the error itself or on its cause.
 */
async function onPortOrFree<T>(port: number, start: (port: number) => Promise<T>, what: string, logger: Logger): Promise<T> {
  try {
    return await start(port);
  } catch (err) {
    const cause = (err as { cause?: NodeJS.ErrnoException }).cause ?? (err as NodeJS.ErrnoException);
    if (((err as NodeJS.ErrnoException).code !== 'EADDRINUSE' && cause.code !== 'EADDRINUSE') || port === 0) throw err;
    logger.warn({ port }, `port ${port} is in use; ${what} takes a free port instead`);
    return start(0);
  }
}

export interface UpKeys {
  operator: Identity;
  agents: Identity[];
  router: Identity;
  app: Identity;
}

/** The local mesh's keys in `<dataDir>/keys/`, made (0600) on first run and reused after. */
export async function ensureUpKeys(dataDir: string, agents: number, logger: Logger): Promise<UpKeys> {
  const dir = path.join(dataDir, 'keys');
  const warn = { warn: (message: string) => logger.warn(message) };
  const operator = await ensureKeyFile(path.join(dir, 'operator.key'), 'operator', warn);
  const agentKeys: Identity[] = [];
  for (let i = 1; i <= agents; i++) agentKeys.push(await ensureKeyFile(path.join(dir, `agent-${i}.key`), 'agent', warn));
  const router = await ensureKeyFile(path.join(dir, 'router.key'), 'router', warn);
  const app = await ensureKeyFile(path.join(dir, 'app.key'), 'app', warn);
  return { operator, agents: agentKeys, router, app };
}

/** `agent-1 (agent-k3v9q0c2…)`: a short local label with the start of the key-derived id. */
export function agentLabel(name: string, id: string): string {
  return `${name} (${id.slice(0, 14)}…)`;
}

/** The router with its HTTP API on `routerPort`, or on a free port when that one is taken. */
async function startRouterOn(
  brokerUrl: string,
  identity: Identity,
  options: UpOptions,
  logger: Logger,
  settlement?: UpSettlement,
): Promise<RouterHandle> {
  const chain = settlement
    ? { provider: settlement.chain.provider, escrow: settlement.deployment.escrow, fromBlock: settlement.deployment.deployBlock }
    : undefined;
  const start = (port: number) =>
    startRouter({
      brokerUrl,
      identity,
      logger: logger.child({ part: 'router' }),
      http: { port, host: options.host, ...(chain ? { chain } : {}) },
    });
  return onPortOrFree(options.routerPort, start, "the router's HTTP API", logger);
}

export async function runUp(options: UpOptions, stopSignal: Promise<void>): Promise<UpPaidSummary> {
  const { dataDir, logger, print } = options;
  const started = performance.now();
  // The chain starts (a few seconds) while the models and the broker get ready.
  const settlementP: Promise<UpSettlement | undefined> =
    options.chain === false ? Promise.resolve(undefined) : startUpSettlement({ dataDir, agents: options.agents, logger, print });
  settlementP.catch(() => {});
  const modelsDir = path.join(dataDir, 'models');
  const manifest = await ensureModelsFolder(modelsDir, { logger: { info: (m) => logger.info(m), warn: (m) => logger.warn(m) } });
  const modelNames = manifest.models.map((m) => m.name);

  const keys = await ensureUpKeys(dataDir, options.agents, logger);
  const brokerOptions: BrokerOptions = {
    host: options.host,
    logger,
    auth: { trustedOperators: [{ id: keys.operator.id, publicKey: keys.operator.publicKey }], dataDir: path.join(dataDir, 'broker') },
  };
  const broker = await onPortOrFree(options.port, (port) => startBroker({ ...brokerOptions, port }), 'the local broker', logger);
  const names = new Map(keys.agents.map((k, i) => [k.id, `agent-${i + 1}`]));
  const label = (id: string) => agentLabel(names.get(id) ?? id, id);
  const agents: AgentHandle[] = [];
  let mesh: Mesh | undefined;
  let router: RouterHandle | undefined;
  let app: SampleApp | undefined;
  let reporter: NodeJS.Timeout | undefined;
  let bridgeDemo: BridgeDemo | undefined;
  let settlement: UpSettlement | undefined;
  let paid: UpSettlementSummary | undefined;
  try {
    settlement = await settlementP;
    print(`broker listening on ${broker.url} (operator ${keys.operator.id}; keys in ${path.join(dataDir, 'keys')})`);
    // Admissions are idempotent: re-admitting on every start renews their expiry.
    for (const identity of [...keys.agents, keys.router, keys.app]) await broker.admit(admit(keys.operator, identity));
    for (const [i, identity] of keys.agents.entries()) {
      agents.push(
        await startAgent({
          brokerUrl: broker.url,
          modelsDir,
          identity,
          workers: options.workers,
          logger,
          ...(settlement ? { payment: settlement.agentPayment(i) } : {}),
        }),
      );
    }
    for (const agent of agents) {
      const models = agent.models.map((m) => `${m.name} ${m.latencyMs.toFixed(2)} ms`).join(', ');
      print(`${label(agent.id)} serving ${models}`);
    }
    router = await startRouterOn(broker.url, keys.router, options, logger, settlement);
    const routerUrl = router.http!.url;
    const paidApi = settlement ? `, ${routerUrl}/v1/lanes, ${routerUrl}/v1/settlements` : '';
    print(
      `router ${router.id} serving ${routerUrl} (KServe v2: ${routerUrl}/v2/models/kws; operators: ${routerUrl}/v1/agents${paidApi}, ${routerUrl}/metrics)`,
    );
    mesh = await connect({
      brokerUrl: broker.url,
      identity: keys.app,
      logger,
      router: router.id,
      ...(settlement ? { payment: settlement.sdkPayment() } : {}),
    });
    for (const model of modelNames) {
      await mesh.waitForModel(model, 10_000, agents.length);
      await router.waitForModel(model, 10_000, agents.length);
    }
    app = new SampleApp({
      mesh,
      models: modelNames,
      ratePerS: options.ratePerS,
      logger,
      agentLabel: label,
      thinClient: { name: 'http', every: 10, infer: (model, inputs, deadlineMs) => kserveInfer(routerUrl, model, inputs, deadlineMs) },
    });
    // The bridge and its device process start first: their start-up work would otherwise stall the app's first requests.
    bridgeDemo = await startBridgeDemo({
      brokerUrl: broker.url,
      operator: keys.operator,
      admit: (r) => broker.admit(r),
      dataDir,
      logger,
      print,
    });
    print(`sample app sending ${options.ratePerS} requests/s over ${modelNames.join(', ')}; Ctrl-C stops`);
    app.start();
    const runningApp = app;
    reporter = setInterval(() => print(runningApp.report()), options.reportEveryS * 1000);
    const timeout =
      options.durationS === undefined ? new Promise<void>(() => {}) : new Promise<void>((r) => setTimeout(r, options.durationS! * 1000));
    await Promise.race([stopSignal, timeout]);
    print('stopping: waiting for outstanding requests');
    clearInterval(reporter);
    await app.stop();
    print(app.report());
  } finally {
    if (reporter) clearInterval(reporter);
    await bridgeDemo?.stop();
    await app?.stop();
    await mesh?.close();
    await router?.close();
    await Promise.all(agents.map((a) => a.drain(5_000)));
    await broker.close();
    if (settlement) {
      // The agents settled what they held when they stopped; read what the chain paid.
      paid = await settlement.summary(agents).catch((err: unknown) => {
        logger.warn({ err: (err as Error).message }, 'could not read the settlement figures');
        return undefined;
      });
      await settlement.close();
    } else {
      await settlementP.then((s) => s?.close()).catch(() => {});
    }
  }

  const totals = app!.totals();
  const models: UpSummary['models'] = {};
  for (const [name, t] of app!.byModel.byKey) {
    const s = t.total();
    models[name] = { requests: s.requests, p50_ms: s.p50_ms, p99_ms: s.p99_ms };
  }
  const perAgent: UpSummary['per_agent'] = {};
  for (const [id, t] of app!.byAgent.byKey) {
    const s = t.total();
    perAgent[id] = { name: names.get(id) ?? id, requests: s.requests, p50_ms: s.p50_ms, p99_ms: s.p99_ms };
  }
  return {
    ...totals,
    agents: agents.length,
    models,
    per_agent: perAgent,
    error_codes: app!.errorCodes,
    routing: {
      router: router!.id,
      http_url: router!.http?.url ?? '',
      paths: app!.paths,
      leases_given: router!.counters.leases,
      forwarded: router!.counters.requests,
      retries: router!.counters.retries,
      hedges: router!.counters.hedges,
    },
    duration_s: round((performance.now() - started) / 1000, 1),
    broker_url: broker.url,
    bridge: bridgeDemo?.summary(),
    ...(paid ?? {}),
  };
}
