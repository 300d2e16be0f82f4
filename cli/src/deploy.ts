/**
 * Model rollouts from the command line (docs/cli.md, "deploy, rollout status, promote, rollback"; docs/deployment.md):
 * `edge-mesh deploy` reads a model (an .onnx file, a models folder entry, a Triton model repository), uploads its
 * bundle to the router and signs the canary step with the operator's key; `rollout status` shows what the router
 * knows; `promote` and `rollback` sign the step that ends a running canary. Every step is signed here, on the
 * operator's machine: the router stores and publishes it but cannot make one up.
 *
 * What the router answers is checked before anything is signed from it: the step `promote` and `rollback` copy is the
 * one the router's audit log holds for the running canary, decoded and compared with its status, so a router that
 * lies about the rollout gets at most a signed step for a version that is not the canary, which agents ignore
 * (edge-agent/src/deploy.ts drops only the canary it runs).
 */
import { readFile } from 'node:fs/promises';
import { loadKeyFile } from '@edge-mesh/client';
import {
  bundleAddress,
  checkDeployment,
  type Deployment,
  decodeCbor,
  type Identity,
  MeshError,
  type RolloutPlan,
  signDeployment,
  signedDeploymentFromJson,
  signedDeploymentToJson,
} from '@edge-mesh/protocol';
import { type Command, InvalidArgumentError } from 'commander';
import { call, credential, DEFAULT_ROUTER, table, terminalSafe } from './console.ts';
import { collect, nonNegativeInt, nonNegativeNumber, positiveInt, positiveNumber } from './options.ts';

const keyWarnings = { warn: (message: string) => process.stderr.write(`edge-mesh: warning: ${message}\n`) };
const print = (text: string): void => {
  process.stdout.write(text);
};

const BUNDLE_MEDIA_TYPE = 'application/vnd.edge-mesh.bundle';
const VERSION = /^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$/;
const GROUP = /^[a-z0-9][a-z0-9-]{2,63}$/;

function share(value: string): number {
  const n = Number(value);
  if (!Number.isFinite(n) || n <= 0 || n >= 1) throw new InvalidArgumentError('must be a number between 0 and 1 (exclusive)');
  return n;
}
function fraction(value: string): number {
  const n = Number(value);
  if (value.trim() === '' || !Number.isFinite(n) || n < 0 || n > 1) throw new InvalidArgumentError('must be a number from 0 to 1');
  return n;
}
function ratio(value: string): number {
  const n = Number(value);
  if (!Number.isFinite(n) || n < 1 || n > 1000) throw new InvalidArgumentError('must be a number from 1 to 1000');
  return n;
}

interface RouterFlags {
  router: string;
  apiKeyFile?: string;
}

function routerFlags(cmd: Command): Command {
  return cmd
    .option('--router <url>', "the router's HTTP API (env MESH_ROUTER_URL)", process.env.MESH_ROUTER_URL ?? DEFAULT_ROUTER)
    .option(
      '--api-key-file <file>',
      'file holding an API key or mesh token with the operator scope (env MESH_API_KEY holds the key itself)',
    );
}

interface RolloutStatusView {
  model: string;
  group: string;
  version: string;
  seq: number;
  phase: Deployment['phase'];
  previous?: { version: string; sha256: string };
  plan: RolloutPlan;
  canaryAgents: number;
  verdict?: { decision: string; reason: string };
  stats?: { previous: WindowStats; next: WindowStats };
}
interface WindowStats {
  requests: number;
  errorRate: number;
  p95Ms: number;
}
interface AuditView {
  at: number;
  model: string;
  version: string;
  seq: number;
  phase: string;
  by: string;
  reason: string;
  step: { manifest: string; sig: string };
}

/** The router's rollout of `model`, or undefined when it has none. */
async function rolloutOf(opts: RouterFlags, key: string | undefined, model: string) {
  try {
    return (await call(opts.router, `/v1/rollouts/${encodeURIComponent(model)}`, { key })) as {
      rollout: RolloutStatusView;
      audit: AuditView[];
    };
  } catch (err) {
    if (err instanceof MeshError && err.code === 'MESH_NOT_FOUND' && err.details?.status === 404) return undefined;
    throw err;
  }
}

/**
 * The seq of the next step: above the router's last for the model and, so that a router which lost its audit log
 * cannot make agents refuse the step as a replay, at least the current time in ms (agents keep the highest seq they
 * applied, edge-agent/src/deploy.ts).
 */
const nextSeq = (last: number | undefined) => Math.max((last ?? 0) + 1, Date.now());

async function postStep(opts: RouterFlags, key: string | undefined, operator: Identity, step: Deployment) {
  const signed = signDeployment(operator, step);
  return call(opts.router, '/v1/deployments', { key, body: signedDeploymentToJson(signed) });
}

/** The version the fleet serves now: what most agents announce for the model (the router's GET /v1/agents). */
async function servedVersion(
  opts: RouterFlags,
  key: string | undefined,
  model: string,
): Promise<{ version: string; sha256: string; priceMicros?: number } | undefined> {
  const view = (await call(opts.router, '/v1/agents', { key })) as {
    agents: { up: boolean; models: { name: string; version: string; sha256?: string; priceMicros?: number }[] }[];
  };
  const counts = new Map<string, { version: string; sha256: string; priceMicros?: number; n: number }>();
  for (const a of view.agents) {
    if (!a.up) continue;
    for (const m of a.models) {
      if (m.name !== model || typeof m.sha256 !== 'string' || !/^[0-9a-f]{64}$/.test(m.sha256) || !VERSION.test(m.version)) continue;
      const k = `${m.version}\0${m.sha256}`;
      const price = Number.isSafeInteger(m.priceMicros) && m.priceMicros! >= 0 ? { priceMicros: m.priceMicros! } : {};
      const c = counts.get(k) ?? { version: m.version, sha256: m.sha256, ...price, n: 0 };
      c.n++;
      counts.set(k, c);
    }
  }
  const best = [...counts.values()].sort((a, b) => b.n - a.n)[0];
  if (!best) return undefined;
  return { version: best.version, sha256: best.sha256, ...(best.priceMicros !== undefined ? { priceMicros: best.priceMicros } : {}) };
}

interface DeployFlags extends RouterFlags {
  model: string;
  version?: string;
  group: string;
  key: string;
  canaryShare: number;
  minRequests: number;
  maxP95Ratio: number;
  minP95DeltaMs: number;
  maxErrorDelta: number;
  maxCanaryS?: number;
  price?: number;
  url: string[];
  notes?: string;
}

async function deploy(target: string, opts: DeployFlags, cmd: Command): Promise<void> {
  if (!VERSION.test(opts.model)) cmd.error(`error: --model ${JSON.stringify(opts.model)} is not a model name (A-Z, a-z, 0-9, ., _, -)`);
  if (!GROUP.test(opts.group)) cmd.error(`error: --group ${JSON.stringify(opts.group)} is not a group (3 to 64 of a-z, 0-9 and -)`);
  if (opts.version !== undefined && !VERSION.test(opts.version))
    cmd.error(`error: --version ${JSON.stringify(opts.version)} is not a version (A-Z, a-z, 0-9, ., _, -)`);
  const operator = await loadKeyFile(opts.key, 'operator', keyWarnings);
  // The agent package reads models folders, ONNX declarations and Triton repositories (edge-agent/src/model-source.ts).
  const { checkConfigAgainstModel, declaredInputs, readManifest, readModelSource } = await import('@edge-mesh/agent');
  const source = await readModelSource(target, opts.model, opts.version);
  if (source.version === undefined) cmd.error(`error: --version is needed to deploy the file ${target}`);
  const version = source.version!;
  const bytes = await readFile(source.file);
  if (bytes.byteLength === 0) throw new MeshError('MESH_CONFIG', `${source.file} is empty`);
  const sha256 = bundleAddress(bytes);
  if (source.layout === 'models-folder') {
    const entry = (await readManifest(target)).models.find((e) => e.name === opts.model)!;
    if (entry.sha256 !== sha256)
      throw new MeshError(
        'MESH_MODEL_INTEGRITY',
        `${source.file} hashes to ${sha256}, but the models folder's manifest says ${entry.sha256}`,
      );
  }
  if (source.config) {
    checkConfigAgainstModel(source.config, await declaredInputs(source.file), source.file);
  }

  const key = await credential(opts.apiKeyFile);
  const current = await rolloutOf(opts, key, opts.model);
  if (current?.rollout.phase === 'canary')
    throw new MeshError(
      'MESH_BAD_REQUEST',
      `a canary of ${opts.model} ${current.rollout.version} is running: promote it or roll it back first (edge-mesh promote|rollback ${opts.model})`,
    );
  // The version being replaced, and its price (the new version's unless --price or a models folder says otherwise).
  let previous: { version: string; sha256: string } | undefined;
  let previousPrice: number | undefined;
  let lastStep: Deployment | undefined;
  try {
    const last = current?.audit.at(-1);
    const manifest = last ? decodeCbor(signedDeploymentFromJson(last.step).manifest) : undefined;
    if (checkDeployment.Check(manifest) && manifest.model === opts.model) lastStep = manifest;
  } catch {}
  if (current?.rollout.phase === 'promoted' && lastStep?.version === current.rollout.version) {
    previous = { version: lastStep.version, sha256: lastStep.sha256 };
    previousPrice = lastStep.priceMicros;
  } else if (current?.rollout.phase === 'rolled-back' && current.rollout.previous) previous = current.rollout.previous;
  if (!previous || previousPrice === undefined) {
    const served = await servedVersion(opts, key, opts.model);
    if (!previous && served) previous = { version: served.version, sha256: served.sha256 };
    if (served && served.version === previous?.version) previousPrice ??= served.priceMicros;
  }
  if (!previous)
    throw new MeshError(
      'MESH_NOT_FOUND',
      `no live agent serves ${opts.model} yet: a canary needs a running version to compare with (add the model to the agents' models folder first)`,
    );
  if (previous.version === version || previous.sha256 === sha256)
    throw new MeshError(
      'MESH_BAD_REQUEST',
      `${opts.model} ${previous.version} (${previous.sha256.slice(0, 12)}…) is what the agents serve already`,
    );

  const stored = (await call(opts.router, '/v1/bundles', {
    key,
    bytes,
    mediaType: BUNDLE_MEDIA_TYPE,
    method: 'PUT',
    timeoutMs: 600_000,
  })) as {
    sha256?: string;
    size?: number;
  };
  if (stored.sha256 !== sha256 || stored.size !== bytes.byteLength)
    throw new MeshError(
      'MESH_MODEL_INTEGRITY',
      `the router stored the bundle as ${stored.sha256} (${stored.size} bytes), not ${sha256} (${bytes.byteLength})`,
    );
  const step: Deployment = {
    v: 1,
    kind: 'deployment',
    operator: operator.id,
    seq: nextSeq(current?.rollout.seq),
    issuedAt: Date.now(),
    group: opts.group,
    model: opts.model,
    version,
    sha256,
    size: bytes.byteLength,
    priceMicros: opts.price ?? source.priceMicros ?? previousPrice ?? 0,
    phase: 'canary',
    previous,
    plan: {
      canaryShare: opts.canaryShare,
      minRequests: opts.minRequests,
      maxErrorRateDelta: opts.maxErrorDelta,
      maxP95LatencyRatio: opts.maxP95Ratio,
      // Left out at 0: agents and routers from before the field refuse a plan that has it.
      ...(opts.minP95DeltaMs > 0 ? { minP95DeltaMs: opts.minP95DeltaMs } : {}),
      ...(opts.maxCanaryS !== undefined ? { maxCanaryMs: Math.round(opts.maxCanaryS * 1000) } : {}),
    },
    ...(opts.url.length > 0 ? { urls: opts.url } : {}),
    ...(opts.notes !== undefined ? { notes: opts.notes } : {}),
  };
  await postStep(opts, key, operator, step);
  print(
    `${JSON.stringify({
      model: step.model,
      version,
      group: step.group,
      phase: step.phase,
      seq: step.seq,
      sha256,
      size: step.size,
      priceMicros: step.priceMicros,
      layout: source.layout,
      previous,
      plan: step.plan,
    })}\n`,
  );
}

/** Signs the step that ends the running canary of `model`. */
async function endCanary(
  model: string,
  phase: 'promoted' | 'rolled-back',
  opts: RouterFlags & { key: string; reason?: string },
): Promise<void> {
  const operator = await loadKeyFile(opts.key, 'operator', keyWarnings);
  const key = await credential(opts.apiKeyFile);
  const current = await rolloutOf(opts, key, model);
  if (current?.rollout.phase !== 'canary')
    throw new MeshError(
      'MESH_BAD_REQUEST',
      current
        ? `no canary of ${model} is running: its last step is ${current.rollout.phase} ${current.rollout.version}`
        : `no canary of ${model} is running: the router has no rollout of it`,
    );
  const last = current.audit.at(-1);
  let running: Deployment | undefined;
  try {
    const manifest = last ? decodeCbor(signedDeploymentFromJson(last.step).manifest) : undefined;
    if (checkDeployment.Check(manifest)) running = manifest;
  } catch {}
  const r = current.rollout;
  if (running?.phase !== 'canary' || running.version !== r.version || running.seq !== r.seq || running.model !== model)
    throw new MeshError('MESH_INTERNAL', `the router's audit log and its status disagree about the canary of ${model}: nothing signed`);
  const step: Deployment = {
    ...running,
    operator: operator.id,
    seq: nextSeq(r.seq),
    issuedAt: Date.now(),
    phase,
    ...(opts.reason !== undefined ? { notes: opts.reason } : {}),
  };
  await postStep(opts, key, operator, step);
  print(`${JSON.stringify({ model, version: step.version, phase, seq: step.seq, previous: step.previous })}\n`);
}

const pct = (x: number) => `${(x * 100).toFixed(1)}%`;
const windowText = (w: WindowStats | undefined) => (w ? `${w.requests} req ${pct(w.errorRate)} err p95 ${w.p95Ms.toFixed(1)}ms` : '-');
const iso = (ms: number) => new Date(ms).toISOString().replace(/\.\d+Z$/, 'Z');

export function registerDeployCommands(program: Command): void {
  routerFlags(
    program
      .command('deploy')
      .description(
        'roll a model version out to a group of agents: upload its bundle to the router and sign a canary step; the router then splits traffic, judges the canary and promotes or rolls it back (docs/deployment.md)',
      )
      .argument(
        '<path>',
        'an .onnx file, a models folder (manifest.json), or a Triton model repository (<repo>/<model>/<version>/model.onnx)',
      )
      .requiredOption('--model <name>', 'the model to roll out (its entry in a models folder, its folder in a Triton repository)')
      .option('--version <v>', 'the new version (needed for an .onnx file; a Triton repository: the version folder, default the highest)')
      .requiredOption('--group <group>', 'the agent group the step targets (agents take steps for their own groups only)')
      .requiredOption('--key <file>', "the operator's key file: it signs the step (agents and the router trust it by its id)")
      .option('--canary-share <s>', "share of the router's forwarded requests sent to the new version during the canary", share, 0.1)
      .option('--min-requests <n>', 'answers each version needs before the router decides', positiveInt, 100)
      .option('--max-p95-ratio <x>', "roll back when the new version's p95 latency exceeds this many times the old one's", ratio, 1.5)
      .option(
        '--min-p95-delta-ms <ms>',
        "a latency rollback also needs the new p95 this many ms above the old one's (0: left out of the plan; agents and routers before this field refuse a plan that has it)",
        nonNegativeNumber,
        0,
      )
      .option(
        '--max-error-delta <d>',
        "roll back when the new version's error rate exceeds the old one's by more than this (0.01 = 1 point)",
        fraction,
        0.01,
      )
      .option(
        '--max-canary-s <s>',
        'roll back when no decision came this many seconds after the canary started (at least 1)',
        positiveNumber,
      )
      .option(
        '--price <micros>',
        "price per request in micro-dollars (default: the models folder entry's, else the replaced version's, else 0)",
        nonNegativeInt,
      )
      .option('--url <url>', 'also fetchable here (a mirror; agents check the hash whatever the source); repeatable', collect, [])
      .option('--notes <text>', 'a note kept in the signed step and the audit log'),
  ).action(async function (this: Command, target: string, opts: DeployFlags) {
    if (opts.maxCanaryS !== undefined && opts.maxCanaryS < 1) this.error('error: --max-canary-s must be at least 1');
    await deploy(target, opts, this);
  });

  const rollout = program.command('rollout').description('model rollouts the router runs (docs/deployment.md)');
  routerFlags(
    rollout
      .command('status')
      .description(
        "the router's rollouts: phase, versions, canary share, what each version answered in the window, verdict; with a model, its last audit entries",
      )
      .argument('[model]', 'one model: adds its audit log')
      .option('--audit <n>', 'audit entries to show with a model', positiveInt, 5)
      .option('--json', "print the router's JSON answer instead of a table", false),
  ).action(async (model: string | undefined, opts: RouterFlags & { json: boolean; audit: number }) => {
    const key = await credential(opts.apiKeyFile);
    let rollouts: RolloutStatusView[];
    let audit: AuditView[] = [];
    if (model === undefined) {
      const view = (await call(opts.router, '/v1/rollouts', { key })) as { rollouts: RolloutStatusView[] };
      if (opts.json) return print(`${JSON.stringify(view)}\n`);
      rollouts = view.rollouts;
    } else {
      const view = await rolloutOf(opts, key, model);
      if (!view) throw new MeshError('MESH_NOT_FOUND', `the router has no rollout of ${model}`);
      if (opts.json) return print(`${JSON.stringify(view)}\n`);
      rollouts = [view.rollout];
      audit = view.audit;
    }
    print(
      table(
        ['MODEL', 'GROUP', 'PHASE', 'VERSION', 'PREVIOUS', 'SEQ', 'SHARE', 'CANARY-AGENTS', 'PREVIOUS-WINDOW', 'CANARY-WINDOW', 'VERDICT'],
        rollouts.map((r) => [
          r.model,
          r.group,
          r.phase,
          r.version,
          r.previous?.version ?? '-',
          r.seq,
          r.phase === 'canary' ? pct(r.plan.canaryShare) : '-',
          r.phase === 'canary' ? r.canaryAgents : '-',
          windowText(r.stats?.previous),
          windowText(r.stats?.next),
          r.verdict ? `${r.verdict.decision}: ${r.verdict.reason}` : '-',
        ]),
      ),
    );
    if (audit.length > 0) {
      print('\n');
      print(
        table(
          ['AT', 'PHASE', 'VERSION', 'SEQ', 'BY', 'REASON'],
          audit.slice(-opts.audit).map((e) => [iso(e.at), e.phase, e.version, e.seq, e.by, terminalSafe(e.reason)]),
        ),
      );
    }
  });

  for (const [name, phase, what] of [
    ['promote', 'promoted', 'make the running canary the default version of every agent in its group'],
    ['rollback', 'rolled-back', 'drop the running canary: every agent in its group serves the previous version alone'],
  ] as const)
    routerFlags(
      program
        .command(name)
        .description(`${what}: signs the step with the operator's key and posts it to the router (refused when no canary is running)`)
        .argument('<model>', 'the model whose canary ends')
        .requiredOption('--key <file>', "the operator's key file")
        .option('--reason <text>', 'why, kept in the signed step and the audit log'),
    ).action(async (model: string, opts: RouterFlags & { key: string; reason?: string }) => endCanary(model, phase, opts));
}
