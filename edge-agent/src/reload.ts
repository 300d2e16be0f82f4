/**
 * Re-reading the models folder while serving (docs/agent.md, "Reloading the models folder"): `edge-mesh agent`
 * calls `reloadModels` on SIGHUP.
 *
 *   plan     the manifest against what is served: added, changed (sha256 differs), removed, unchanged
 *   check    every file to load against its manifest sha256; a failing one is refused and, if a model of that name
 *            runs, it keeps running
 *   load     the new and changed models on executors of their own (executors.ts), beside the running ones, at the
 *            workers' load priority (`loadNice`); each is warm (warm-up runs done) when its load resolves. Models
 *            that shared executors with a changed or removed one are loaded again with it, so the old executors
 *            can close and free their memory
 *   swap     the scheduler hands a changed model's queued requests to the new executor; removed models take no new
 *            request (MESH_UNKNOWN_MODEL) and leave the status once their queued and running requests are done; an
 *            executor left with no model and no job is closed
 *
 * A bad manifest, a failed sha256 or a failed load is logged with its MESH_* code and the agent serves what it had.
 * The agent side is reached through `ServedModels`, so another way of loading models beside running ones (a
 * signed deployment, say) can use `loadBeside` and `swapIn` the same way.
 */
import path from 'node:path';
import { MeshError, type ModelInfo, toMeshError } from '@edge-mesh/protocol';
import type { Logger } from 'pino';
import type { Executor } from './executor.ts';
import { type ExecutorOptions, type Executors, openExecutors } from './executors.ts';
import { type ManifestEntry, readManifest, sha256File } from './manifest.ts';
import { describeModels } from './models.ts';
import type { Scheduler } from './scheduler.ts';
import type { UnitSpec } from './units.ts';
import type { LoadedModel } from './worker-protocol.ts';

/** What a reload did. `code` is set when it was refused as a whole (a bad manifest, payments on). */
export interface ReloadResult {
  ok: boolean;
  code?: string;
  message?: string;
  added: string[];
  changed: string[];
  removed: string[];
  /** Models the manifest lists that were not loaded, with the code of why. */
  refused: { model: string; code: string; message: string }[];
  /** The models served once the reload is done. */
  models: string[];
}

export interface ReloadPlan {
  load: ManifestEntry[];
  added: string[];
  changed: string[];
  removed: string[];
}

/** Added and changed models are loaded; a model is changed when its file or sha256 differs. */
export function planReload(served: ReadonlyMap<string, ManifestEntry>, listed: readonly ManifestEntry[]): ReloadPlan {
  const plan: ReloadPlan = { load: [], added: [], changed: [], removed: [] };
  const names = new Set(listed.map((e) => e.name));
  for (const entry of listed) {
    const current = served.get(entry.name);
    if (!current) plan.added.push(entry.name);
    else if (current.sha256 !== entry.sha256 || current.file !== entry.file) plan.changed.push(entry.name);
    else continue;
    plan.load.push(entry);
  }
  for (const name of served.keys()) if (!names.has(name)) plan.removed.push(name);
  return plan;
}

/** The running agent's model tables, shared with index.ts and changed in place. */
export interface ServedModels {
  modelsDir: string;
  /** The manifest entry of each model served. */
  entries: Map<string, ManifestEntry>;
  /** What requests.ts checks inputs against. */
  loaded: Map<string, LoadedModel>;
  /** Models that run in units. */
  units: Map<string, UnitSpec>;
  /** The status's model list (status.ts announces this array). */
  infos: ModelInfo[];
  scheduler: Scheduler;
  /** Every executor set opened: the one from start and one per load beside. */
  executorSets: Executors[];
  executorOptions: ExecutorOptions;
  providers: string[];
  /** Publishes the status again. */
  announce(): void;
  /** Set when the agent takes payment: its price list is signed at start, so its models cannot change here. */
  paying: boolean;
  closed(): boolean;
  logger: Logger;
}

/** How often a removed model's leftover work is checked for. */
const RETIRE_POLL_MS = 50;

/** Loads `entries` on executors of their own, warm when it resolves; nothing served changes. */
export async function loadBeside(served: ServedModels, entries: ManifestEntry[]): Promise<{ executors: Executors; infos: ModelInfo[] }> {
  const executors = await openExecutors(
    entries.map((e) => ({
      name: e.name,
      path: path.join(served.modelsDir, e.file),
      providers: served.providers,
      warmup: e.warmup,
    })),
    served.executorOptions,
    served.logger,
  );
  try {
    const byName = new Map(executors.loaded.map((m) => [m.name, m]));
    return { executors, infos: describeModels(entries, byName) };
  } catch (err) {
    await executors.close();
    throw err;
  }
}

/** Serves what `loadBeside` loaded, in place of any running model of the same name. */
export function swapIn(served: ServedModels, entries: ManifestEntry[], set: { executors: Executors; infos: ModelInfo[] }): void {
  served.executorSets.push(set.executors);
  for (const m of set.executors.loaded) {
    const entry = entries.find((e) => e.name === m.name)!;
    served.entries.set(m.name, entry);
    served.loaded.set(m.name, m);
    if (entry.units) served.units.set(m.name, { maxUnits: entry.units.maxUnits, progressEvery: entry.units.progressEvery ?? 1 });
    else served.units.delete(m.name);
    served.scheduler.addModel(m.name, m.latencyMs, set.executors.executorOf.get(m.name)!);
    const info = set.infos.find((i) => i.name === m.name)!;
    const at = served.infos.findIndex((i) => i.name === m.name);
    if (at >= 0) served.infos[at] = info;
    else served.infos.push(info);
  }
}

/** Stops taking requests for `names`; resolves once their queued and running requests are done and they have left the status. */
export async function retire(served: ServedModels, names: string[]): Promise<void> {
  for (const name of names) {
    served.scheduler.removeModel(name);
    served.loaded.delete(name);
    served.units.delete(name);
    served.entries.delete(name);
  }
  while (!served.closed() && names.some((n) => served.scheduler.retiredBusy(n))) {
    await new Promise((r) => setTimeout(r, RETIRE_POLL_MS));
  }
  for (const name of names) {
    const at = served.infos.findIndex((i) => i.name === name);
    if (at >= 0) served.infos.splice(at, 1);
  }
}

/** Closes executor sets left with no model and no job (a replaced or removed model's old executors). */
export async function closeUnused(served: ServedModels): Promise<void> {
  for (;;) {
    if (served.closed()) return;
    const busy = (set: Executors) => [...new Set<Executor>(set.executorOf.values())].some((e) => served.scheduler.inUse(e));
    const unused = served.executorSets.filter((set) => !busy(set));
    for (const set of unused) {
      served.executorSets.splice(served.executorSets.indexOf(set), 1);
      await set.close();
    }
    if (served.executorSets.every(busy) && !served.executorSets.some((s) => retiring(served, s))) return;
    await new Promise((r) => setTimeout(r, RETIRE_POLL_MS));
  }
}

/** A set some of whose models were replaced or removed but still run jobs. */
function retiring(served: ServedModels, set: Executors): boolean {
  return set.loaded.some((m) => served.scheduler.retiredBusy(m.name) && served.loaded.get(m.name) !== m);
}

/** Re-reads the models folder and serves what it lists now; never throws (a refusal is in the result and the log). */
export async function reloadModelsFolder(served: ServedModels): Promise<ReloadResult> {
  const { logger } = served;
  const result: ReloadResult = { ok: true, added: [], changed: [], removed: [], refused: [], models: [] };
  const refuse = (err: unknown): ReloadResult => {
    const e = toMeshError(err);
    logger.error({ code: e.code, err: e.message }, 'models reload refused; serving the models it had');
    return { ...result, ok: false, code: e.code, message: e.message, models: served.infos.map((i) => i.name) };
  };
  let listed: ManifestEntry[];
  try {
    listed = (await readManifest(served.modelsDir)).models;
  } catch (err) {
    return refuse(err);
  }
  const plan = planReload(served.entries, listed);
  if (served.paying && (plan.load.length > 0 || plan.removed.length > 0)) {
    return refuse(
      new MeshError(
        'MESH_CONFIG',
        'a paying agent\'s price list is signed at start: restart it to change its models (docs/agent.md, "Reloading the models folder")',
      ),
    );
  }
  const toLoad: ManifestEntry[] = [];
  for (const entry of plan.load) {
    const file = path.join(served.modelsDir, entry.file);
    let actual: string | undefined;
    try {
      actual = await sha256File(file);
    } catch (err) {
      actual = undefined;
      result.refused.push({ model: entry.name, code: 'MESH_MODEL_INTEGRITY', message: `model file unreadable: ${(err as Error).message}` });
    }
    if (actual !== undefined && actual !== entry.sha256) {
      result.refused.push({ model: entry.name, code: 'MESH_MODEL_INTEGRITY', message: `${file} does not match its sha256` });
    }
    if (actual === entry.sha256) toLoad.push(entry);
  }
  // An executor set frees its memory only when it closes, which it does once none of its models is served. So the
  // models sharing a set with a changed or removed one move with it into the new set (loaded again, from the
  // entries they run now), and the old set closes once its last jobs are done.
  const setOf = (name: string) => served.executorSets.find((set) => set.loaded.includes(served.loaded.get(name)!));
  const touched = new Set([...toLoad.map((e) => e.name), ...plan.removed].map(setOf).filter((set) => set !== undefined));
  const moved: ManifestEntry[] = [];
  for (const [name, entry] of served.entries) {
    const set = setOf(name);
    if (set && touched.has(set) && !plan.removed.includes(name) && !toLoad.some((e) => e.name === name)) moved.push(entry);
  }
  for (const r of result.refused) {
    logger.error(
      { model: r.model, code: r.code, err: r.message, keeps: served.entries.has(r.model) ? 'the running version' : undefined },
      'model refused on reload',
    );
  }

  if (toLoad.length > 0 || moved.length > 0) {
    let set: Awaited<ReturnType<typeof loadBeside>> | undefined;
    try {
      set = await loadBeside(served, [...toLoad, ...moved]);
    } catch (err) {
      const e = toMeshError(err);
      for (const entry of toLoad.length > 0 ? toLoad : moved) result.refused.push({ model: entry.name, code: e.code, message: e.message });
      logger.error({ models: [...toLoad, ...moved].map((x) => x.name), code: e.code, err: e.message }, 'models failed to load on reload');
    }
    if (set && served.closed()) {
      await set.executors.close();
      return { ...result, ok: false, code: 'MESH_SHUTTING_DOWN', message: 'the agent closed during the reload' };
    }
    if (set) {
      swapIn(served, [...toLoad, ...moved], set);
      for (const m of set.executors.loaded) {
        if (moved.some((e) => e.name === m.name)) continue;
        (plan.added.includes(m.name) ? result.added : result.changed).push(m.name);
        logger.info({ model: m.name, provider: m.provider, latencyMs: m.latencyMs }, 'model loaded on reload');
      }
    }
  }
  result.removed = plan.removed;
  if (result.added.length > 0 || result.changed.length > 0) served.announce();
  if (plan.removed.length > 0) {
    await retire(served, plan.removed);
    served.announce();
  }
  void closeUnused(served).catch((err: unknown) => logger.warn({ err: (err as Error).message }, 'closing unused executors failed'));
  result.models = served.infos.map((i) => i.name);
  logger.info(
    {
      added: result.added,
      changed: result.changed,
      removed: result.removed,
      refused: result.refused.map((r) => r.model),
      models: result.models,
    },
    'models reloaded',
  );
  return result;
}
