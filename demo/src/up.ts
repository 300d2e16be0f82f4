/**
 * `edge-mesh up`: the whole local mesh on embedded defaults, each part in its own process as it would
 * be deployed (docs/operations.md, "The local mesh"): an authenticated broker (`edge-mesh broker`),
 * edge agents serving the real models from their npm packages (`edge-mesh agent`), a router with its
 * HTTP API (`edge-mesh router`), the firmware bridge (`edge-mesh bridge run`) with a simulated device
 * (`edge-mesh bridge sim-device`), and the sample app (`edge-mesh demo app`), plus a local chain that
 * pays for the requests (unless `chain: false`). The app asks the router for route leases and sends
 * straight to the agents; every tenth request goes through the router's KServe HTTP endpoint instead,
 * as a thin client's would.
 *
 * Start order, each step waiting for the previous one to report ready: chain, broker, admissions,
 * agents (each has published its signed status), router (its HTTP API lists every agent with every
 * model), bridge and device (HELLO answered), app (its SDK has seen every model on every agent). The
 * app sends only then. Stop order is the reverse, the app first so no request meets a stopping part.
 * A part that exits unexpectedly stops the run: `runUp` rejects naming it, after stopping the rest.
 *
 * Keys live in `<data>/keys/` (mode 0600), made on first run and reused: `operator.key`, one
 * `agent-N.key` per agent, `router.key`, `app.key` and `bridge.key`. The operator is the broker's
 * trusted operator and admits the others over MQTT (admissions are kept in `<data>/broker/`) before they
 * connect. Logs of the parts go to `<data>/logs/<part>.log`.
 */
import { rm, writeFile } from 'node:fs/promises';
import { createServer } from 'node:net';
import path from 'node:path';
import { agentLaunch } from '@edge-mesh/agent/launch';
import { ensureKeyFile, round, sendAdminRecord } from '@edge-mesh/client';
import { admit, type Identity, MeshError } from '@edge-mesh/protocol';
import type { Logger } from 'pino';
import { type BridgeDemoSummary, provisionDemoDevice } from './bridge-demo.ts';
import { MODEL_NAMES } from './models.ts';
import type {
  AgentReady,
  AgentSummary,
  AppReady,
  AppSummary,
  BridgeReady,
  BridgeStopSummary,
  BrokerReady,
  DeviceSummary,
  RouterReady,
  WarmupSummary,
} from './parts.ts';
import { ensurePipelineModelsFolder } from './pipeline-models.ts';
import { type Part, Supervisor } from './supervisor.ts';
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
  /** The sample app's HTTP share in JSON tensors instead of the binary tensor extension (default false). */
  httpJson?: boolean;
  /** Router HTTP API port (a busy port falls back to a free one; 0 for any free port). */
  routerPort: number;
  json: boolean;
  /** Start a local chain, fund the app's lanes, and pay and settle every request (default true). */
  chain?: boolean;
  /** `up`'s own log level: the parts' log lines at or above it are shown on stderr (all of them go to the log files). */
  logLevel?: string;
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
  /** The sample app's warm-up before its stream (one request of each model on each path), not counted above. */
  warmup: WarmupSummary;
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
  /** The firmware bridge with its simulated device. */
  bridge: BridgeDemoSummary | undefined;
  /** The process id of every part (broker, agent-1, …, router, bridge, device, app; chain unless --no-chain). */
  pids: Record<string, number>;
}

/** With the local chain (not `--no-chain`): receipts, owed_micros, settled_micros, settlement_txs. */
export type UpPaidSummary = UpSummary & Partial<UpSettlementSummary>;

export interface UpKeys {
  operator: Identity;
  agents: Identity[];
  router: Identity;
  app: Identity;
  bridge: Identity;
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
  const bridge = await ensureKeyFile(path.join(dir, 'bridge.key'), 'bridge', warn);
  return { operator, agents: agentKeys, router, app, bridge };
}

/** `agent-1 (agent-k3v9q0c2…)`: a short local label with the start of the key-derived id. */
export function agentLabel(name: string, id: string): string {
  return `${name} (${id.slice(0, 14)}…)`;
}

/** True when nothing listens on host:port (0 is always free). */
async function portIsFree(host: string, port: number): Promise<boolean> {
  if (port === 0) return true;
  return new Promise((resolve) => {
    const server = createServer();
    server.once('error', () => resolve(false));
    server.listen(port, host, () => server.close(() => resolve(true)));
  });
}

/** `port` when it is free, else 0 (any free port) with a warning. */
async function portOrFree(host: string, port: number, what: string, logger: Logger): Promise<number> {
  if (await portIsFree(host, port)) return port;
  logger.warn({ port }, `port ${port} is in use; ${what} takes a free port instead`);
  return 0;
}

/** The parts' log level: at least info, so the log files say what happened even when the terminal shows only warnings. */
function partLogLevel(level: string | undefined): string {
  return level === 'debug' || level === 'trace' ? level : 'info';
}

/**
 * Resolves once the router's HTTP API lists every agent as up with every model: the router has verified
 * their signed statuses and will give leases naming them.
 */
async function routerSeesAgents(
  httpUrl: string,
  authorization: string,
  agentIds: string[],
  models: string[],
  timeoutMs: number,
): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  let seen = '';
  for (;;) {
    try {
      const res = await fetch(`${httpUrl}/v1/agents`, { headers: { authorization }, signal: AbortSignal.timeout(2_000) });
      const body = (await res.json()) as { agents: { id: string; up: boolean; models: { name: string }[] }[] };
      const up = body.agents.filter((a) => a.up && models.every((m) => a.models.some((x) => x.name === m)));
      if (agentIds.every((id) => up.some((a) => a.id === id))) return;
      seen = `${up.length} of ${agentIds.length} agents with every model`;
    } catch (err) {
      seen = (err as Error).message;
    }
    if (Date.now() > deadline) {
      throw new MeshError('MESH_TIMEOUT', `the router did not see every agent within ${timeoutMs / 1000} s (${seen})`);
    }
    await new Promise((r) => setTimeout(r, 100));
  }
}

/** The router's counters from its HTTP API (`GET /v1/routing`). */
async function routerCounters(
  httpUrl: string,
  authorization: string,
): Promise<{ leases: number; requests: number; retries: number; hedges: number }> {
  const res = await fetch(`${httpUrl}/v1/routing`, { headers: { authorization }, signal: AbortSignal.timeout(5_000) });
  if (!res.ok) throw new MeshError('MESH_INTERNAL', `GET ${httpUrl}/v1/routing answered ${res.status}`);
  return ((await res.json()) as { counters: { leases: number; requests: number; retries: number; hedges: number } }).counters;
}

export async function runUp(options: UpOptions, stopSignal: Promise<void>): Promise<UpPaidSummary> {
  const { dataDir, logger, print } = options;
  const started = performance.now();
  // The chain starts (a few seconds) while the models, the keys and the broker get ready.
  const settlementP: Promise<UpSettlement | undefined> =
    options.chain === false ? Promise.resolve(undefined) : startUpSettlement({ dataDir, agents: options.agents, logger, print });
  settlementP.catch(() => {});
  const modelsDir = path.join(dataDir, 'models');
  const keyFile = (name: string) => path.join(dataDir, 'keys', `${name}.key`);
  let upAuthorization = '';
  const logDir = path.join(dataDir, 'logs');
  const supervisor = new Supervisor({ logDir, terminalLevel: options.logLevel ?? 'warn' });
  const partLevel = ['--log-level', partLogLevel(options.logLevel)];
  // Any way the run can end early: a part failing, or Ctrl-C before the mesh is up.
  const stopped = stopSignal.then(() => {
    throw new MeshError('MESH_CANCELLED', 'stopped before the mesh was up');
  });
  stopped.catch(() => {});
  const until = <T>(p: Promise<T>) => Promise.race([p, supervisor.failed, stopped]);

  let settlement: UpSettlement | undefined;
  let paid: UpSettlementSummary | undefined;
  let app: Part | undefined;
  let bridge: Part | undefined;
  let device: Part | undefined;
  const agents: Part[] = [];
  let brokerUrl = '';
  let routerReady: RouterReady | undefined;
  let bridgeReady: BridgeReady | undefined;
  let routing: Awaited<ReturnType<typeof routerCounters>> | undefined;
  let modelNames: string[] = [];
  let keys: UpKeys | undefined;
  try {
    // Every catalog model plus the pipelines' stages (docs/pipelines.md); the sample app sends to the catalog's.
    await until(ensurePipelineModelsFolder(modelsDir, { logger: { info: (m) => logger.info(m), warn: (m) => logger.warn(m) } }));
    modelNames = [...MODEL_NAMES];
    keys = await ensureUpKeys(dataDir, options.agents, logger);
    // The parts get their chain settings from `up` alone, never from chain variables set for this shell.
    const env = { MESH_EVM_KEY: undefined, MESH_RPC_URL: undefined, MESH_ESCROW: undefined, MESH_TOKEN: undefined };

    const brokerPort = await portOrFree(options.host, options.port, 'the local broker', logger);
    const broker = await supervisor.start({
      name: 'broker',
      args: [
        'broker',
        '--port',
        String(brokerPort),
        '--host',
        options.host,
        '--operator',
        keyFile('operator'),
        '--data',
        path.join(dataDir, 'broker'),
        ...partLevel,
      ],
      env,
    });
    brokerUrl = (await until(supervisor.ready<BrokerReady>(broker))).url;
    print(`broker (pid ${broker.pid}) listening on ${brokerUrl} (operator ${keys.operator.id}; keys in ${path.join(dataDir, 'keys')})`);
    // Admissions are idempotent: re-admitting on every start renews their expiry.
    const operator = keys.operator;
    for (const identity of [...keys.agents, keys.router, keys.app, keys.bridge]) {
      await until(sendAdminRecord(brokerUrl, operator, admit(operator, identity), identity.id, 10_000));
    }
    settlement = await until(settlementP);
    if (settlement) await until(settlement.registerAgents(keys.agents));

    // Each agent starts as a device's service would start it (docs/agent.md, "Launch settings").
    const launch = agentLaunch(process.env);
    for (const [i] of keys.agents.entries()) {
      const payment = settlement?.agentPayment(i);
      agents.push(
        await supervisor.start({
          name: `agent-${i + 1}`,
          args: [
            'agent',
            '--models',
            modelsDir,
            '--broker',
            brokerUrl,
            '--key',
            keyFile(`agent-${i + 1}`),
            '--workers',
            String(options.workers),
            ...(payment?.args ?? []),
            ...partLevel,
          ],
          env: { ...launch.env, ...env, ...payment?.env },
          nodeArgs: launch.nodeArgs,
        }),
      );
    }
    const agentsReady = await until(Promise.all(agents.map((a) => supervisor.ready<AgentReady>(a))));
    for (const [i, ready] of agentsReady.entries()) {
      const models = ready.models.map((m) => `${m.name} ${m.latencyMs.toFixed(2)} ms`).join(', ');
      print(`${agentLabel(agents[i]!.name, ready.id)} (pid ${agents[i]!.pid}) serving ${models}`);
    }

    const routerPort = await portOrFree(options.host, options.routerPort, "the router's HTTP API", logger);
    // The router's HTTP API asks for credentials (docs/security.md): fresh API keys each run, one for the sample
    // app's KServe requests (scope infer) and one for up's own reads of /v1/agents and /v1/routing (scope read).
    const { makeApiKey } = await import('@edge-mesh/router');
    const appHttp = makeApiKey('up-app', ['infer']);
    const upHttp = makeApiKey('up', ['read']);
    const apiKeysFile = path.join(dataDir, 'keys', 'http-api-keys.json');
    const appHttpKeyFile = path.join(dataDir, 'keys', 'app-http.key');
    await writeFile(apiKeysFile, JSON.stringify([appHttp.entry, upHttp.entry]), { mode: 0o600 });
    await writeFile(appHttpKeyFile, appHttp.key, { mode: 0o600 });
    upAuthorization = `Bearer ${upHttp.key}`;
    const router = await supervisor.start({
      name: 'router',
      args: [
        'router',
        '--broker',
        brokerUrl,
        '--key',
        keyFile('router'),
        '--http-port',
        String(routerPort),
        '--http-host',
        options.host,
        '--http-api-keys',
        apiKeysFile,
        '--pipelines',
        'wakeword,ocr',
        ...(settlement?.routerArgs() ?? []),
        ...partLevel,
      ],
      env,
    });
    routerReady = await until(supervisor.ready<RouterReady>(router));
    const routerUrl = routerReady.httpUrl!;
    await until(
      routerSeesAgents(
        routerUrl,
        upAuthorization,
        keys.agents.map((k) => k.id),
        modelNames,
        60_000,
      ),
    );
    const paidApi = settlement ? `, ${routerUrl}/v1/lanes, ${routerUrl}/v1/settlements` : '';
    print(
      `router ${routerReady.id} (pid ${router.pid}) serving ${routerUrl} (KServe v2: ${routerUrl}/v2/models/kws; operators: ${routerUrl}/v1/agents${paidApi}, ${routerUrl}/metrics)`,
    );

    // The bridge and its device are up before the app sends, so their start-up never meets its first requests.
    const registryDir = path.join(dataDir, 'bridge-run', 'devices');
    const record = await until(provisionDemoDevice(registryDir));
    bridge = await supervisor.start({
      name: 'bridge',
      args: [
        'bridge',
        'run',
        '--broker',
        brokerUrl,
        '--key',
        keyFile('bridge'),
        '--registry',
        registryDir,
        '--udp-host',
        '127.0.0.1',
        '--udp-port',
        '0',
        '--models',
        'kws',
        ...partLevel,
      ],
      env,
    });
    bridgeReady = await until(supervisor.ready<BridgeReady>(bridge));
    device = await supervisor.start({
      name: 'device',
      args: [
        'bridge',
        'sim-device',
        '--host',
        bridgeReady.udp!.host,
        '--port',
        String(bridgeReady.udp!.port),
        '--device-id',
        String(record.deviceId),
        '--rate',
        '5',
      ],
      env: { ...env, FB_DEVICE_KEY: record.key },
    });
    await until(supervisor.ready(device));
    print(
      `firmware bridge ${bridgeReady.id.slice(0, 14)}… (pid ${bridge.pid}) on udp://${bridgeReady.udp!.host}:${bridgeReady.udp!.port}, serving simulated device ${record.longId} (pid ${device.pid})`,
    );

    const payment = settlement?.appPayment();
    const labels = keys.agents.flatMap((k, i) => ['--label', `${k.id}=${agentLabel(`agent-${i + 1}`, k.id)}`]);
    app = await supervisor.start({
      name: 'app',
      args: [
        'demo',
        'app',
        '--broker',
        brokerUrl,
        '--key',
        keyFile('app'),
        '--router',
        routerReady.id,
        '--http',
        routerUrl,
        '--http-api-key-file',
        appHttpKeyFile,
        '--models',
        modelNames.join(','),
        '--agents',
        String(options.agents),
        '--rate',
        String(options.ratePerS),
        '--report-every',
        String(options.reportEveryS),
        ...(options.httpJson ? ['--http-json'] : []),
        ...labels,
        ...(payment?.args ?? []),
        ...partLevel,
      ],
      env: { ...env, ...payment?.env },
      // Its reports are the tables of `up`.
      onStdoutLine: print,
    });
    await until(supervisor.ready<AppReady>(app));
    print(
      `sample app (pid ${app.pid}) sending ${options.ratePerS} requests/s over ${modelNames.join(', ')}; logs in ${logDir}; Ctrl-C stops`,
    );

    const timeout =
      options.durationS === undefined ? new Promise<void>(() => {}) : new Promise<void>((r) => setTimeout(r, options.durationS! * 1000));
    await Promise.race([stopSignal, timeout, supervisor.failed]);
    print('stopping: waiting for outstanding requests');
    await supervisor.stop(app, 30_000);
    routing = await routerCounters(routerUrl, upAuthorization).catch((err: unknown) => {
      logger.warn({ err: (err as Error).message }, 'could not read the routing counters');
      return undefined;
    });
    await supervisor.stop(device);
    await supervisor.stop(bridge);
    await supervisor.stop(router);
    // The agents drain, and settle what they hold on chain as they stop.
    await Promise.all(agents.map((a) => supervisor.stop(a, 30_000)));
    await supervisor.stop(broker);
  } finally {
    await supervisor.stopAll();
    await rm(path.join(dataDir, 'bridge-run'), { recursive: true, force: true });
    if (settlement) {
      paid = await settlement.summary(agents.map((a) => a.summary as AgentSummary | undefined)).catch((err: unknown) => {
        logger.warn({ err: (err as Error).message }, 'could not read the settlement figures');
        return undefined;
      });
      await settlement.close();
    } else {
      await settlementP.then((s) => s?.close()).catch(() => {});
    }
  }

  // A part that failed while the others were being stopped still fails the run.
  if (supervisor.failure) throw supervisor.failure;
  const appSummary = app?.summary as AppSummary | undefined;
  if (!appSummary) throw new MeshError('MESH_INTERNAL', `the sample app (pid ${app?.pid}) stopped without its summary`);
  const names = new Map(keys!.agents.map((k, i) => [k.id, `agent-${i + 1}`]));
  const perAgent: UpSummary['per_agent'] = {};
  for (const [id, s] of Object.entries(appSummary.per_agent)) perAgent[id] = { name: names.get(id) ?? id, ...s };
  const bridgeSummary = bridge?.summary as BridgeStopSummary | undefined;
  const pids: Record<string, number> = {};
  if (settlement) pids.chain = settlement.chain.pid;
  for (const part of supervisor.parts) pids[part.name] = part.pid;
  return {
    requests: appSummary.requests,
    ok: appSummary.ok,
    errors: appSummary.errors,
    agents: agents.length,
    models: appSummary.models,
    per_agent: perAgent,
    error_codes: appSummary.error_codes,
    warmup: appSummary.warmup,
    routing: {
      router: routerReady!.id,
      http_url: routerReady!.httpUrl ?? '',
      paths: appSummary.paths,
      leases_given: routing?.leases ?? 0,
      forwarded: routing?.requests ?? 0,
      retries: routing?.retries ?? 0,
      hedges: routing?.hedges ?? 0,
    },
    duration_s: round((performance.now() - started) / 1000, 1),
    broker_url: brokerUrl,
    bridge: bridgeSummary && {
      devices: bridgeReady?.devices ?? 0,
      ...bridgeSummary,
      device: device?.summary as DeviceSummary | undefined,
    },
    pids,
    ...(paid ?? {}),
  };
}
