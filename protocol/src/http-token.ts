/**
 * Bearer tokens for the router's HTTP API (docs/security.md, "The router's HTTP API"): a short-lived statement
 * "key K asks for scopes S at router R until T", signed by K and carrying K's admission (the operator-signed record
 * the broker also holds), so a router that trusts the operator checks it with no lookup and no shared secret.
 *
 *   Authorization: Bearer mesh1.<base64url(JSON claims)>.<base64url(Ed25519 signature)>
 *
 * Claims: `id` (the key's mesh id), `pk` (its public key), `aud` (the router id it is for), `scp` (scopes), `iat` and
 * `exp` (epoch ms), `adm` (the admission: record and operator signature, base64url). The signature covers a domain
 * tag and the claims' bytes as sent. Pure: no clock reads beyond the defaults, no I/O.
 */
import { randomBytes } from 'node:crypto';
import type { Role } from './constants.ts';
import { MeshError } from './errors.ts';
import { type Identity, idMatchesKey, roleOfId, type SignedRecord, signBytes, verifyBytes, verifyRecord } from './identity.ts';

/** What an HTTP credential may do: `infer` (KServe inference and model metadata), `read` (operator views: agents,
 * routing, lanes, settlements, metrics, the OpenAPI description), `operator` (everything), `relay` (hand vouchers to a
 * router's relay). */
export const HTTP_SCOPES = ['infer', 'read', 'operator', 'relay'] as const;
export type HttpScope = (typeof HTTP_SCOPES)[number];

/** The scopes a key of each role may ask for; a token asking for more is refused. */
export const SCOPES_OF_ROLE: Readonly<Record<Role, readonly HttpScope[]>> = {
  operator: ['infer', 'read', 'operator', 'relay'],
  app: ['infer'],
  bridge: ['infer'],
  router: ['read'],
  agent: ['relay'],
};

export const HTTP_TOKEN_PREFIX = 'mesh1.';
/** Longest token read at all; an admission record is at most 4 KiB. */
export const MAX_HTTP_TOKEN_CHARS = 8192;
const TOKEN_DOMAIN = Buffer.from('edge-mesh/http-token/v1\0');

export interface HttpTokenClaims {
  id: string;
  pk: string;
  aud: string;
  scp: HttpScope[];
  iat: number;
  exp: number;
  /** A random value, so two tokens made in the same millisecond differ. */
  jti: string;
  adm: { r: string; s: string };
}

const b64 = (bytes: Uint8Array) => Buffer.from(bytes).toString('base64url');

export function isHttpScope(value: unknown): value is HttpScope {
  return typeof value === 'string' && (HTTP_SCOPES as readonly string[]).includes(value);
}

/**
 * Makes a token for `audience` (the router's id). `admission` is the identity's own admission as the operator signed
 * it (`edge-mesh admit --out`). Throws MESH_CONFIG when the identity's role may not ask for a scope.
 */
export function makeHttpToken(
  identity: Identity,
  admission: SignedRecord,
  {
    audience,
    scopes,
    nowMs = Date.now(),
    ttlMs = 300_000,
  }: { audience: string; scopes: readonly HttpScope[]; nowMs?: number; ttlMs?: number },
): string {
  const allowed = SCOPES_OF_ROLE[identity.role];
  const extra = scopes.filter((s) => !allowed.includes(s));
  if (extra.length > 0) throw new MeshError('MESH_CONFIG', `a ${identity.role} key may not ask for scope ${extra.join(', ')}`);
  const claims: HttpTokenClaims = {
    id: identity.id,
    pk: b64(identity.publicKey),
    aud: audience,
    scp: [...scopes],
    iat: nowMs,
    exp: nowMs + ttlMs,
    jti: randomBytes(9).toString('base64url'),
    adm: { r: b64(admission.record), s: b64(admission.sig) },
  };
  const body = Buffer.from(JSON.stringify(claims));
  const sig = signBytes(identity, Buffer.concat([TOKEN_DOMAIN, body]));
  return `${HTTP_TOKEN_PREFIX}${body.toString('base64url')}.${b64(sig)}`;
}

export interface VerifiedHttpToken {
  id: string;
  role: Role;
  scopes: HttpScope[];
  expiresMs: number;
  /** When the admission carried in the token runs out. */
  admissionExpiresMs: number;
  /** When that admission was issued: a revocation signed at or after it revokes the token. */
  admissionIssuedMs: number;
}

export interface VerifyHttpTokenOptions {
  audience: string;
  trustedOperators: ReadonlyMap<string, Uint8Array>;
  nowMs?: number;
  /** Longest `exp − iat` accepted. Default 300 000 (5 minutes). */
  maxLifetimeMs?: number;
  /** How far in the future `iat` may lie. Default 30 000. */
  maxClockSkewMs?: number;
}

const unauthorized = (reason: string, message: string) => new MeshError('MESH_UNAUTHORIZED', message, { details: { reason } });

/**
 * Checks a token: form, audience, times, the admission (a trusted operator's signature, not expired, for this very
 * key), the key's signature over the claims and the scopes the key's role may hold, in that order (cheap checks first). Throws MESH_UNAUTHORIZED with
 * `details.reason`; revocation is the caller's check (the router keeps the revoked ids).
 */
export function verifyHttpToken(token: string, options: VerifyHttpTokenOptions): VerifiedHttpToken {
  const { audience, trustedOperators, nowMs = Date.now(), maxLifetimeMs = 300_000, maxClockSkewMs = 30_000 } = options;
  if (token.length > MAX_HTTP_TOKEN_CHARS || !token.startsWith(HTTP_TOKEN_PREFIX)) throw unauthorized('bad-token', 'not a mesh token');
  const parts = token.slice(HTTP_TOKEN_PREFIX.length).split('.');
  if (parts.length !== 2) throw unauthorized('bad-token', 'not a mesh token');
  const body = Buffer.from(parts[0]!, 'base64url');
  const sig = Buffer.from(parts[1]!, 'base64url');
  let claims: HttpTokenClaims;
  try {
    claims = JSON.parse(body.toString('utf8')) as HttpTokenClaims;
  } catch {
    throw unauthorized('bad-token', 'the token claims are not JSON');
  }
  if (
    claims === null ||
    typeof claims !== 'object' ||
    typeof claims.id !== 'string' ||
    typeof claims.pk !== 'string' ||
    typeof claims.aud !== 'string' ||
    !Array.isArray(claims.scp) ||
    !claims.scp.every(isHttpScope) ||
    typeof claims.iat !== 'number' ||
    typeof claims.exp !== 'number' ||
    claims.adm === null ||
    typeof claims.adm !== 'object' ||
    typeof claims.adm.r !== 'string' ||
    typeof claims.adm.s !== 'string' ||
    sig.byteLength !== 64
  ) {
    throw unauthorized('bad-token', 'the token claims are malformed');
  }
  if (claims.aud !== audience) throw unauthorized('wrong-audience', `the token is for ${claims.aud}, not this router`);
  if (claims.iat > nowMs + maxClockSkewMs) throw unauthorized('stale-token', 'the token was issued in the future');
  if (claims.exp <= nowMs) throw unauthorized('expired-token', 'the token has expired');
  if (claims.exp - claims.iat > maxLifetimeMs)
    throw unauthorized('token-lifetime', `the token lives longer than ${maxLifetimeMs} ms; make a shorter one`);
  const publicKey = Buffer.from(claims.pk, 'base64url');
  const role = roleOfId(claims.id);
  if (role === undefined || !idMatchesKey(claims.id, publicKey)) throw unauthorized('id-not-key-derived', 'the token id is not its key');
  let admission: ReturnType<typeof verifyRecord>;
  try {
    admission = verifyRecord(
      { record: new Uint8Array(Buffer.from(claims.adm.r, 'base64url')), sig: new Uint8Array(Buffer.from(claims.adm.s, 'base64url')) },
      trustedOperators,
      nowMs,
    );
  } catch (err) {
    throw new MeshError('MESH_UNAUTHORIZED', `the admission in the token does not hold: ${(err as Error).message}`, {
      cause: err,
      details: { reason: 'not-admitted' },
    });
  }
  if (admission.kind !== 'admission' || admission.id !== claims.id || !Buffer.from(admission.publicKey).equals(publicKey))
    throw unauthorized('not-admitted', 'the admission in the token is for another key');
  if (!verifyBytes(publicKey, Buffer.concat([TOKEN_DOMAIN, body]), sig)) throw unauthorized('bad-signature', 'bad token signature');
  // Only a token its key really signed gets a 403: a forged one stays a 401 whatever it claims.
  const allowed = SCOPES_OF_ROLE[role];
  if (!claims.scp.every((s) => allowed.includes(s)))
    throw new MeshError('MESH_FORBIDDEN', `a ${role} key may not hold scope ${claims.scp.join(', ')}`, {
      details: { reason: 'scope-not-of-role', role },
    });
  return {
    id: claims.id,
    role,
    scopes: claims.scp,
    expiresMs: claims.exp,
    admissionExpiresMs: admission.expires,
    admissionIssuedMs: admission.issuedAt,
  };
}
