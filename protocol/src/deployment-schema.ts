/**
 * The schemas of model deployment (deployment.ts, docs/deployment.md): the operator-signed deployment manifest
 * and the envelope that carries it with its signature. Compiled ahead of time into deployment.generated.ts by
 * protocol/scripts/generate-validators.ts, like schemas.ts.
 */
import { type Static, Type } from '@sinclair/typebox';

const Id = Type.String({ pattern: '^[a-z0-9][a-z0-9-]{2,63}$' });
const ModelName = Type.String({ pattern: '^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$' });
const Version = Type.String({ pattern: '^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$' });
const Sha256 = Type.String({ pattern: '^[0-9a-f]{64}$' });
const Uint = Type.Integer({ minimum: 0, maximum: Number.MAX_SAFE_INTEGER });

/**
 * How a new version earns all the traffic (the canary analysis of Argo Rollouts' AnalysisTemplate and Flagger's
 * Canary spec: a traffic weight, a minimum sample, thresholds against the current version).
 */
export const RolloutPlanSchema = Type.Object(
  {
    /** Share of the model's forwarded requests the router sends to the new version during the canary, 0 < s < 1. */
    canaryShare: Type.Number({ exclusiveMinimum: 0, exclusiveMaximum: 1 }),
    /** Requests each version must have answered in the window before a decision. */
    minRequests: Type.Integer({ minimum: 1, maximum: 1_000_000 }),
    /** Roll back when the new version's error rate exceeds the old one's by more than this (0.02 = 2 points). */
    maxErrorRateDelta: Type.Number({ minimum: 0, maximum: 1 }),
    /** Roll back when the new version's p95 latency exceeds the old one's by more than this factor. */
    maxP95LatencyRatio: Type.Number({ minimum: 1, maximum: 1000 }),
    /**
     * A latency rollback also needs the new p95 to exceed the old one by more than this many ms (absent: 0). With
     * millisecond latencies and a sample of a few dozen, one scheduling hiccup moves a p95 by more than any ratio.
     */
    minP95DeltaMs: Type.Optional(Type.Number({ minimum: 0, maximum: 600_000 })),
    /** Roll back when no decision could be reached this long after the canary started, ms. */
    maxCanaryMs: Type.Optional(Type.Integer({ minimum: 1_000, maximum: 7 * 86_400_000 })),
  },
  { additionalProperties: false },
);
export type RolloutPlan = Static<typeof RolloutPlanSchema>;

/**
 * One step of a rollout, signed by an operator. Every step is a new manifest with a higher `seq` for its
 * (operator, group, model): an agent keeps the highest seq it applied and refuses anything at or below it, so a
 * replayed older manifest cannot roll a fleet back to a version the operator retired.
 */
export const DeploymentSchema = Type.Object(
  {
    v: Type.Literal(1),
    kind: Type.Literal('deployment'),
    /** The signing operator's id; its key must be one the receiver trusts. */
    operator: Id,
    seq: Type.Integer({ minimum: 1, maximum: Number.MAX_SAFE_INTEGER }),
    issuedAt: Uint,
    /** The agent group this manifest targets (agents are configured with the groups they belong to). */
    group: Id,
    model: ModelName,
    version: Version,
    /** sha256 of the ONNX bundle, hex: the bundle's address (GET /bundles/{sha256}). */
    sha256: Sha256,
    /** Bundle size in bytes; an agent stops reading past it. */
    size: Type.Integer({ minimum: 1, maximum: 4 * 2 ** 30 }),
    priceMicros: Uint,
    /** canary: load beside the current version and take a share; promoted: serve it alone; rolled-back: drop it. */
    phase: Type.Union([Type.Literal('canary'), Type.Literal('promoted'), Type.Literal('rolled-back')]),
    /** The version being replaced, as the agents serve it now. */
    previous: Type.Optional(Type.Object({ version: Version, sha256: Sha256 }, { additionalProperties: false })),
    plan: RolloutPlanSchema,
    /** Where the bundle may be fetched; any mirror will do, the hash is what counts. */
    urls: Type.Optional(Type.Array(Type.String({ maxLength: 1024 }), { maxItems: 8 })),
    notes: Type.Optional(Type.String({ maxLength: 1024 })),
  },
  { additionalProperties: false },
);
export type Deployment = Static<typeof DeploymentSchema>;

/** A deployment manifest as it travels: its CBOR bytes and the operator's Ed25519 signature over them. */
export const SignedDeploymentSchema = Type.Object(
  {
    manifest: Type.Uint8Array({ minByteLength: 1, maxByteLength: 16_384 }),
    sig: Type.Uint8Array({ minByteLength: 64, maxByteLength: 64 }),
  },
  { additionalProperties: false },
);
export type SignedDeployment = Static<typeof SignedDeploymentSchema>;
