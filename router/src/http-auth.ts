/**
 * Who may call the router's HTTP API (docs/security.md, "The router's HTTP API"). Every route except the two health
 * probes needs `Authorization: Bearer <credential>` holding the route's scope:
 *
 * - a mesh token (protocol/src/http-token.ts): signed by an admitted key, for this router, short-lived; its scopes are
 *   bounded by the key's role;
 * - or an operator-issued API key, `meshkey.<id>.<secret>`, whose scopes the router's key list gives. Only the
 *   secret's SHA-256 is kept; the presented secret's hash is compared in constant time (crypto.timingSafeEqual).
 *
 * Refusals use the one HTTP error body (docs/errors.md): 401 MESH_UNAUTHORIZED (no, malformed, expired or unadmitted
 * credential, revoked id), 403 MESH_FORBIDDEN (a valid credential without the route's scope), 429 MESH_RATE_LIMITED
 * (a credential over its request rate, or an address over its rate of failed credentials; failed credentials are
 * counted before any signature is checked, so a flood of bad tokens costs little).
 */

import { createHash, randomBytes, timingSafeEqual } from 'node:crypto';
import { addressGroup, KeyedBuckets } from '@edge-mesh/client';
import { type HttpScope, isHttpScope, MAX_HTTP_TOKEN_CHARS, MeshError, type VerifiedHttpToken, verifyHttpToken } from '@edge-mesh/protocol';
import type { FastifyInstance, FastifyRequest } from 'fastify';

export interface ApiKeyEntry {
  /** The key's public name, `[a-z0-9-]{1,32}`; it names the caller in limits and logs. */
  id: string;
  /** Hex SHA-256 of the secret. */
  sha256: string;
  scopes: HttpScope[];
}

export interface RouterHttpAuthOptions {
  /** Operators whose admissions make a mesh token's key acceptable. */
  trustedOperators: { id: string; publicKey: Uint8Array }[];
  /** Operator-issued API keys (`edge-mesh api-key new`). */
  apiKeys?: ApiKeyEntry[];
  /**
   * Ids refused even with an admission that still holds (revoked ones), given the id and when the admission its token
   * carries was issued. Asked on every request. `startRouter` adds the revocations the broker republishes.
   */
  isRevoked?: (id: string, admissionIssuedMs: number) => boolean;
  /** Longest lifetime a mesh token may claim, ms (default 300 000). */
  maxTokenLifetimeMs?: number;
  /** Requests per second one credential may make, sustained (default 200), and in a burst (default 400). */
  requestsPerSecond?: number;
  burst?: number;
  /** Failed credentials per second one address may present (default 5), and in a burst (default 20). */
  failuresPerSecond?: number;
  failureBurst?: number;
}

export const API_KEY_PREFIX = 'meshkey.';
const API_KEY_ID = /^[a-z0-9-]{1,32}$/;

/** A new API key: the secret to hand to the client once, and the entry the router keeps. */
export function makeApiKey(id: string, scopes: HttpScope[]): { key: string; entry: ApiKeyEntry } {
  if (!API_KEY_ID.test(id)) throw new MeshError('MESH_CONFIG', `an API key id is 1 to 32 of a-z, 0-9 and -, got ${JSON.stringify(id)}`);
  if (scopes.length === 0 || !scopes.every(isHttpScope)) throw new MeshError('MESH_CONFIG', `bad scopes ${JSON.stringify(scopes)}`);
  const secret = randomBytes(32).toString('base64url');
  return { key: `${API_KEY_PREFIX}${id}.${secret}`, entry: { id, sha256: sha256Hex(secret), scopes: [...scopes] } };
}

const sha256 = (text: string) => createHash('sha256').update(text).digest();
const sha256Hex = (text: string) => sha256(text).toString('hex');

/** The scope a route needs; `open` for the health probes. Routes not listed need `operator` (closed by default). */
export function scopeOfRoute(method: string, url: string | undefined): HttpScope | 'open' {
  if (method === 'GET' || method === 'HEAD') {
    if (url === '/v2/health/live' || url === '/v2/health/ready') return 'open';
    // The console's page and scripts (console.ts): published code without data; what it shows is read with a credential.
    if (url === '/console' || url?.startsWith('/console/')) return 'open';
    // Content-addressed model bundles: an agent checks the bytes against the operator-signed sha256 (docs/deployment.md).
    if (url === '/bundles/:sha256') return 'open';
    // What a KServe client reads before it infers: server and model metadata, readiness, the model's config.
    if (url === '/v2' || (url !== undefined && /^\/v2\/models\/:name(\/versions\/:version)?(\/ready|\/config)?$/.test(url))) return 'infer';
    if (url === '/metrics' || url === '/openapi.json' || url?.startsWith('/v1/')) return 'read';
    if (url === '/v2/models/stats' || url === '/v2/models/:name/stats' || url === '/v2/models/:name/versions/:version/stats') return 'read';
  }
  if (method === 'POST' && (url === '/v2/models/:name/infer' || url === '/v2/models/:name/versions/:version/infer')) return 'infer';
  if (method === 'POST' && url === '/v2/repository/index') return 'read';
  if (method === 'POST' && url === '/v1/relay/vouchers') return 'relay';
  // A device without a credential yet asks to be admitted; bounded, and admits nothing by itself (console-admissions.ts).
  if (method === 'POST' && url === '/v1/admissions/requests') return 'open';
  return 'operator';
}

export interface Principal {
  id: string;
  scopes: readonly HttpScope[];
}

/** Checks one request's credential: who it is, that it holds `scope`, and the limits. Throws a coded MeshError. */
export type CredentialCheck = (authorization: string | undefined, address: string, scope: HttpScope, now: number) => Principal;

/**
 * The credential check both front doors use (this file's HTTP hook, and grpc.ts's `authorization` metadata): mesh
 * tokens for `audience` and API keys, the per-address limit on failed credentials, the scope, the per-credential rate.
 */
export function createCredentialCheck(audience: string, options: RouterHttpAuthOptions): CredentialCheck {
  const trusted = new Map(options.trustedOperators.map((o) => [o.id, o.publicKey] as const));
  const apiKeys = new Map((options.apiKeys ?? []).map((k) => [k.id, { ...k, hash: Buffer.from(k.sha256, 'hex') }] as const));
  for (const k of apiKeys.values()) {
    if (!API_KEY_ID.test(k.id) || k.hash.byteLength !== 32 || !k.scopes.every(isHttpScope))
      throw new MeshError('MESH_CONFIG', `API key ${JSON.stringify(k.id)} is malformed (id, 64 hex digits of sha256, scopes)`);
  }
  const requests = new KeyedBuckets(options.burst ?? 400, options.requestsPerSecond ?? 200);
  const failures = new KeyedBuckets(options.failureBurst ?? 20, options.failuresPerSecond ?? 5);
  /** Tokens already verified: the two Ed25519 checks run once per token, not per request. */
  const verified = new Map<string, VerifiedHttpToken>();
  const isRevoked = options.isRevoked ?? (() => false);
  const authenticate = (header: string | undefined, now: number): Principal => {
    if (header === undefined)
      throw new MeshError('MESH_UNAUTHORIZED', 'this endpoint needs Authorization: Bearer <token>', {
        details: { reason: 'no-credential' },
      });
    const match = /^Bearer +(\S+)$/i.exec(header);
    if (!match || match[1]!.length > MAX_HTTP_TOKEN_CHARS)
      throw new MeshError('MESH_UNAUTHORIZED', 'expected Authorization: Bearer <token>', { details: { reason: 'bad-credential' } });
    const credential = match[1]!;
    if (credential.startsWith(API_KEY_PREFIX)) {
      const [id, secret] = credential.slice(API_KEY_PREFIX.length).split('.', 2);
      const entry = id === undefined ? undefined : apiKeys.get(id);
      // Hash first, then compare the fixed-length hashes in constant time: no early exit on a matching prefix.
      const presented = sha256(secret ?? '');
      if (entry === undefined || !timingSafeEqual(presented, entry.hash))
        throw new MeshError('MESH_UNAUTHORIZED', 'unknown API key', { details: { reason: 'bad-api-key' } });
      return { id: `apikey:${entry.id}`, scopes: entry.scopes };
    }
    let token = verified.get(credential);
    if (token === undefined) {
      token = verifyHttpToken(credential, {
        audience,
        trustedOperators: trusted,
        nowMs: now,
        ...(options.maxTokenLifetimeMs !== undefined ? { maxLifetimeMs: options.maxTokenLifetimeMs } : {}),
      });
      if (verified.size >= 10_000) verified.delete(verified.keys().next().value as string);
      verified.set(credential, token);
    }
    if (token.expiresMs <= now || token.admissionExpiresMs <= now) {
      verified.delete(credential);
      throw new MeshError('MESH_UNAUTHORIZED', 'the token has expired', { details: { reason: 'expired-token' } });
    }
    if (isRevoked(token.id, token.admissionIssuedMs))
      throw new MeshError('MESH_UNAUTHORIZED', `${token.id} is revoked`, { details: { reason: 'revoked' } });
    return { id: token.id, scopes: token.scopes };
  };

  return (authorization, address, scope, now) => {
    if (!failures.has(address, now)) {
      throw new MeshError('MESH_RATE_LIMITED', 'too many failed credentials from this address; slow down', {
        details: { reason: 'auth-failures' },
      });
    }
    let principal: Principal;
    try {
      principal = authenticate(authorization, now);
    } catch (err) {
      failures.take(address, now);
      throw err;
    }
    if (!principal.scopes.includes(scope) && !principal.scopes.includes('operator')) {
      throw new MeshError('MESH_FORBIDDEN', `this credential lacks scope ${scope}`, {
        details: { reason: 'scope', scope, held: [...principal.scopes] },
      });
    }
    if (!requests.take(principal.id, now)) {
      throw new MeshError('MESH_RATE_LIMITED', 'this credential is over its request rate', { details: { reason: 'request-rate' } });
    }
    return principal;
  };
}

/** The credential each request was let in with, kept by the hook below for `callerOf`. */
const principals = new WeakMap<FastifyRequest, Principal>();

/**
 * Who made a request, for the concurrency limit's shares: the credential's id (`apikey:<id>` or the admitted id),
 * or the address when the router takes no credentials (`addressCaller`).
 */
export function callerOf(request: FastifyRequest): string {
  return principals.get(request)?.id ?? addressCaller(request.ip);
}

/** A caller named by its address: `address:` and its group (`addressGroup`: IPv4 whole, IPv6 by its /64). */
export function addressCaller(ip: string): string {
  return `address:${addressGroup(ip)}`;
}

/** Installs the check on every route of `app` (an onRequest hook, so it runs before a body is read). */
export function installHttpAuth(app: FastifyInstance, audience: string, options: RouterHttpAuthOptions): void {
  const check = createCredentialCheck(audience, options);
  app.addHook('onRequest', async (request: FastifyRequest, reply) => {
    const scope = scopeOfRoute(request.method, request.routeOptions.url);
    if (scope === 'open') return;
    try {
      principals.set(request, check(request.headers.authorization, request.ip, scope, Date.now()));
    } catch (err) {
      if (err instanceof MeshError && err.code === 'MESH_UNAUTHORIZED') reply.header('www-authenticate', 'Bearer realm="edge-mesh"');
      throw err;
    }
  });
}
