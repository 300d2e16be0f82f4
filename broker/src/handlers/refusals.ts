/**
 * Every reason the broker refuses a CONNECT, PUBLISH or SUBSCRIBE, and the registry code (protocol/errors.ts) it is
 * raised with. The reason is what the log line and the tests name; the code is what docs/errors.md lists.
 */
import type { MeshErrorCode } from '@edge-mesh/protocol';

export const REFUSAL_CODES = {
  // The limits (../limits.ts), answered CONNACK 3: a back-off and retry later succeeds. `address-limited`: a CONNECT
  // naming no admitted id from an address that is over its CONNECT rate or limited after a storm of such refusals;
  // `client-limited`: an admitted id from an address where tokens for it kept failing.
  'address-limited': 'MESH_RATE_LIMITED',
  'client-limited': 'MESH_RATE_LIMITED',
  // The CONNECT packet's fields.
  'protocol-version': 'MESH_BAD_REQUEST',
  'client-id-too-long': 'MESH_TOO_LARGE',
  'username-too-long': 'MESH_TOO_LARGE',
  'password-too-long': 'MESH_TOO_LARGE',
  'persistent-session': 'MESH_BAD_REQUEST',
  'keepalive-zero': 'MESH_BAD_REQUEST',
  'keepalive-too-long': 'MESH_BAD_REQUEST',
  'will-qos2': 'MESH_BAD_REQUEST',
  'will-not-own-status': 'MESH_FORBIDDEN',
  'will-not-agent': 'MESH_FORBIDDEN',
  // Identity (authenticated mode).
  'id-not-key-derived': 'MESH_UNAUTHORIZED',
  'username-not-client-id': 'MESH_UNAUTHORIZED',
  'no-token': 'MESH_UNAUTHORIZED',
  'bad-token': 'MESH_UNAUTHORIZED',
  'stale-token': 'MESH_UNAUTHORIZED',
  'not-admitted': 'MESH_UNAUTHORIZED',
  revoked: 'MESH_UNAUTHORIZED',
  'admission-expired': 'MESH_UNAUTHORIZED',
  'role-mismatch': 'MESH_UNAUTHORIZED',
  'replayed-token': 'MESH_UNAUTHORIZED',
  'bad-signature': 'MESH_UNAUTHORIZED',
  // Topics and filters (../policy.ts), also a will's topic.
  'empty-topic': 'MESH_BAD_REQUEST',
  'topic-too-long': 'MESH_TOO_LARGE',
  'too-many-levels': 'MESH_BAD_REQUEST',
  'nul-in-topic': 'MESH_BAD_REQUEST',
  'invalid-utf8': 'MESH_BAD_REQUEST',
  'wildcard-in-topic': 'MESH_BAD_REQUEST',
  'reserved-topic': 'MESH_FORBIDDEN',
  'wildcard-all': 'MESH_FORBIDDEN',
  qos2: 'MESH_BAD_REQUEST',
  'retain-not-own-status': 'MESH_FORBIDDEN',
  'empty-retained-step': 'MESH_FORBIDDEN',
  // The role ACL (../acl.ts), the cap on one connection's subscriptions (./subscribe.ts) and the per-client buckets.
  acl: 'MESH_FORBIDDEN',
  'too-many-subscriptions': 'MESH_TOO_LARGE',
  'publish-rate': 'MESH_RATE_LIMITED',
  'admin-rate': 'MESH_RATE_LIMITED',
} as const satisfies Record<string, MeshErrorCode>;

export type RefusalReason = keyof typeof REFUSAL_CODES;
