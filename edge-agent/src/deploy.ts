/**
 * Signed model deployments on the agent (docs/deployment.md). The agent takes a step only when a trusted operator
 * signed it, it targets one of the agent's groups, and its seq is above every step it applied for the model
 * (so a replayed older manifest cannot roll the agent back). A canary's bundle is fetched by its sha256 from the
 * manifest's URLs or the configured bundle servers, checked byte for byte, loaded beside the running version on its
 * own executor and warmed before the status announces it; requests pinned to that version then run on it. A
 * promotion makes it the default (new requests go to it while the old version finishes what it holds, then closes);
 * a rollback drops it the same way. The applied steps are journaled (write, fsync, rename) after the step took
 * effect, so an agent that restarts mid-rollout comes back on the versions it last announced, and a step it did not
 * finish is applied again from the retained manifest.
 *
 * The shape of it follows Triton's model control (server docs/user_guide/model_management.md: load a new version
 * beside the old one, switch, unload) with the version policy decided by the operator's signed step.
 */
import { createHash } from 'node:crypto';
import { existsSync } from 'node:fs';
import { mkdir, open, readFile, rename, rm, stat } from 'node:fs/promises';
import path from 'node:path';
import {
  checkSignedDeployment,
  type Deployment,
  decodeCbor,
  deploymentTopics,
  isNewerStep,
  MeshError,
  type ModelInfo,
  parseDeploymentTopic,
  type SignedDeployment,
  signedDeploymentToJson,
  toMeshError,
  verifyDeployment,
} from '@edge-mesh/protocol';
import type { Logger } from 'pino';
import { closingOnce, type ExecutorOptions, type Executors } from './executors.ts';
import type { ManifestEntry } from './manifest.ts';
import { sha256File } from './manifest.ts';
import type { Scheduler } from './scheduler.ts';
import type { LoadedModel, WorkerModelSpec } from './worker-protocol.ts';

export interface AgentDeployOptions {
  /** Operators whose signed steps the agent takes: id → raw 32-byte Ed25519 public key. */
  operators: ReadonlyMap<string, Uint8Array>;
  /** The groups this agent belongs to (a step for another group is ignored). */
  groups: string[];
  /** Where fetched bundles and the journal of applied steps live (created if missing). */
  stateDir: string;
  /** Bundle servers tried after the manifest's own URLs: GET `${base}/bundles/${sha256}` (a router's HTTP API). */
  bundleBaseUrls?: string[];
  /** Largest bundle accepted, bytes (default 512 MiB). */
  maxBundleBytes?: number;
  /** How long a fetch may take, ms (default 120 000). */
  fetchTimeoutMs?: number;
  /**
   * Bound on the memory the loaded models are estimated to take, MiB (default: none). A step whose version would
   * pass it first evicts the least recently used idle models; when that cannot make room it is refused
   * (MESH_TOO_LARGE). With a budget every model runs on executors of its own, so an evicted one frees its memory.
   */
  memoryBudgetMb?: number;
  /**
   * The estimate of one model: its file size × this factor × the session copies it runs in (one per worker thread,
   * one when it runs inline). Default 2: the weights as ONNX Runtime holds them plus as much again for its arena and
   * graph copies. An estimate from the file, not a measurement: set it from what `ps` shows on the device.
   */
  modelMemoryFactor?: number;
}

/** What the agent records of a refused or applied step (AgentHandle.deployments.events, and the log). */
export interface DeployEvent {
  at: number;
  model: string;
  version?: string;
  seq?: number;
  phase?: Deployment['phase'];
  ok: boolean;
  code?: string;
  message: string;
}

interface Slot {
  key: string;
  version: string;
  sha256: string;
  priceMicros: number;
  info: ModelInfo;
  /** Set when this slot has an executor of its own (a deployed version), closed when the slot goes. */
  executors?: Executors;
  /** Its memory estimate (AgentDeployOptions.modelMemoryFactor), bytes. */
  estimateBytes: number;
  /** When a request last resolved to it, ms (the budget evicts the least recently used first). */
  lastUsedMs: number;
}

interface ModelRoute {
  primary?: Slot;
  canary?: Slot;
}

interface JournalEntry {
  seq: number;
  /** The promoted version the agent serves instead of its models folder's entry. */
  primary?: { version: string; sha256: string; priceMicros: number };
  canary?: { version: string; sha256: string; priceMicros: number };
  step: { manifest: string; sig: string };
}

interface Journal {
  v: 1;
  models: Record<string, JournalEntry>;
}

export interface DeployHooks {
  options: ExecutorOptions & { providers: string[] };
  openExecutors: (specs: WorkerModelSpec[], options: ExecutorOptions, logger: Logger) => Promise<Executors>;
  scheduler: Scheduler;
  /** The requests' model table, keyed by slot key. */
  models: Map<string, LoadedModel>;
  /** The status's model list, edited in place when a promotion changes a model's default version. */
  modelInfos: ModelInfo[];
  announce: () => void;
  logger: Logger;
}

const JOURNAL = 'deployments.json';
const mib = (bytes: number) => Math.round((bytes / 2 ** 20) * 100) / 100;

export const bundlePath = (stateDir: string, sha256: string) => path.join(stateDir, 'bundles', `${sha256}.onnx`);

/** Reads the journal; a missing one is empty, an unreadable one is a configuration error (never silently reset). */
export async function readDeployJournal(stateDir: string): Promise<Journal> {
  const file = path.join(stateDir, JOURNAL);
  if (!existsSync(file)) return { v: 1, models: {} };
  try {
    const parsed = JSON.parse(await readFile(file, 'utf8')) as Journal;
    if (parsed.v !== 1 || typeof parsed.models !== 'object') throw new MeshError('MESH_CONFIG', 'not a deployment journal');
    return parsed;
  } catch (cause) {
    throw new MeshError('MESH_CONFIG', `cannot read the deployment journal ${file}: ${(cause as Error).message}`, { cause });
  }
}

async function writeAtomically(file: string, text: string): Promise<void> {
  const tmp = `${file}.tmp`;
  const handle = await open(tmp, 'w', 0o600);
  try {
    await handle.writeFile(text);
    await handle.sync();
  } finally {
    await handle.close();
  }
  await rename(tmp, file);
}

/**
 * The models-folder entries with every promoted version from the journal in place of the folder's, each bundle
 * checked against its hash again. A missing or corrupt bundle keeps the folder's version (and says so).
 */
export async function promotedEntries(
  stateDir: string,
  entries: ManifestEntry[],
  logger: Logger,
): Promise<{ entries: ManifestEntry[]; paths: Map<string, string> }> {
  const journal = await readDeployJournal(stateDir);
  const paths = new Map<string, string>();
  const out: ManifestEntry[] = [];
  for (const entry of entries) {
    const promoted = journal.models[entry.name]?.primary;
    if (promoted) {
      const file = bundlePath(stateDir, promoted.sha256);
      const actual = existsSync(file) ? await sha256File(file) : undefined;
      if (actual === promoted.sha256) {
        paths.set(entry.name, file);
        out.push({ ...entry, version: promoted.version, sha256: promoted.sha256, priceMicros: promoted.priceMicros });
        continue;
      }
      logger.error(
        { model: entry.name, version: promoted.version },
        'promoted bundle missing or corrupt; serving the models folder version',
      );
    }
    out.push(entry);
  }
  return { entries: out, paths };
}

export class AgentDeployments {
  readonly events: DeployEvent[] = [];
  private readonly routes = new Map<string, ModelRoute>();
  private journal: Journal = { v: 1, models: {} };
  /** Steps are applied one at a time, in arrival order. */
  private chain: Promise<void> = Promise.resolve();
  private closed = false;
  /** Slots that left their route but whose executor has not closed yet: they still hold memory. */
  private readonly retiring = new Set<Slot>();
  private readonly budgetBytes: number | undefined;
  private readonly memoryFactor: number;

  constructor(
    private readonly options: AgentDeployOptions,
    private readonly hooks: DeployHooks,
  ) {
    for (const g of options.groups)
      if (!/^[a-z0-9][a-z0-9-]{2,63}$/.test(g)) throw new MeshError('MESH_CONFIG', `deployment group ${JSON.stringify(g)} is not valid`);
    const { memoryBudgetMb, modelMemoryFactor = 2 } = options;
    if (memoryBudgetMb !== undefined && !(Number.isFinite(memoryBudgetMb) && memoryBudgetMb > 0))
      throw new MeshError('MESH_CONFIG', `memoryBudgetMb must be a positive number, got ${memoryBudgetMb}`);
    if (!(Number.isFinite(modelMemoryFactor) && modelMemoryFactor > 0))
      throw new MeshError('MESH_CONFIG', `modelMemoryFactor must be a positive number, got ${modelMemoryFactor}`);
    this.budgetBytes = memoryBudgetMb === undefined ? undefined : Math.floor(memoryBudgetMb * 2 ** 20);
    this.memoryFactor = modelMemoryFactor;
  }

  /** The estimate of a model file of `bytes` run in `copies` sessions. */
  private estimate(bytes: number, copies: number): number {
    return Math.ceil(bytes * this.memoryFactor * Math.max(1, copies));
  }

  /** What the loaded models are estimated to hold now, bytes (AgentHandle.deployments.memory). */
  memory(): { usedBytes: number; budgetBytes: number | undefined; models: { key: string; estimateBytes: number; lastUsedMs: number }[] } {
    const slots = [...this.routes.values()].flatMap((r) => [r.primary, r.canary]).filter((s): s is Slot => s !== undefined);
    slots.push(...this.retiring);
    return {
      usedBytes: slots.reduce((n, s) => n + s.estimateBytes, 0),
      budgetBytes: this.budgetBytes,
      models: slots.map((s) => ({ key: s.key, estimateBytes: s.estimateBytes, lastUsedMs: s.lastUsedMs })),
    };
  }

  /**
   * Makes room for `needBytes` more under the budget, for a version of `model`: evicts the least recently used
   * models that are idle (nothing queued or running), are no rollout's canary and not `model` itself, and are on
   * executors of their own. Either enough of them leave or none does (MESH_TOO_LARGE, the agent serving on as before).
   * Everything up to the un-announcement runs without an await, so no request slips in between the check and the
   * eviction.
   */
  private async makeRoom(model: string, needBytes: number): Promise<void> {
    if (this.budgetBytes === undefined) return;
    const { usedBytes } = this.memory();
    let over = usedBytes + needBytes - this.budgetBytes;
    if (over <= 0) return;
    const candidates = [...this.routes.entries()]
      .filter(([name, r]) => name !== model && !r.canary && r.primary?.executors && this.hooks.scheduler.isIdle(r.primary.key))
      .map(([name, r]) => ({ name, slot: r.primary! }))
      .sort((a, b) => a.slot.lastUsedMs - b.slot.lastUsedMs);
    const evict: typeof candidates = [];
    for (const c of candidates) {
      if (over <= 0) break;
      evict.push(c);
      over -= c.slot.estimateBytes;
    }
    if (over > 0)
      throw new MeshError(
        'MESH_TOO_LARGE',
        `${model} needs ~${mib(needBytes)} MiB, ${mib(usedBytes)} of the ${mib(this.budgetBytes)} MiB memory budget are in use, and evicting every idle model would free only ${mib(
          candidates.reduce((n, c) => n + c.slot.estimateBytes, 0),
        )} MiB`,
        { details: { needBytes, usedBytes, budgetBytes: this.budgetBytes } },
      );
    for (const { name, slot } of evict) {
      this.routes.delete(name);
      const index = this.hooks.modelInfos.findIndex((m) => m.name === name);
      if (index >= 0) this.hooks.modelInfos.splice(index, 1);
      // Idle, so the scheduler lets it go at once; its requests from now on are MESH_UNKNOWN_MODEL (another agent may serve it).
      this.hooks.scheduler.removeIdleModel(slot.key);
      this.hooks.models.delete(slot.key);
    }
    this.hooks.announce();
    for (const { name, slot } of evict) {
      await slot.executors?.close();
      this.record({
        model: name,
        version: slot.version,
        ok: true,
        message: `model evicted for the memory budget (~${mib(slot.estimateBytes)} MiB, idle since ${new Date(slot.lastUsedMs).toISOString()})`,
      });
    }
  }

  /**
   * Registers the versions the agent started with (`path`: the file each was loaded from; `executorsOf`: each
   * model's own executors, with a memory budget); then re-applies a canary the journal says was running.
   */
  async start(
    entries: (ManifestEntry & { path: string })[],
    loaded: ReadonlyMap<string, LoadedModel>,
    executorsOf?: ReadonlyMap<string, Executors>,
  ): Promise<void> {
    await mkdir(path.join(this.options.stateDir, 'bundles'), { recursive: true });
    this.journal = await readDeployJournal(this.options.stateDir);
    const now = Date.now();
    for (const entry of entries) {
      const info = this.hooks.modelInfos.find((m) => m.name === entry.name);
      if (!info || !loaded.has(entry.name)) continue;
      const executors = executorsOf?.get(entry.name);
      const bytes = (await stat(entry.path)).size;
      this.routes.set(entry.name, {
        primary: {
          key: entry.name,
          version: entry.version,
          sha256: entry.sha256,
          priceMicros: entry.priceMicros,
          info,
          ...(executors ? { executors } : {}),
          estimateBytes: this.estimate(bytes, executors ? executors.workerThreads() : this.hooks.options.workers),
          lastUsedMs: now,
        },
      });
    }
    const { usedBytes } = this.memory();
    if (this.budgetBytes !== undefined && usedBytes > this.budgetBytes)
      this.hooks.logger.warn(
        { usedMiB: mib(usedBytes), budgetMiB: mib(this.budgetBytes) },
        'the models folder alone is over the memory budget: deployments will evict idle models first',
      );
    for (const [model, j] of Object.entries(this.journal.models)) {
      if (!j.canary) continue;
      try {
        await this.loadCanary(model, j.canary.version, j.canary.sha256, j.canary.priceMicros, []);
      } catch (err) {
        this.record({
          model,
          version: j.canary.version,
          ok: false,
          code: toMeshError(err).code,
          message: `canary not reloaded: ${(err as Error).message}`,
        });
      }
    }
  }

  /** Topic filters the link subscribes to on every (re)connect. */
  filters(): string[] {
    return this.options.groups.map((g) => deploymentTopics.group(g));
  }

  /** The slot key a request runs on, and the version it reports. Unknown versions fall back to the default. */
  readonly resolve = (model: string, version: string | undefined): { key: string; version?: string } | undefined => {
    const route = this.routes.get(model);
    if (!route) return undefined;
    const slot = version !== undefined && route.canary?.version === version ? route.canary : (route.primary ?? route.canary);
    if (!slot) return undefined;
    slot.lastUsedMs = Date.now();
    return { key: slot.key, version: slot.version };
  };

  /** The status's `canaries`. */
  canaries(): { name: string; version: string; sha256: string; latencyMs: number }[] {
    const out = [];
    for (const [name, r] of this.routes)
      if (r.canary) out.push({ name, version: r.canary.version, sha256: r.canary.sha256, latencyMs: r.canary.info.latencyMs });
    return out;
  }

  /** A message on a deployment topic. */
  onMessage(topic: string, payload: Buffer): void {
    const where = parseDeploymentTopic(topic);
    if (!where || payload.byteLength === 0) return;
    this.chain = this.chain.then(() => this.apply(where, payload)).catch(() => {});
  }

  /** Resolves once every step received so far was applied or refused. */
  settled(): Promise<void> {
    return this.chain;
  }

  async close(): Promise<void> {
    this.closed = true;
    await this.chain;
    for (const r of this.routes.values()) for (const s of [r.primary, r.canary]) await s?.executors?.close();
    for (const s of this.retiring) await s.executors?.close();
  }

  private record(event: Omit<DeployEvent, 'at'>): void {
    const e = { at: Date.now(), ...event };
    this.events.push(e);
    if (this.events.length > 1000) this.events.shift();
    if (e.ok) this.hooks.logger.info({ model: e.model, version: e.version, seq: e.seq, phase: e.phase }, e.message);
    else this.hooks.logger.warn({ model: e.model, version: e.version, seq: e.seq, code: e.code }, e.message);
  }

  private async apply(where: { group: string; model: string }, payload: Buffer): Promise<void> {
    if (this.closed) return;
    let signed: SignedDeployment;
    let step: Deployment;
    try {
      signed = decodeCbor(payload) as SignedDeployment;
      if (!checkSignedDeployment.Check(signed)) throw new MeshError('MESH_BAD_REQUEST', 'not a signed deployment manifest');
      step = verifyDeployment(signed, this.options.operators);
    } catch (err) {
      const e = toMeshError(err, 'MESH_BAD_REQUEST');
      this.record({ model: where.model, ok: false, code: e.code, message: `deployment refused: ${e.message}` });
      return;
    }
    const base = { model: step.model, version: step.version, seq: step.seq, phase: step.phase };
    if (step.group !== where.group || step.model !== where.model) {
      this.record({
        ...base,
        ok: false,
        code: 'MESH_UNAUTHORIZED',
        message: `deployment refused: signed for ${step.group}/${step.model}, published on ${where.group}/${where.model}`,
      });
      return;
    }
    if (!this.options.groups.includes(step.group)) {
      this.record({
        ...base,
        ok: false,
        code: 'MESH_FORBIDDEN',
        message: `deployment ignored: group ${step.group} is not one of this agent's`,
      });
      return;
    }
    const applied = this.journal.models[step.model];
    if (!isNewerStep(step, applied?.seq)) {
      // The retained step the agent already applied comes again on every reconnect: not worth a warning.
      if (applied?.seq !== step.seq)
        this.record({
          ...base,
          ok: false,
          code: 'MESH_UNAUTHORIZED',
          message: `deployment refused: seq ${step.seq} is not above ${applied?.seq} (a replayed older step)`,
        });
      return;
    }
    try {
      if (step.phase === 'canary')
        await this.loadCanary(step.model, step.version, step.sha256, step.priceMicros, step.urls ?? [], step.size);
      else if (step.phase === 'promoted') await this.promote(step);
      else await this.dropCanary(step.model, step.version);
    } catch (err) {
      const e = toMeshError(err, 'MESH_INTERNAL');
      this.record({ ...base, ok: false, code: e.code, message: `deployment failed: ${e.message}` });
      return;
    }
    const route = this.routes.get(step.model);
    const entry: JournalEntry = {
      seq: step.seq,
      ...(step.phase === 'promoted' || applied?.primary
        ? {
            primary:
              step.phase === 'promoted' ? { version: step.version, sha256: step.sha256, priceMicros: step.priceMicros } : applied!.primary!,
          }
        : {}),
      ...(route?.canary
        ? { canary: { version: route.canary.version, sha256: route.canary.sha256, priceMicros: route.canary.priceMicros } }
        : {}),
      step: signedDeploymentToJson(signed),
    };
    this.journal.models[step.model] = entry;
    await writeAtomically(path.join(this.options.stateDir, JOURNAL), `${JSON.stringify(this.journal, null, 2)}\n`);
    this.hooks.announce();
    this.record({ ...base, ok: true, message: `deployment step applied: ${step.phase}` });
  }

  /** Fetches (or finds) the bundle, checks it, loads and warms it beside the running version. */
  private async loadCanary(
    model: string,
    version: string,
    sha256: string,
    priceMicros: number,
    urls: string[],
    size?: number,
  ): Promise<void> {
    const route = this.routes.get(model) ?? {};
    if (route.canary?.sha256 === sha256) return;
    if (route.primary?.sha256 === sha256)
      throw new MeshError('MESH_BAD_REQUEST', `version ${version} of ${model} is already the default here`);
    const file = await this.fetchBundle(sha256, urls, size);
    const bytes = (await stat(file)).size;
    // Before loading: the new version's sessions come on top of everything loaded (its worker count is the most it takes).
    await this.makeRoom(model, this.estimate(bytes, this.hooks.options.workers));
    const key = `${model}@${version}`;
    const executors = closingOnce(
      await this.hooks.openExecutors(
        [{ name: key, path: file, providers: this.hooks.options.providers, warmup: undefined }],
        this.hooks.options,
        this.hooks.logger,
      ),
    );
    const loaded = executors.loaded[0];
    if (!loaded) {
      await executors.close();
      throw new MeshError('MESH_INTERNAL', `bundle ${sha256} did not load`);
    }
    const info: ModelInfo = {
      name: model,
      version,
      sha256,
      priceMicros,
      latencyMs: Math.round(loaded.latencyMs * 1000) / 1000,
      inputs: loaded.inputs,
      outputs: loaded.outputs,
    };
    const old = route.canary;
    this.hooks.models.set(key, { ...loaded });
    this.hooks.scheduler.addModel(key, loaded.latencyMs, executors.executorOf.get(key)!);
    route.canary = {
      key,
      version,
      sha256,
      priceMicros,
      info,
      executors,
      estimateBytes: this.estimate(bytes, executors.workerThreads()),
      lastUsedMs: Date.now(),
    };
    this.routes.set(model, route);
    if (old) void this.retire(old);
  }

  private async promote(step: Deployment): Promise<void> {
    const route = this.routes.get(step.model) ?? {};
    if (route.canary?.sha256 !== step.sha256) {
      await this.loadCanary(step.model, step.version, step.sha256, step.priceMicros, step.urls ?? [], step.size);
    }
    const r = this.routes.get(step.model)!;
    const next = r.canary!;
    const old = r.primary;
    r.primary = next;
    delete r.canary;
    const index = this.hooks.modelInfos.findIndex((m) => m.name === step.model);
    if (index >= 0) this.hooks.modelInfos[index] = next.info;
    else this.hooks.modelInfos.push(next.info);
    if (old) void this.retire(old);
  }

  private async dropCanary(model: string, version: string): Promise<void> {
    const r = this.routes.get(model);
    if (!r?.canary || r.canary.version !== version) return;
    const old = r.canary;
    delete r.canary;
    void this.retire(old);
  }

  /**
   * A slot no request resolves to any more: once its queue is empty it leaves the scheduler and its executor closes.
   * Once the agent closes it stops waiting: close() closes the executor of every retiring slot, and a run that executor
   * dropped on closing never leaves the scheduler, so the wait would poll every 20 ms for ever and keep the process up.
   */
  private async retire(slot: Slot): Promise<void> {
    this.retiring.add(slot);
    while (!this.hooks.scheduler.removeIdleModel(slot.key)) {
      if (this.closed) return;
      await new Promise((r) => setTimeout(r, 20));
    }
    this.hooks.models.delete(slot.key);
    // Without a memory budget a version loaded at start shares the worker pool with the other models: its session stays until restart.
    await slot.executors?.close();
    this.retiring.delete(slot);
    this.hooks.logger.info({ model: slot.key, version: slot.version }, 'model version unloaded');
  }

  private async fetchBundle(sha256: string, urls: string[], size: number | undefined): Promise<string> {
    const file = bundlePath(this.options.stateDir, sha256);
    if (existsSync(file) && (await sha256File(file)) === sha256) return file;
    const { maxBundleBytes = 512 * 2 ** 20, fetchTimeoutMs = 120_000, bundleBaseUrls = [] } = this.options;
    const limit = Math.min(size ?? maxBundleBytes, maxBundleBytes);
    const candidates = [...urls, ...bundleBaseUrls.map((b) => `${b.replace(/\/+$/, '')}/bundles/${sha256}`)];
    if (candidates.length === 0) throw new MeshError('MESH_CONFIG', `no URL to fetch bundle ${sha256} from`);
    const problems: string[] = [];
    for (const url of candidates) {
      try {
        const bytes = await fetchCapped(url, limit, fetchTimeoutMs);
        const actual = createHash('sha256').update(bytes).digest('hex');
        if (actual !== sha256) {
          problems.push(`${url}: bytes hash to ${actual}`);
          continue;
        }
        const tmp = `${file}.${process.pid}.tmp`;
        const handle = await open(tmp, 'w', 0o600);
        try {
          await handle.writeFile(bytes);
          await handle.sync();
        } finally {
          await handle.close();
        }
        await rename(tmp, file);
        return file;
      } catch (err) {
        problems.push(`${url}: ${(err as Error).message}`);
      }
    }
    await rm(`${file}.${process.pid}.tmp`, { force: true });
    throw new MeshError('MESH_MODEL_INTEGRITY', `no source gave bundle ${sha256}: ${problems.join('; ')}`);
  }
}

/** GET with a byte cap enforced while reading, so a lying server cannot make the agent buffer more than the manifest's size. */
async function fetchCapped(url: string, limit: number, timeoutMs: number): Promise<Buffer> {
  const response = await fetch(url, { signal: AbortSignal.timeout(timeoutMs) });
  if (!response.ok || !response.body) throw new MeshError('MESH_NOT_FOUND', `HTTP ${response.status}`);
  const parts: Buffer[] = [];
  let total = 0;
  for await (const chunk of response.body as unknown as AsyncIterable<Uint8Array>) {
    total += chunk.byteLength;
    if (total > limit) throw new MeshError('MESH_TOO_LARGE', `more than the ${limit} bytes announced`);
    parts.push(Buffer.from(chunk));
  }
  return Buffer.concat(parts);
}
