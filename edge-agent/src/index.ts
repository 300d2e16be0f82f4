/**
 * The edge agent: loads the ONNX models of a folder, announces them in a status it signs, and
 * serves inference requests over MQTT from a worker-thread pool.
 *
 *   const identity = parseKeyFile(await readFile('agent.key', 'utf8'));
 *   const agent = await startAgent({ brokerUrl: 'mqtt://127.0.0.1:1883', modelsDir: './models', identity });
 *   ...
 *   await agent.drain();   // finish queued and running work, then go offline
 */
import { randomBytes } from 'node:crypto';
import { existsSync } from 'node:fs';
import { createRequire } from 'node:module';
import os from 'node:os';
import path from 'node:path';
import { type BackoffOptions, type MeshConnection, openMeshConnection } from '@edge-mesh/client';
import {
  type AgentLoad,
  type AgentStatus,
  assertValidId,
  DEFAULT_MAX_ELEMENTS,
  DEFAULT_MAX_MESSAGE_BYTES,
  decodeMessage,
  decodeTensorMap,
  encodeMessage,
  encodeTensorMap,
  generateIdentity,
  type Hardware,
  hashTensorMap,
  type Identity,
  type InferReply,
  type InferRequest,
  isValidId,
  MeshError,
  type ModelInfo,
  PROTOCOL_VERSION,
  RECEIPT_STATUS,
  requestIdHex,
  type SignedReceipt,
  signStatus,
  type Tensor,
  toMeshError,
  topics,
  ZERO_HASH,
} from '@edge-mesh/protocol';
import type { MqttClient } from 'mqtt';
import pino, { type Logger } from 'pino';
import { type ManifestEntry, readManifest, sha256File } from './manifest.ts';
import type { AgentPaymentOptions, AgentPayments, LaneSummary } from './payments.ts';
import { type JobResult, WorkerPool } from './pool.ts';
import { type Job, Scheduler } from './scheduler.ts';
import type { SettlementRecord, Settler, SettlerCounters } from './settler.ts';
import type { LoadedModel } from './worker-protocol.ts';

export { MANIFEST_FILE, type Manifest, type ManifestEntry, readManifest, sha256File } from './manifest.ts';
export type { AgentPaymentOptions, LaneSummary } from './payments.ts';
export type { SettlementRecord, SettlerCounters, SettlerOptions } from './settler.ts';

export const AGENT_VERSION = '0.1.0';

export interface AgentOptions {
  brokerUrl: string;
  modelsDir: string;
  /**
   * The agent's key (role `agent`); its id is the agent id, and it signs the status and proves the
   * agent to the broker on CONNECT. When absent, an ephemeral key is made for this run (its id is
   * logged), which only an open broker accepts.
   */
  identity?: Identity;
  /**
   * Inference worker threads (default 1); each holds a session per model. Each worker costs its own
   * V8 isolate (about 10 MB) plus a copy of every session (the four demo models: about 55 MB), so the
   * default is one; more pay off when runs are long or many arrive at once (docs/agent.md).
   */
  workers?: number;
  /** Threads onnxruntime may use inside one run. */
  intraOpThreads?: number;
  /** Bound of each model's queue; a request beyond it gets MESH_BUSY at once. */
  queueLimit?: number;
  /** Jobs handed to one worker at once, so it never idles through a hand-off (1 disables). */
  pipelineDepth?: number;
  heartbeatMs?: number;
  warmupRuns?: number;
  /** 'auto' tries TensorRT, then CUDA when this onnxruntime build ships them, then CPU. */
  providers?: 'auto' | string[];
  maxMessageBytes?: number;
  maxElements?: number;
  keepaliveS?: number;
  backoff?: BackoffOptions;
  logger?: Logger;
  /**
   * Resolve only once the first status is published (default true). Then a first CONNECT the broker
   * refuses as unauthorized rejects `startAgent` with MESH_UNAUTHORIZED; without it, `announced` rejects.
   */
  awaitAnnounce?: boolean;
  /**
   * Request ids are remembered until their deadline, so a replayed (or redelivered) request is refused and
   * never run twice. When this many are remembered, new requests get MESH_BUSY until some expire.
   */
  maxRememberedRequests?: number;
  /**
   * Fault injection for tests and demos of routing: `linkDelayMs` holds each request and each reply
   * for that long (a far-away link: round trip + 2 × linkDelayMs, outside the reported queue and
   * execution times); `extraExecMs` adds that much to every execution (slow hardware: the reply waits
   * and reports the longer execMs). Never set in production.
   */
  faults?: { linkDelayMs?: number; extraExecMs?: number };
  /**
   * Take payment: sign a quote into the status and a receipt for every request that names a payer
   * lane, keep the receipt journal and best vouchers in `dataDir`, and hold each lane to a credit
   * window. Without it (or for a request naming no payer) the agent serves as before, with no receipt.
   */
  payment?: AgentPaymentOptions;
}

export interface AgentCounters {
  received: number;
  served: number;
  errors: Record<string, number>;
  reconnects: number;
  announcements: number;
  /** Requests refused because their id was seen before (also counted in `errors.MESH_BAD_REQUEST`). */
  replays: number;
}

export interface AgentHandle {
  readonly id: string;
  readonly models: readonly ModelInfo[];
  readonly counters: AgentCounters;
  status(): AgentStatus;
  loadReport(): AgentLoad;
  /** Resolves when the first status has been published; rejects if the broker refuses the first CONNECT as unauthorized. */
  readonly announced: Promise<void>;
  /** Refuses new work, finishes what is queued or running (up to `timeoutMs`), then closes. */
  drain(timeoutMs?: number): Promise<void>;
  /** Publishes the offline status and stops at once; queued work is dropped. */
  close(): Promise<void>;
  /** Changes the injected faults (see AgentOptions.faults) while running: a gray failure on demand. */
  setFaults(faults: { linkDelayMs?: number; extraExecMs?: number }): void;
  /** Present when the agent takes payment. */
  readonly payments?: {
    lanes(): LaneSummary[];
    receipts(payer: string): Promise<SignedReceipt[]>;
    readonly counters: AgentPayments['counters'];
    /** Present when `payment.settle` is set: the settlement relayer. */
    readonly settler?: {
      readonly counters: SettlerCounters;
      settlements(): Promise<SettlementRecord[]>;
      /** What the chain has settled per payer lane, as the settler last saw it. */
      settledByLane(): Record<string, number>;
      /** Settles every lane owing anything now, whatever the policy. */
      settleNow(): Promise<void>;
    };
  };
}

function hardwareSummary(): Hardware {
  const cpus = os.cpus();
  return {
    platform: os.platform(),
    arch: os.arch(),
    cpus: cpus.length,
    cpuModel: (cpus[0]?.model ?? 'unknown').slice(0, 128),
    memoryMb: Math.round(os.totalmem() / 2 ** 20),
  };
}

/**
 * The execution providers to try, best first. onnxruntime-node loads CUDA and TensorRT from
 * provider libraries beside its binding; the npm build for linux-x64 lists them but ships none,
 * and the linux-arm64 build is CPU only, so look for the files instead of failing noisily.
 */
export function availableProviders(requested: 'auto' | string[], logger: Logger): string[] {
  if (requested !== 'auto') return requested.includes('cpu') ? requested : [...requested, 'cpu'];
  const require = createRequire(import.meta.url);
  const bindingDir = path.join(path.dirname(require.resolve('onnxruntime-node')), '..', 'bin', 'napi-v6', process.platform, process.arch);
  const found: string[] = [];
  for (const provider of ['tensorrt', 'cuda']) {
    if (existsSync(path.join(bindingDir, `libonnxruntime_providers_${provider}.so`))) found.push(provider);
  }
  if (found.length === 0) logger.info({ bindingDir }, 'no CUDA or TensorRT provider in this onnxruntime build; using CPU');
  return [...found, 'cpu'];
}

/** Checks each model file against its manifest hash; mismatching or missing files are refused. */
async function verifyModels(modelsDir: string, entries: ManifestEntry[], logger: Logger): Promise<ManifestEntry[]> {
  const accepted: ManifestEntry[] = [];
  for (const entry of entries) {
    const file = path.join(modelsDir, entry.file);
    let actual: string;
    try {
      actual = await sha256File(file);
    } catch (err) {
      logger.error({ model: entry.name, file, err: (err as Error).message }, 'model file unreadable; refusing the model');
      continue;
    }
    if (actual !== entry.sha256) {
      logger.error({ model: entry.name, file, expected: entry.sha256, actual }, 'model file does not match its sha256; refusing the model');
      continue;
    }
    accepted.push(entry);
  }
  if (accepted.length === 0) {
    throw new MeshError('MESH_MODEL_INTEGRITY', `no model in ${modelsDir} passed its sha256 check`, { details: { modelsDir } });
  }
  return accepted;
}

/** Input names, dtypes and fixed dims must match the model's own metadata. */
function checkInputs(model: LoadedModel, inputs: Record<string, Tensor>): void {
  const names = Object.keys(inputs);
  for (const info of model.inputs) {
    const tensor = inputs[info.name];
    if (!tensor) throw new MeshError('MESH_BAD_INPUT', `model ${model.name} needs input ${info.name}; got ${names.join(', ') || 'none'}`);
    if (tensor.dtype !== info.dtype) {
      throw new MeshError('MESH_BAD_INPUT', `input ${info.name} of ${model.name} must be ${info.dtype}, got ${tensor.dtype}`);
    }
    if (tensor.shape.length !== info.shape.length) {
      throw new MeshError(
        'MESH_BAD_INPUT',
        `input ${info.name} of ${model.name} must have rank ${info.shape.length}, got [${tensor.shape.join(',')}]`,
      );
    }
    info.shape.forEach((dim, i) => {
      if (typeof dim === 'number' && tensor.shape[i] !== dim) {
        throw new MeshError(
          'MESH_BAD_INPUT',
          `input ${info.name} of ${model.name} must have dim ${i} = ${dim}, got [${tensor.shape.join(',')}]`,
        );
      }
    });
  }
  if (names.length !== model.inputs.length) {
    const extra = names.filter((n) => !model.inputs.some((i) => i.name === n));
    throw new MeshError('MESH_BAD_INPUT', `model ${model.name} has no input named ${extra.join(', ')}`);
  }
}

export async function startAgent(options: AgentOptions): Promise<AgentHandle> {
  const {
    brokerUrl,
    modelsDir,
    workers = 1,
    intraOpThreads = 1,
    queueLimit = 64,
    pipelineDepth = 2,
    heartbeatMs = 1_000,
    warmupRuns = 5,
    providers = 'auto',
    maxMessageBytes = DEFAULT_MAX_MESSAGE_BYTES,
    maxElements = DEFAULT_MAX_ELEMENTS,
    keepaliveS = 10,
    backoff,
    awaitAnnounce = true,
    maxRememberedRequests = 100_000,
  } = options;
  if ('agentId' in options) {
    throw new MeshError(
      'MESH_CONFIG',
      'the agentId option was replaced by identity: an agent id derives from its key (see generateIdentity, parseKeyFile)',
    );
  }
  const ephemeral = options.identity === undefined;
  const identity = options.identity ?? generateIdentity('agent');
  if (identity.role !== 'agent')
    throw new MeshError('MESH_CONFIG', `an agent needs an agent key, got a ${identity.role} key (${identity.id})`);
  const agentId = assertValidId(identity.id, 'agent id');
  const problems: string[] = [];
  if (!Number.isInteger(workers) || workers < 1) problems.push(`workers must be a positive integer, got ${workers}`);
  if (!Number.isInteger(queueLimit) || queueLimit < 1) problems.push(`queueLimit must be a positive integer, got ${queueLimit}`);
  if (!Number.isInteger(pipelineDepth) || pipelineDepth < 1)
    problems.push(`pipelineDepth must be a positive integer, got ${pipelineDepth}`);
  if (!Number.isInteger(maxRememberedRequests) || maxRememberedRequests < 1)
    problems.push(`maxRememberedRequests must be a positive integer, got ${maxRememberedRequests}`);
  if (!(heartbeatMs >= 50)) problems.push(`heartbeatMs must be at least 50, got ${heartbeatMs}`);
  if (!Number.isInteger(warmupRuns) || warmupRuns < 1) problems.push(`warmupRuns must be a positive integer, got ${warmupRuns}`);
  if (problems.length) throw new MeshError('MESH_CONFIG', `invalid agent options: ${problems.join('; ')}`);

  const logger = (options.logger ?? pino({ level: 'info' })).child({ part: 'agent', agentId });
  if (ephemeral) logger.info({ agentId }, 'no key given: using an ephemeral agent identity, which only an open broker accepts');
  const readyStarted = performance.now();
  const manifest = await readManifest(modelsDir);
  const entries = await verifyModels(modelsDir, manifest.models, logger);
  const providerList = availableProviders(providers, logger);

  const pool = new WorkerPool({
    size: workers,
    intraOpThreads,
    warmupRuns,
    pipelineDepth,
    logger,
    models: entries.map((e) => ({ name: e.name, path: path.join(modelsDir, e.file), providers: providerList, warmup: e.warmup })),
  });
  let loaded: LoadedModel[];
  try {
    loaded = await pool.start();
  } catch (err) {
    await pool.close();
    throw err;
  }
  const loadedByName = new Map(loaded.map((m) => [m.name, m]));
  const modelInfos: ModelInfo[] = entries.map((entry) => {
    const m = loadedByName.get(entry.name)!;
    return {
      name: entry.name,
      version: entry.version,
      sha256: entry.sha256,
      priceMicros: entry.priceMicros,
      latencyMs: Math.round(m.latencyMs * 1000) / 1000,
      inputs: m.inputs,
      outputs: m.outputs,
      ...(entry.notes ? { notes: entry.notes } : {}),
    };
  });
  for (const m of loaded) logger.info({ model: m.name, provider: m.provider, latencyMs: m.latencyMs }, 'model loaded');
  const providersInUse = [...new Set(loaded.map((m) => m.provider))];

  // Payments load only when asked for: ethers, level and the escrow bindings are most of the agent's
  // JavaScript, and an unpaid agent on a small device should not hold them (docs/agent.md).
  let payments: AgentPayments | undefined;
  if (options.payment) {
    const { AgentPayments } = await import('./payments.ts');
    payments = await AgentPayments.open(identity, options.payment, entries, logger).catch(async (err: unknown) => {
      await pool.close();
      throw err;
    });
  }
  let settler: Settler | undefined;
  if (payments && options.payment?.settle) {
    const p = payments;
    const { Settler } = await import('./settler.ts');
    settler = await Settler.start(
      { payout: p.payout, domain: p.domain, dataDir: options.payment.dataDir, lanes: () => p.durableVoucherLanes(), logger },
      options.payment.settle,
    ).catch(async (err: unknown) => {
      await pool.close();
      await p.close();
      throw err;
    });
  }

  const counters: AgentCounters = { received: 0, served: 0, errors: {}, reconnects: 0, announcements: 0, replays: 0 };
  const session = randomBytes(8).toString('hex');
  const hardware = hardwareSummary();
  let state: AgentStatus['state'] = 'online';
  let heartbeatSeq = 0;
  let closed = false;

  const statusMessage = (): AgentStatus =>
    signStatus(identity, {
      v: PROTOCOL_VERSION,
      kind: 'status',
      agent: agentId,
      state,
      ts: Date.now(),
      session,
      version: AGENT_VERSION,
      models: modelInfos,
      hardware,
      providers: providersInUse,
      workers,
      queueLimit,
      ...(payments ? { quote: payments.signedQuote() } : {}),
    });
  // Signed once: the broker publishes it as the will when the agent dies, so it cannot be signed then.
  const offlinePayload = encodeMessage(
    signStatus(identity, { v: PROTOCOL_VERSION, kind: 'status', agent: agentId, state: 'offline', ts: Date.now(), session }),
  );

  /** Request id (hex) → its deadline: ids seen and not yet expired, so none runs twice. */
  const seenRequests = new Map<string, number>();
  const pruneSeenRequests = (nowMs: number) => {
    for (const [key, deadline] of seenRequests) if (deadline < nowMs) seenRequests.delete(key);
  };

  let client!: MqttClient;
  const faults = { linkDelayMs: 0, extraExecMs: 0 };
  const setFaults = (f: { linkDelayMs?: number; extraExecMs?: number }) => {
    faults.linkDelayMs = Math.max(0, f.linkDelayMs ?? 0);
    faults.extraExecMs = Math.max(0, f.extraExecMs ?? 0);
  };
  setFaults(options.faults ?? {});
  const publishReply = (senderId: string, payload: Buffer, afterMs = 0) => {
    const send = () => client.publish(topics.clientReply(senderId, agentId), payload, { qos: 1 });
    const delay = afterMs + faults.linkDelayMs;
    if (delay > 0) {
      setTimeout(() => {
        if (!closed) send();
      }, delay).unref();
    } else send();
  };
  const replyError = (senderId: string, id: Uint8Array, err: MeshError, receipt?: SignedReceipt) => {
    counters.errors[err.code] = (counters.errors[err.code] ?? 0) + 1;
    publishReply(
      senderId,
      encodeMessage({
        v: PROTOCOL_VERSION,
        kind: 'err',
        id,
        agent: agentId,
        code: err.code,
        message: err.message.slice(0, 2048),
        ...(receipt ? { receipt } : {}),
      }),
    );
  };

  /**
   * A paid job's receipt: status from what happened. It costs by the quote's rule: ok and a cancel of
   * work that ran are charged, failures and deadline drops are 0. The reply leaves once the receipt is journaled.
   */
  const withReceipt = (
    job: Job,
    err: MeshError | undefined,
    outputs: InferReply['outputs'] | undefined,
    send: (receipt: SignedReceipt | undefined) => void,
  ) => {
    if (!job.paid || !payments) return send(undefined);
    const ran = job.startedAt !== undefined;
    // A cancel that comes once the deadline has passed is the sender giving up on a late job: a timeout, not a paid cancel.
    const expired = job.deadline <= Date.now();
    const status = !err
      ? RECEIPT_STATUS.ok
      : err.code === 'MESH_CANCELLED' && !expired
        ? RECEIPT_STATUS.cancelled
        : err.code === 'MESH_DEADLINE_EXCEEDED' || err.code === 'MESH_CANCELLED'
          ? RECEIPT_STATUS.timeout
          : RECEIPT_STATUS.failed;
    const nowPerf = performance.now();
    const epochOf = (perf: number) => Date.now() - (nowPerf - perf);
    const { receipt, durable } = payments.issue(job.paid, {
      requestId: job.id,
      status,
      unitsUsed: status === RECEIPT_STATUS.ok || (status === RECEIPT_STATUS.cancelled && ran) ? 1 : 0,
      outputHash: outputs ? hashTensorMap(outputs) : ZERO_HASH,
      startedAt: epochOf(job.startedAt ?? job.receivedAt),
      finishedAt: Date.now(),
    });
    durable.then(
      () => send(receipt),
      (writeErr: unknown) => {
        logger.error({ err: (writeErr as Error).message }, 'receipt not journaled; replying without it');
        send(undefined);
      },
    );
  };

  const scheduler = new Scheduler(pool, queueLimit, (job: Job, err: MeshError | undefined, result?: JobResult) => {
    if (err) {
      if (err.code === 'MESH_INFERENCE_FAILED') logger.warn({ model: job.model, err: err.message }, 'inference failed');
      withReceipt(job, err, undefined, (receipt) => replyError(job.senderId, job.id, err, receipt));
      return;
    }
    const queueMs = job.startedAt! - job.receivedAt;
    counters.served++;
    const outputs = encodeTensorMap(result!.outputs);
    withReceipt(job, undefined, outputs, (receipt) =>
      publishReply(
        job.senderId,
        encodeMessage({
          v: PROTOCOL_VERSION,
          kind: 'res',
          id: job.id,
          agent: agentId,
          model: job.model,
          outputs,
          queueMs: Math.max(0, queueMs),
          execMs: result!.execMs + faults.extraExecMs,
          ...(receipt ? { receipt } : {}),
        }),
        faults.extraExecMs,
      ),
    );
  });
  for (const m of loaded) scheduler.addModel(m.name, m.latencyMs);

  const requestPrefix = topics.agentRequest(agentId, '');
  const cancelPrefix = topics.agentCancel(agentId, '');
  const voucherPrefix = topics.agentVoucher(agentId, '');

  const onRequest = (senderId: string, payload: Buffer) => {
    if (faults.linkDelayMs > 0) {
      setTimeout(() => {
        if (!closed) handleRequest(senderId, payload);
      }, faults.linkDelayMs).unref();
      return;
    }
    handleRequest(senderId, payload);
  };
  const handleRequest = (senderId: string, payload: Buffer) => {
    counters.received++;
    const receivedAt = performance.now();
    let request: InferRequest;
    try {
      request = decodeMessage(payload, ['req'], maxMessageBytes);
    } catch (err) {
      const meshErr = toMeshError(err, 'MESH_BAD_REQUEST');
      const id = meshErr.details?.id;
      if (id instanceof Uint8Array) replyError(senderId, id, meshErr);
      else {
        counters.errors[meshErr.code] = (counters.errors[meshErr.code] ?? 0) + 1;
        logger.debug({ senderId, err: meshErr.message }, 'unreadable request dropped');
      }
      return;
    }
    const key = requestIdHex(request.id);
    if (seenRequests.has(key)) {
      counters.replays++;
      logger.debug({ senderId, requestId: key }, 'replayed request id refused');
      replyError(senderId, request.id, new MeshError('MESH_BAD_REQUEST', `replayed request id ${key}`));
      return;
    }
    const nowMs = Date.now();
    // An expired request is refused by the scheduler, and so is any replay of it: no need to remember it.
    if (request.deadline >= nowMs) {
      if (seenRequests.size >= maxRememberedRequests) pruneSeenRequests(nowMs);
      if (seenRequests.size >= maxRememberedRequests) {
        replyError(
          senderId,
          request.id,
          new MeshError('MESH_BUSY', `${agentId} remembers ${maxRememberedRequests} unexpired request ids; try again later`),
        );
        return;
      }
      seenRequests.set(key, request.deadline);
    }
    let paid: Job['paid'];
    try {
      const model = loadedByName.get(request.model);
      if (!model) throw new MeshError('MESH_UNKNOWN_MODEL', `model ${request.model} is not served by ${agentId}`);
      const inputs = decodeTensorMap(request.inputs, maxElements);
      checkInputs(model, inputs);
      if (payments && request.pay) {
        // A piggybacked voucher counts before the credit check; recovering it is synchronous.
        if (request.pay.voucher) void payments.acceptVoucher(senderId, request.pay.voucher).catch(() => {});
        paid = payments.admit(request.pay.payer, senderId, request.model, hashTensorMap(request.inputs));
      }
      scheduler.submit({
        key,
        id: request.id,
        senderId,
        model: request.model,
        inputs,
        deadline: request.deadline,
        receivedAt,
        ...(paid ? { paid } : {}),
      });
    } catch (err) {
      // Refused before it was taken on: no receipt, nothing owed.
      if (paid) payments!.release(paid);
      const refusal = toMeshError(err, 'MESH_BAD_REQUEST');
      // It never ran, so the same request may come again: the SDK retries it once its voucher is out.
      if (refusal.code === 'MESH_CREDIT_EXCEEDED') seenRequests.delete(key);
      replyError(senderId, request.id, refusal);
    }
  };

  const onVoucher = (senderId: string, payload: Buffer) => {
    if (!payments) return;
    try {
      const voucher = decodeMessage(payload, ['voucher'], 4096);
      void payments
        .acceptVoucher(senderId, voucher)
        .catch((err: unknown) => logger.error({ err: (err as Error).message }, 'voucher not stored'));
    } catch (err) {
      logger.debug({ senderId, err: (err as Error).message }, 'bad voucher dropped');
    }
  };

  const onCancel = (senderId: string, payload: Buffer) => {
    try {
      const cancel = decodeMessage(payload, ['cancel'], 1024);
      scheduler.cancel(requestIdHex(cancel.id), senderId);
    } catch (err) {
      logger.debug({ senderId, err: (err as Error).message }, 'bad cancel dropped');
    }
  };

  let resolveAnnounced!: () => void;
  let rejectAnnounced!: (err: MeshError) => void;
  const announced = new Promise<void>((resolve, reject) => {
    resolveAnnounced = resolve;
    rejectAnnounced = reject;
  });
  // A caller that never awaits `announced` must not see an unhandled rejection.
  announced.catch(() => {});
  const announce = () => {
    client.publish(topics.agentStatus(agentId), encodeMessage(statusMessage()), { qos: 1, retain: true }, (err) => {
      if (err) return;
      counters.announcements++;
      resolveAnnounced();
    });
  };

  let everConnected = false;
  const connection: MeshConnection = openMeshConnection(brokerUrl, {
    identity,
    keepaliveS,
    // 6 MB of heap for a speed-up mqtt.js's packet writer does not need at the agent's message rates (docs/agent.md).
    numberCache: false,
    ...(backoff ? { backoff } : {}),
    will: { topic: topics.agentStatus(agentId), payload: offlinePayload, qos: 1, retain: true },
    onConnect: (c) => {
      if (everConnected) counters.reconnects++;
      logger.info({ brokerUrl, reconnect: everConnected }, everConnected ? 'reconnected to broker' : 'connected to broker');
      everConnected = true;
      const filters = [topics.agentRequestsFor(agentId), topics.agentCancelsFor(agentId)];
      if (payments) filters.push(topics.agentVouchersFor(agentId));
      c.subscribe(filters, { qos: 1 }, (err) => {
        if (err) logger.error({ err: err.message }, 'subscribe failed');
        announce();
      });
    },
    onReconnectScheduled: (delayMs, attempt) => {
      if (!closed) logger.warn({ delayMs, attempt }, 'broker connection lost; reconnecting');
    },
    onRefused: (err, first) => {
      if (first && err.code === 'MESH_UNAUTHORIZED') {
        const hint = ephemeral
          ? 'this agent runs on an ephemeral key, which only an open broker accepts: give it a key file the operator admitted'
          : 'is this agent admitted (edge-mesh admit) and not revoked?';
        rejectAnnounced(new MeshError('MESH_UNAUTHORIZED', `${err.message}; ${hint}`, { cause: err, details: { agentId } }));
        void shutdown();
        return;
      }
      logger.error({ code: err.code, err: err.message }, 'broker refused the connection; retrying');
    },
  });
  client = connection.client;
  client.on('message', (topic, payload) => {
    if (topic.startsWith(requestPrefix)) {
      const senderId = topic.slice(requestPrefix.length);
      if (isValidId(senderId)) onRequest(senderId, payload);
    } else if (topic.startsWith(cancelPrefix)) {
      const senderId = topic.slice(cancelPrefix.length);
      if (isValidId(senderId)) onCancel(senderId, payload);
    } else if (topic.startsWith(voucherPrefix)) {
      const senderId = topic.slice(voucherPrefix.length);
      if (isValidId(senderId)) onVoucher(senderId, payload);
    }
  });

  const loadReport = (): AgentLoad => {
    const report = scheduler.loadReport();
    // Injected slowness is part of the service time the agent reports, as a really slow device's would be.
    if (faults.extraExecMs > 0) for (const m of Object.values(report.models)) m.serviceMs += faults.extraExecMs;
    return { v: PROTOCOL_VERSION, kind: 'load', agent: agentId, ts: Date.now(), seq: heartbeatSeq, workers: pool.size, ...report };
  };
  const heartbeat = setInterval(() => {
    scheduler.sweep();
    pruneSeenRequests(Date.now());
    heartbeatSeq++;
    if (client.connected) client.publish(topics.agentLoad(agentId), encodeMessage(loadReport()), { qos: 0 });
  }, heartbeatMs);

  const shutdown = async () => {
    if (closed) return;
    closed = true;
    clearInterval(heartbeat);
    state = 'offline';
    if (client.connected) {
      await new Promise<void>((resolve) => {
        client.publish(topics.agentStatus(agentId), offlinePayload, { qos: 1, retain: true }, () => resolve());
        setTimeout(resolve, 1_000).unref();
      });
    }
    await connection.close();
    await pool.close();
    await settler?.close();
    await payments?.close();
    logger.info({ served: counters.served }, 'agent stopped');
  };

  const handle: AgentHandle = {
    setFaults,
    id: agentId,
    models: modelInfos,
    counters,
    status: statusMessage,
    loadReport,
    announced,
    async drain(timeoutMs = 30_000) {
      if (closed) return;
      state = 'draining';
      scheduler.startDraining();
      if (client.connected) announce();
      const until = Date.now() + timeoutMs;
      while (scheduler.pending > 0 && Date.now() < until) await new Promise((r) => setTimeout(r, 10));
      if (scheduler.pending > 0) logger.warn({ pending: scheduler.pending }, 'drain timed out; dropping the rest');
      await shutdown();
    },
    close: shutdown,
    ...(payments
      ? {
          payments: {
            lanes: () => payments!.lanesSummary(),
            receipts: (payer: string) => payments!.receipts(payer),
            counters: payments.counters,
            ...(settler
              ? {
                  settler: {
                    counters: settler.counters,
                    settlements: () => settler!.settlements(),
                    settledByLane: () => settler!.settledByLane(),
                    settleNow: () => settler!.settleNow(),
                  },
                }
              : {}),
          },
        }
      : {}),
  };

  if (awaitAnnounce) await announced;
  logger.info({ models: modelInfos.map((m) => m.name), readyMs: Math.round(performance.now() - readyStarted) }, 'agent ready');
  return handle;
}
