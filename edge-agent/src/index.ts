/**
 * The edge agent: loads the ONNX models of a folder, announces them in a status it signs, and
 * serves inference requests over MQTT, from a worker-thread pool or, for tiny fixed-shape models, on
 * its main thread ("inline").
 *
 *   const identity = parseKeyFile(await readFile('agent.key', 'utf8'));
 *   const agent = await startAgent({ brokerUrl: 'mqtt://127.0.0.1:1883', modelsDir: './models', identity });
 *   ...
 *   await agent.drain();   // finish queued and running work, then go offline
 *
 * `startAgent` is the wiring of the agent's modules (docs/agent.md):
 *   options.ts     defaults and checks of AgentOptions
 *   models.ts      sha256 checks, execution providers, model descriptions, input checks
 *   executors.ts   where each model runs: inline (inline.ts) or on the worker pool
 *   pool.ts        worker threads holding the onnxruntime sessions (worker.mjs)
 *   inline.ts      sessions on the main thread for tiny fixed-shape models, loaded only when used
 *   scheduler.ts   per-model bounded queues, earliest deadline first per executor
 *   requests.ts    decode, replay check, validation, payer admission, queueing, replies and receipts
 *   status.ts      the signed status, the will, the heartbeat's load reports
 *   connection.ts  the MQTT link: subscriptions, topic routing, announcements, replies
 *   paid.ts        payments and settlement, loaded only when the agent takes payment
 *                  (payments.ts: grants, journal, credit rule; lane-funds.ts: the escrow's view of the lanes)
 */
import path from 'node:path';
import type { ModelInfo } from '@edge-mesh/protocol';
import pino from 'pino';
import { AgentLink } from './connection.ts';
import { AgentDeployments, promotedEntries } from './deploy.ts';
import { type Executors, openExecutors, openExecutorsEach } from './executors.ts';
import { Faults } from './faults.ts';
import { readManifest } from './manifest.ts';
import type { AgentMetrics } from './metrics.ts';
import { availableProviders, describeModels, hardwareSummary, verifyModels } from './models.ts';
import { resolveOptions } from './options.ts';
import { closePaidSide, openPaidSide, type PaidSide, paymentsView } from './paid.ts';
import { type ReloadResult, reloadModelsFolder, type ServedModels } from './reload.ts';
import { AgentRequests, ReplayGuard } from './requests.ts';
import { Scheduler } from './scheduler.ts';
import { Heartbeat, loadReport, StatusBoard } from './status.ts';
import { type AgentHandle, type AgentOptions, newAgentCounters } from './types.ts';

export { type BrokerEngine, engineDefaults } from '@edge-mesh/client';
export type { AgentDeployOptions, DeployEvent } from './deploy.ts';
export { parseAgentFaults } from './faults.ts';
export { type Confirmations, defaultConfirmations, type FundsCheckpoint, type LaneFundsView, parseConfirmations } from './lane-funds.ts';
export { MANIFEST_FILE, type Manifest, type ManifestEntry, readManifest, sha256File } from './manifest.ts';
export {
  checkConfigAgainstModel,
  type ModelSource,
  parseTextProto,
  readModelSource,
  readTritonConfig,
  type TritonConfig,
  type TritonTensor,
} from './model-source.ts';
export { availableProviders } from './models.ts';
export { type DeclaredInput, declaredInputs } from './onnx-inputs.ts';
export type { AgentPaymentOptions, LaneSummary } from './payments.ts';
export type { ReloadResult } from './reload.ts';
export type { SettlementRecord, SettlerCounters, SettlerOptions } from './settler.ts';
export { AGENT_VERSION } from './status.ts';
export type { AgentCounters, AgentFaults, AgentHandle, AgentOptions } from './types.ts';

export async function startAgent(options: AgentOptions): Promise<AgentHandle> {
  const o = resolveOptions(options);
  const { identity, agentId, modelsDir } = o;
  const logger = (options.logger ?? pino({ level: 'info' })).child({ part: 'agent', agentId });
  if (o.ephemeral) logger.info({ agentId }, 'no key given: using an ephemeral agent identity, which only an open broker accepts');
  const readyStarted = performance.now();
  const manifest = await readManifest(modelsDir);
  let entries = await verifyModels(modelsDir, manifest.models, logger);
  const providerList = availableProviders(o.providers, logger);
  // A version promoted by a signed deployment replaces the folder's (deploy.ts): a restart keeps what was announced.
  let deployedPaths = new Map<string, string>();
  if (options.deploy) ({ entries, paths: deployedPaths } = await promotedEntries(options.deploy.stateDir, entries, logger));

  const specs = entries.map((e) => ({
    name: e.name,
    path: deployedPaths.get(e.name) ?? path.join(modelsDir, e.file),
    providers: providerList,
    warmup: e.warmup,
  }));
  // With a memory budget each model gets executors of its own, so evicting one frees its memory (deploy.ts).
  let executorsOf: Map<string, Executors> | undefined;
  let executors: Executors;
  if (options.deploy?.memoryBudgetMb !== undefined) {
    const opened = await openExecutorsEach(specs, o, logger);
    executors = opened.all;
    executorsOf = opened.each;
  } else executors = await openExecutors(specs, o, logger);
  const { loaded } = executors;
  const loadedByName = new Map(loaded.map((m) => [m.name, m]));
  let modelInfos: ModelInfo[];
  try {
    modelInfos = describeModels(entries, loadedByName);
  } catch (err) {
    await executors.close();
    throw err;
  }
  const inline = new Set(executors.inline);
  for (const m of loaded)
    logger.info({ model: m.name, provider: m.provider, latencyMs: m.latencyMs, inline: inline.has(m.name) }, 'model loaded');

  let paid: PaidSide | undefined;
  if (options.payment) {
    paid = await openPaidSide(identity, options.payment, entries, logger).catch(async (err: unknown) => {
      await executors.close();
      throw err;
    });
  }
  const payments = paid?.payments;

  const counters = newAgentCounters(o.stacking);
  const paymentsHandle = paid ? paymentsView(paid) : undefined;
  // The metrics module (and prom-client with it) loads only when the metrics port is set (docs/agent.md, "Memory").
  let metrics: AgentMetrics | undefined;
  if (options.metricsPort !== undefined) {
    try {
      const { createAgentMetrics } = await import('./metrics.ts');
      metrics = await createAgentMetrics({
        counters,
        pending: (): number => scheduler.pending,
        readyModels: () => loadedByName.size,
        payments: () => paymentsHandle,
        logger,
      });
    } catch (err) {
      await executors.close();
      if (paid) await closePaidSide(paid);
      throw err;
    }
  }
  const faults = new Faults(options.faults);
  const board = new StatusBoard({
    identity,
    models: modelInfos,
    hardware: hardwareSummary(),
    providers: [...new Set(loaded.map((m) => m.provider))],
    workers: executors.lanes(),
    queueLimit: o.queueLimit,
    ...(payments ? { quote: () => payments.signedQuote() } : {}),
    canaries: () => deployments?.canaries() ?? [],
  });
  let closed = false;

  const replays = new ReplayGuard(o.maxRememberedRequests);
  const unitSpecs = new Map(
    entries.flatMap((e) => (e.units ? [[e.name, { maxUnits: e.units.maxUnits, progressEvery: e.units.progressEvery ?? 1 }] as const] : [])),
  );
  // The link is made below; replies only flow once it is connected.
  let link!: AgentLink;
  const requests = new AgentRequests({
    agentId,
    maxMessageBytes: o.maxMessageBytes,
    maxElements: o.maxElements,
    models: loadedByName,
    units: unitSpecs,
    replays,
    maxDeadlineMs: o.maxDeadlineMs,
    payments,
    ...(options.deploy ? { resolve: (model: string, version: string | undefined) => deployments?.resolve(model, version) } : {}),
    counters,
    faults,
    logger,
    reply: (senderId, payload, afterMs) => link.reply(senderId, payload, afterMs),
    closed: () => closed,
    ...(metrics ? { onServed: metrics.observeServed } : {}),
  });
  const scheduler = new Scheduler(o.queueLimit, requests.finished, Date.now, o.admission);
  scheduler.onProgress = requests.progressed;
  for (const m of loaded) scheduler.addModel(m.name, m.latencyMs, executors.executorOf.get(m.name)!);
  requests.attach(scheduler);

  let deployments: AgentDeployments | undefined;
  if (options.deploy) {
    deployments = new AgentDeployments(options.deploy, {
      options: { ...o, providers: providerList },
      openExecutors,
      scheduler,
      models: loadedByName,
      modelInfos,
      announce: () => {
        if (link.connected) link.announce();
      },
      logger,
    });
    try {
      await deployments.start(
        entries.map((e) => ({ ...e, path: specs.find((s) => s.name === e.name)!.path })),
        loadedByName,
        executorsOf,
      );
    } catch (err) {
      await executors.close();
      if (paid) await closePaidSide(paid);
      throw err;
    }
  }

  link = new AgentLink({
    brokerUrl: o.brokerUrl,
    brokerAccess: o.brokerAccess,
    identity,
    ephemeral: o.ephemeral,
    keepaliveS: o.keepaliveS,
    backoff: o.backoff,
    will: board.offlinePayload,
    retainStatus: o.retainStatus,
    standby: o.standbyConnection,
    vouchers: payments !== undefined,
    status: () => board.status(),
    handlers: { request: requests.onRequest, cancel: requests.onCancel, voucher: requests.onVoucher },
    ...(deployments
      ? { deployments: { filters: deployments.filters(), onMessage: (t: string, p: Buffer) => deployments?.onMessage(t, p) } }
      : {}),
    onUnauthorized: () => void shutdown(),
    counters,
    faults,
    logger,
  });

  // Executor sets: the one opened here, and one per reload that loaded models beside the running ones (reload.ts).
  const executorSets = [executors];
  const lanes = () => executorSets.reduce((n, set) => n + set.lanes(), 0);
  const currentLoad = () => loadReport(agentId, heartbeat.seq, lanes(), scheduler.loadReport(), faults);
  const served: ServedModels = {
    modelsDir,
    entries: new Map(entries.map((e) => [e.name, e])),
    loaded: loadedByName,
    units: unitSpecs,
    infos: modelInfos,
    scheduler,
    executorSets,
    executorOptions: o,
    providers: providerList,
    announce: () => {
      if (link.connected) link.announce();
    },
    paying: payments !== undefined,
    closed: () => closed,
    logger,
  };
  // One reload at a time: a SIGHUP during a reload runs another after it.
  let reloading: Promise<ReloadResult> | undefined;
  const reloadModels = (): Promise<ReloadResult> => {
    const next: Promise<ReloadResult> = (reloading ?? Promise.resolve()).then(() => reloadModelsFolder(served));
    reloading = next;
    return next;
  };
  const heartbeat = new Heartbeat(o.heartbeatMs, () => {
    scheduler.sweep();
    replays.prune(Date.now());
    link.publishLoad(currentLoad());
  });

  const shutdown = async () => {
    if (closed) return;
    closed = true;
    heartbeat.stop();
    board.state = 'offline';
    // Receipts of answers already sent follow them before the link closes.
    await requests.flushReceipts();
    await link.close();
    await reloading?.catch(() => undefined);
    await deployments?.close();
    await Promise.all(executorSets.map((set) => set.close()));
    if (paid) await closePaidSide(paid);
    await metrics?.close();
    logger.info({ served: counters.served, stacked: counters.stacked }, 'agent stopped');
  };

  const handle: AgentHandle = {
    setFaults: (f) => faults.set(f),
    id: agentId,
    models: modelInfos,
    counters,
    status: () => board.status(),
    loadReport: currentLoad,
    announced: link.announced,
    async drain(timeoutMs = 30_000) {
      if (closed) return;
      board.state = 'draining';
      scheduler.startDraining();
      if (link.connected) link.announce();
      const until = Date.now() + timeoutMs;
      while (scheduler.pending > 0 && Date.now() < until) await new Promise((r) => setTimeout(r, 10));
      if (scheduler.pending > 0) logger.warn({ pending: scheduler.pending }, 'drain timed out; dropping the rest');
      await shutdown();
    },
    close: shutdown,
    reloadModels,
    ...(paymentsHandle ? { payments: paymentsHandle } : {}),
    ...(deployments
      ? { deployments: { events: deployments.events, settled: () => deployments!.settled(), memory: () => deployments!.memory() } }
      : {}),
  };
  if (metrics && options.metricsPort !== undefined) {
    try {
      const url = await metrics.serve(options.metricsPort, options.metricsHost);
      Object.defineProperty(handle, 'metricsUrl', { value: url, enumerable: true });
      logger.info({ url }, 'metrics listening');
    } catch (err) {
      await shutdown();
      throw err;
    }
  }

  if (o.awaitAnnounce) await link.announced;
  logger.info(
    {
      models: modelInfos.map((m) => m.name),
      inline: executors.inline,
      workerThreads: executors.workerThreads(),
      readyMs: Math.round(performance.now() - readyStarted),
    },
    'agent ready',
  );
  return handle;
}
