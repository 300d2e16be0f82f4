/**
 * Model deployment, the wire side (docs/deployment.md): an operator signs each step of a rollout as a
 * deployment manifest; routers and agents accept one only with a trusted operator's signature, for their group,
 * with a seq above every one they applied for that model.
 *
 *   mesh/v1/deploy/{group}/{model}   the latest signed step for a model in a group (retained, QoS 1)
 *
 * The signature covers a domain tag and the manifest's CBOR bytes exactly as they travel, so no receiver has to
 * re-encode anything to check it (the same rule as admission records, identity.ts).
 */
import { createHash } from 'node:crypto';
import { checkDeployment, checkSignedDeployment } from './deployment.generated.ts';
import type { Deployment, SignedDeployment } from './deployment-schema.ts';
import { decodeCbor, encodeMessage } from './envelope.ts';
import { MeshError } from './errors.ts';
import { type Identity, signBytes, verifyBytes } from './identity.ts';
import { isValidId, TOPIC_ROOT } from './topics.ts';

export { checkDeployment, checkRolloutPlan, checkSignedDeployment } from './deployment.generated.ts';
export type { Deployment, RolloutPlan, SignedDeployment } from './deployment-schema.ts';

const DEPLOYMENT_DOMAIN = Buffer.from('edge-mesh/deployment/v1\0');
const MODEL_PATTERN = /^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$/;

export const deploymentTopics = {
  /** Where the latest step for `model` in `group` is retained. */
  step: (group: string, model: string) => `${TOPIC_ROOT}/deploy/${group}/${model}`,
  /** What an agent in `group` subscribes to. */
  group: (group: string) => `${TOPIC_ROOT}/deploy/${group}/+`,
  /** What a router subscribes to: every group. */
  all: () => `${TOPIC_ROOT}/deploy/+/+`,
} as const;

/** `{group, model}` of a concrete deployment topic, or undefined. */
export function parseDeploymentTopic(topic: string): { group: string; model: string } | undefined {
  const parts = topic.split('/');
  if (parts.length !== 5 || parts[0] !== 'mesh' || parts[1] !== 'v1' || parts[2] !== 'deploy') return undefined;
  const [, , , group, model] = parts as [string, string, string, string, string];
  return isValidId(group) && MODEL_PATTERN.test(model) ? { group, model } : undefined;
}

/** Signs one step; only an operator key may. */
export function signDeployment(operator: Identity, deployment: Deployment): SignedDeployment {
  if (operator.role !== 'operator')
    throw new MeshError('MESH_CONFIG', `only an operator key signs deployments, got a ${operator.role} key`);
  if (deployment.operator !== operator.id)
    throw new MeshError('MESH_CONFIG', `the manifest names operator ${deployment.operator}, but the key is ${operator.id}`);
  if (!checkDeployment.Check(deployment)) {
    const problems = [...checkDeployment.Errors(deployment)].slice(0, 5).map((e) => `${e.path || '/'}: ${e.message}`);
    throw new MeshError('MESH_BAD_REQUEST', `invalid deployment manifest: ${problems.join('; ')}`);
  }
  const manifest = new Uint8Array(encodeMessage(deployment as never));
  return { manifest, sig: signBytes(operator, Buffer.concat([DEPLOYMENT_DOMAIN, manifest])) };
}

/**
 * Checks a signed step against the trusted operator keys (id → raw public key) and returns the manifest.
 * Throws MESH_UNAUTHORIZED for anything not signed by a trusted operator, MESH_BAD_REQUEST for a malformed one.
 */
export function verifyDeployment(signed: unknown, trustedOperators: ReadonlyMap<string, Uint8Array>): Deployment {
  if (!checkSignedDeployment.Check(signed)) throw new MeshError('MESH_BAD_REQUEST', 'not a signed deployment manifest');
  let manifest: unknown;
  try {
    manifest = decodeCbor(signed.manifest);
  } catch (cause) {
    throw new MeshError('MESH_BAD_REQUEST', 'deployment manifest is not valid CBOR', { cause });
  }
  if (!checkDeployment.Check(manifest)) {
    const problems = [...checkDeployment.Errors(manifest)].slice(0, 5).map((e) => `${e.path || '/'}: ${e.message}`);
    throw new MeshError('MESH_BAD_REQUEST', `invalid deployment manifest: ${problems.join('; ')}`);
  }
  const key = trustedOperators.get(manifest.operator);
  if (!key) throw new MeshError('MESH_UNAUTHORIZED', `deployment signed by ${manifest.operator}, an operator not trusted here`);
  if (!verifyBytes(key, Buffer.concat([DEPLOYMENT_DOMAIN, signed.manifest]), signed.sig))
    throw new MeshError('MESH_UNAUTHORIZED', `bad operator signature on the deployment of ${manifest.model} ${manifest.version}`);
  return manifest;
}

/** The replay rule: a step applies only above the highest seq applied for its model. */
export function isNewerStep(deployment: Pick<Deployment, 'seq'>, appliedSeq: number | undefined): boolean {
  return appliedSeq === undefined || deployment.seq > appliedSeq;
}

/** Hex sha256 of a bundle's bytes: its content address. */
export function bundleAddress(bytes: Uint8Array): string {
  return createHash('sha256').update(bytes).digest('hex');
}

/** JSON form of a signed step (HTTP bodies, audit lines): both fields base64url. */
export function signedDeploymentToJson(signed: SignedDeployment): { manifest: string; sig: string } {
  return { manifest: Buffer.from(signed.manifest).toString('base64url'), sig: Buffer.from(signed.sig).toString('base64url') };
}

export function signedDeploymentFromJson(json: unknown): SignedDeployment {
  const j = json as { manifest?: unknown; sig?: unknown } | null;
  if (typeof j?.manifest !== 'string' || typeof j.sig !== 'string')
    throw new MeshError('MESH_BAD_REQUEST', 'a signed deployment is {manifest, sig}, both base64url strings');
  return { manifest: new Uint8Array(Buffer.from(j.manifest, 'base64url')), sig: new Uint8Array(Buffer.from(j.sig, 'base64url')) };
}
