/**
 * Staged model rollouts on the router (docs/deployment.md): a bundle store addressed by sha256, the signed steps an
 * operator posts (each published, retained, on the group's deployment topic), the canary traffic split, the canary
 * analysis that promotes or rolls back, and an append-only, hash-chained audit log of every step.
 *
 * The split and the analysis follow the canary steps of Argo Rollouts (rollout/canary.go: setWeight, then an
 * analysis run that must pass before the next step) and Flagger (pkg/controller/scheduler.go: a metric check per
 * interval against thresholds, rollback on failure), with the router's own observations as the metrics: what the
 * router saw each version answer, never what an agent says about itself.
 */
import { createHash } from 'node:crypto';
import { appendFileSync, existsSync, mkdirSync, readFileSync, renameSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import {
  type AgentStatus,
  bundleAddress,
  type Deployment,
  decodeCbor,
  deploymentTopics,
  encodeMessage,
  type Identity,
  isNewerStep,
  MeshError,
  type RolloutPlan,
  type SignedDeployment,
  signDeployment,
  signedDeploymentFromJson,
  signedDeploymentToJson,
  verifyDeployment,
} from '@edge-mesh/protocol';
import type { FastifyInstance } from 'fastify';

export interface RolloutOptions {
  /** Operators whose signed steps the router takes: id → raw public key. */
  operators: ReadonlyMap<string, Uint8Array>;
  /** An operator key the router signs its own promotions and rollbacks with; absent: it reports the verdict and waits. */
  signer?: Identity;
  /** Holds `bundles/<sha256>.onnx` and `audit.jsonl` (created if missing). */
  dir: string;
  /** How often a running canary is judged, ms (default 250). */
  judgeEveryMs?: number;
  /** Largest bundle accepted on upload, bytes (default 512 MiB). */
  maxBundleBytes?: number;
  /** Random source in [0, 1) for the split (tests pass a seeded one). */
  random?: () => number;
}

/** The pino methods the rollouts log with (any pino logger fits; handle.ts's RouterLogger is one). */
interface RolloutLogger {
  info(obj: object, msg?: string): void;
  warn(obj: object, msg?: string): void;
  error(obj: object, msg?: string): void;
}

/** What the router saw one version answer during the canary. */
export interface VersionWindow {
  ok: number;
  failed: number;
  /** Latencies of the answered requests, ms (the last 10 000). */
  latenciesMs: number[];
}

export interface Verdict {
  decision: 'hold' | 'promote' | 'rollback';
  reason: string;
}

/** A summary of a window, for status and audit. */
export function summarize(w: VersionWindow): { requests: number; errorRate: number; p95Ms: number } {
  const requests = w.ok + w.failed;
  return { requests, errorRate: requests === 0 ? 0 : w.failed / requests, p95Ms: percentile(w.latenciesMs, 0.95) };
}

function percentile(values: number[], q: number): number {
  if (values.length === 0) return 0;
  const sorted = [...values].sort((a, b) => a - b);
  return sorted[Math.min(sorted.length - 1, Math.floor(q * sorted.length))]!;
}

/**
 * The canary analysis, pure: roll back as soon as the new version has its sample and is worse than the plan allows
 * (error rate above the old one's by more than `maxErrorRateDelta`, or p95 latency above `maxP95LatencyRatio` × the
 * old one's and more than `minP95DeltaMs` above it), promote when both versions have their sample and it holds, roll
 * back when `maxCanaryMs` passed without a sample.
 */
export function judgeCanary(plan: RolloutPlan, previous: VersionWindow, next: VersionWindow, elapsedMs: number): Verdict {
  const o = summarize(previous);
  const n = summarize(next);
  if (n.requests >= plan.minRequests) {
    if (n.errorRate - o.errorRate > plan.maxErrorRateDelta)
      return {
        decision: 'rollback',
        reason: `error rate ${fmt(n.errorRate)} against ${fmt(o.errorRate)} (allowed +${plan.maxErrorRateDelta})`,
      };
    // Without an old sample there is nothing to compare latency with yet.
    const slackMs = plan.minP95DeltaMs ?? 0;
    if (o.requests >= plan.minRequests && n.p95Ms > plan.maxP95LatencyRatio * Math.max(o.p95Ms, 0.001) && n.p95Ms - o.p95Ms > slackMs)
      return {
        decision: 'rollback',
        reason: `p95 ${fmt(n.p95Ms)} ms against ${fmt(o.p95Ms)} ms (allowed ×${plan.maxP95LatencyRatio}${slackMs > 0 ? ` or +${fmt(slackMs)} ms` : ''})`,
      };
    if (o.requests >= plan.minRequests)
      return {
        decision: 'promote',
        reason: `held over ${n.requests} requests: error rate ${fmt(n.errorRate)}, p95 ${fmt(n.p95Ms)} ms against ${fmt(o.p95Ms)} ms`,
      };
  }
  if (plan.maxCanaryMs !== undefined && elapsedMs > plan.maxCanaryMs)
    return { decision: 'rollback', reason: `no verdict within ${plan.maxCanaryMs} ms (${n.requests} canary requests)` };
  return { decision: 'hold', reason: `${n.requests}/${plan.minRequests} canary and ${o.requests}/${plan.minRequests} current requests` };
}

const fmt = (x: number) => String(Math.round(x * 1000) / 1000);

export interface AuditEntry {
  at: number;
  model: string;
  version: string;
  seq: number;
  phase: Deployment['phase'];
  /** Who decided: the posting credential's operator, or `router` for an automatic verdict. */
  by: string;
  reason: string;
  stats?: { previous: ReturnType<typeof summarize>; next: ReturnType<typeof summarize> };
  step: { manifest: string; sig: string };
  /** sha256 of the previous line, hex ('' for the first): an edit anywhere breaks every later link. */
  prev: string;
}

interface Rollout {
  step: Deployment;
  signed: SignedDeployment;
  startedAt: number;
  previous: VersionWindow;
  next: VersionWindow;
  verdict: Verdict;
}

export interface RolloutPin {
  model: string;
  version: string;
  arm: 'previous' | 'next';
}

export interface RolloutStatus {
  model: string;
  group: string;
  version: string;
  seq: number;
  phase: Deployment['phase'];
  previous?: { version: string; sha256: string };
  plan: RolloutPlan;
  /** Live agents announcing the canary version. */
  canaryAgents: number;
  verdict?: Verdict;
  stats?: { previous: ReturnType<typeof summarize>; next: ReturnType<typeof summarize> };
}

const emptyWindow = (): VersionWindow => ({ ok: 0, failed: 0, latenciesMs: [] });

export class RouterRollouts {
  private readonly rollouts = new Map<string, Rollout>();
  private readonly bundlesDir: string;
  private readonly auditFile: string;
  private lastLineHash = '';
  private readonly timer: NodeJS.Timeout;
  private readonly random: () => number;

  constructor(
    private readonly options: RolloutOptions,
    private readonly io: {
      publish: (topic: string, payload: Buffer) => void;
      /** Statuses of the live agents. */
      agents: () => AgentStatus[];
      logger: RolloutLogger;
    },
  ) {
    this.random = options.random ?? Math.random;
    this.bundlesDir = path.join(options.dir, 'bundles');
    this.auditFile = path.join(options.dir, 'audit.jsonl');
    mkdirSync(this.bundlesDir, { recursive: true });
    this.restore();
    this.timer = setInterval(() => this.judgeAll(), options.judgeEveryMs ?? 250);
    this.timer.unref();
  }

  close(): void {
    clearInterval(this.timer);
  }

  /** Stores a bundle under its sha256; returns the address. */
  get maxBundleBytes(): number {
    return this.options.maxBundleBytes ?? 512 * 2 ** 20;
  }

  putBundle(bytes: Uint8Array): { sha256: string; size: number } {
    const max = this.maxBundleBytes;
    if (bytes.byteLength === 0 || bytes.byteLength > max) throw new MeshError('MESH_TOO_LARGE', `a bundle is 1 to ${max} bytes`);
    const sha256 = bundleAddress(bytes);
    const file = this.bundleFile(sha256);
    if (!existsSync(file)) {
      writeFileSync(`${file}.tmp`, bytes);
      renameSync(`${file}.tmp`, file);
    }
    return { sha256, size: bytes.byteLength };
  }

  /** The stored bundle's path, or undefined. */
  bundle(sha256: string): string | undefined {
    if (!/^[0-9a-f]{64}$/.test(sha256)) return undefined;
    const file = this.bundleFile(sha256);
    return existsSync(file) ? file : undefined;
  }

  private bundleFile(sha256: string): string {
    return path.join(this.bundlesDir, `${sha256}.onnx`);
  }

  /**
   * Takes a signed step: trusted signature, a seq above the model's last, the bundle stored here with the
   * manifest's size and hash. Then it is published (retained) and audited.
   */
  accept(signed: SignedDeployment, by: string, reason = 'posted by an operator'): Deployment {
    const step = verifyDeployment(signed, this.options.operators);
    const current = this.rollouts.get(step.model);
    if (!isNewerStep(step, current?.step.seq))
      throw new MeshError(
        'MESH_BAD_REQUEST',
        `seq ${step.seq} of ${step.model} is not above ${current?.step.seq}: a replayed or stale step`,
      );
    if (step.phase !== 'canary' && current && current.step.version !== step.version)
      throw new MeshError(
        'MESH_BAD_REQUEST',
        `${step.phase} names version ${step.version}, but the rollout of ${step.model} is of ${current.step.version}`,
      );
    const file = this.bundle(step.sha256);
    if (step.phase !== 'rolled-back') {
      if (!file) throw new MeshError('MESH_NOT_FOUND', `bundle ${step.sha256} is not stored here: upload it first (PUT /v1/bundles)`);
      const bytes = readFileSync(file);
      if (bytes.byteLength !== step.size || bundleAddress(bytes) !== step.sha256)
        throw new MeshError('MESH_MODEL_INTEGRITY', `bundle ${step.sha256} does not match the manifest's size or hash`);
    }
    this.apply(step, signed, by, reason, current);
    return step;
  }

  private apply(step: Deployment, signed: SignedDeployment, by: string, reason: string, current: Rollout | undefined): void {
    const rollout: Rollout = {
      step,
      signed,
      startedAt: Date.now(),
      previous: emptyWindow(),
      next: emptyWindow(),
      verdict: { decision: 'hold', reason },
    };
    this.audit({
      model: step.model,
      version: step.version,
      seq: step.seq,
      phase: step.phase,
      by,
      reason,
      ...(current?.step.phase === 'canary' ? { stats: { previous: summarize(current.previous), next: summarize(current.next) } } : {}),
      step: signedDeploymentToJson(signed),
    });
    this.rollouts.set(step.model, rollout);
    this.io.publish(deploymentTopics.step(step.group, step.model), encodeMessage(signed as never));
    this.io.logger.info({ model: step.model, version: step.version, seq: step.seq, phase: step.phase, by }, 'deployment step published');
  }

  /** The version a forwarded request for `model` is pinned to, or undefined (no canary, or none loaded yet). */
  pick(model: string): RolloutPin | undefined {
    const r = this.rollouts.get(model);
    if (r?.step.phase !== 'canary' || !r.step.previous) return undefined;
    if (this.canaryAgents(r.step) === 0) return undefined;
    return this.random() < r.step.plan.canaryShare
      ? { model, version: r.step.version, arm: 'next' }
      : { model, version: r.step.previous.version, arm: 'previous' };
  }

  /**
   * One pinned request ended. An answer counts for the version it says ran (an agent without the canary answers on its
   * default version); a failure counts against the version it was pinned to.
   */
  observe(pin: RolloutPin, ok: boolean, totalMs: number, answeredVersion?: string): void {
    const r = this.rollouts.get(pin.model);
    if (r?.step.phase !== 'canary') return;
    const arm = ok && answeredVersion !== undefined ? (answeredVersion === r.step.version ? 'next' : 'previous') : pin.arm;
    const w = arm === 'next' ? r.next : r.previous;
    if (ok) {
      w.ok++;
      w.latenciesMs.push(totalMs);
      if (w.latenciesMs.length > 10_000) w.latenciesMs.shift();
    } else w.failed++;
  }

  private canaryAgents(step: Deployment): number {
    return this.io
      .agents()
      .filter((s) => s.canaries?.some((c) => c.name === step.model && c.version === step.version && c.sha256 === step.sha256)).length;
  }

  judgeAll(now = Date.now()): void {
    for (const r of this.rollouts.values()) {
      if (r.step.phase !== 'canary') continue;
      r.verdict = judgeCanary(r.step.plan, r.previous, r.next, now - r.startedAt);
      if (r.verdict.decision === 'hold' || !this.options.signer) continue;
      const phase = r.verdict.decision === 'promote' ? 'promoted' : 'rolled-back';
      try {
        const signed = signDeployment(this.options.signer, {
          ...r.step,
          operator: this.options.signer.id,
          seq: r.step.seq + 1,
          issuedAt: now,
          phase,
        });
        this.apply(verifyDeployment(signed, this.options.operators), signed, 'router', r.verdict.reason, r);
      } catch (err) {
        this.io.logger.error({ model: r.step.model, err: (err as Error).message }, 'rollout verdict could not be signed');
      }
    }
  }

  status(model?: string): RolloutStatus[] {
    const out: RolloutStatus[] = [];
    for (const r of this.rollouts.values()) {
      if (model !== undefined && r.step.model !== model) continue;
      out.push({
        model: r.step.model,
        group: r.step.group,
        version: r.step.version,
        seq: r.step.seq,
        phase: r.step.phase,
        ...(r.step.previous ? { previous: r.step.previous } : {}),
        plan: r.step.plan,
        canaryAgents: this.canaryAgents(r.step),
        verdict: r.verdict,
        ...(r.step.phase === 'canary' ? { stats: { previous: summarize(r.previous), next: summarize(r.next) } } : {}),
      });
    }
    return out;
  }

  /** The audit log's entries, oldest first, for a model or all. */
  auditLog(model?: string): AuditEntry[] {
    if (!existsSync(this.auditFile)) return [];
    return readFileSync(this.auditFile, 'utf8')
      .split('\n')
      .filter((l) => l.length > 0)
      .map((l) => JSON.parse(l) as AuditEntry)
      .filter((e) => model === undefined || e.model === model);
  }

  private audit(entry: Omit<AuditEntry, 'at' | 'prev'>): void {
    const line = JSON.stringify({ at: Date.now(), ...entry, prev: this.lastLineHash });
    // appendFileSync: one write per line, in order, on the event loop (steps are rare).
    appendFileSync(this.auditFile, `${line}\n`, { mode: 0o600 });
    this.lastLineHash = createHash('sha256').update(line).digest('hex');
  }

  /** A restarted router resumes from its audit log: each model's last step, re-verified. */
  private restore(): void {
    if (!existsSync(this.auditFile)) return;
    for (const line of readFileSync(this.auditFile, 'utf8').split('\n')) {
      if (line.length === 0) continue;
      this.lastLineHash = createHash('sha256').update(line).digest('hex');
      try {
        const entry = JSON.parse(line) as AuditEntry;
        const signed = signedDeploymentFromJson(entry.step);
        const step = verifyDeployment(signed, this.options.operators);
        this.rollouts.set(step.model, {
          step,
          signed,
          startedAt: Date.now(),
          previous: emptyWindow(),
          next: emptyWindow(),
          verdict: { decision: 'hold', reason: 'resumed after a restart' },
        });
      } catch (err) {
        this.io.logger.warn({ err: (err as Error).message }, 'audit line skipped on restore');
      }
    }
  }
}

/** The media type of a bundle upload (PUT /v1/bundles). */
/**
 * POST /v1/deployments takes a signed step as JSON: its manifest is at most ~12 KB of CBOR by its schema (eight
 * URLs and notes of 1,024 characters each), ~16 KB in base64url; anything past this is refused on its length.
 */
export const DEPLOYMENT_BODY_LIMIT = 64 * 1024;

export const BUNDLE_MEDIA_TYPE = 'application/vnd.edge-mesh.bundle';

/** The HTTP routes (scopes in http-auth.ts: GET /bundles/{sha256} open, GET /v1/rollouts read, the rest operator). */
export function installRolloutRoutes(app: FastifyInstance, rollouts: RouterRollouts): void {
  app.get('/bundles/:sha256', async (request, reply) => {
    const { sha256 } = request.params as { sha256: string };
    const file = rollouts.bundle(sha256);
    if (!file) throw new MeshError('MESH_NOT_FOUND', `no bundle ${sha256} here`);
    return reply.type('application/octet-stream').header('cache-control', 'public, max-age=31536000, immutable').send(readFileSync(file));
  });
  // Its own media type: application/octet-stream is the KServe binary extension's on this server (kserve.ts).
  app.addContentTypeParser(BUNDLE_MEDIA_TYPE, { parseAs: 'buffer', bodyLimit: rollouts.maxBundleBytes }, (_request, body, done) =>
    done(null, body),
  );
  app.put('/v1/bundles', async (request) => {
    const body = request.body;
    if (!(body instanceof Buffer)) throw new MeshError('MESH_BAD_REQUEST', `send the bundle as ${BUNDLE_MEDIA_TYPE}`);
    return rollouts.putBundle(body);
  });
  // A signed deployment is a short manifest and a signature; the bundle itself goes to PUT /v1/bundles.
  app.post('/v1/deployments', { bodyLimit: DEPLOYMENT_BODY_LIMIT }, async (request) => {
    const signed = signedDeploymentFromJson(request.body);
    let by = 'operator';
    let notes: string | undefined;
    try {
      const manifest = decodeCbor(signed.manifest) as { operator?: string; notes?: unknown };
      by = manifest.operator ?? by;
      if (typeof manifest.notes === 'string') notes = manifest.notes;
    } catch {}
    // The operator's signed note is the step's reason in the audit log (edge-mesh promote|rollback --reason).
    const step = rollouts.accept(signed, by, notes === undefined ? undefined : `posted by an operator: ${notes}`);
    return { model: step.model, version: step.version, seq: step.seq, phase: step.phase };
  });
  app.get('/v1/rollouts', async () => ({ rollouts: rollouts.status() }));
  app.get('/v1/rollouts/:model', async (request) => {
    const { model } = request.params as { model: string };
    const status = rollouts.status(model);
    if (status.length === 0) throw new MeshError('MESH_NOT_FOUND', `no rollout of ${model}`);
    return { rollout: status[0], audit: rollouts.auditLog(model) };
  });
}
