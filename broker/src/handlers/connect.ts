/**
 * CONNECT decisions (MQTT 3.1.1 §3.1, §3.2): who may open a session, asked in order of cost.
 *
 *   1. `doorVerdict`      the address's limit and CONNECT rate (noted, not yet acted on), then the protocol level;
 *   2. `limitRefusal`     the limits that depend on who is named: a (client id, address) pair banned after a storm
 *                         of failed tokens, and a limited address, which lets only admitted ids go on;
 *   3. `checkConnect`     the cheap checks on the packet's fields, which need no state: lengths, clean session,
 *                         keepalive, will, and with auth the id form, user name, token form and timestamp;
 *   4. `verifyConnect`    the admission lookup, the replay check and only then the Ed25519 verify;
 *   5. `stillAdmitted`    whether a registered client is still admitted (a revocation cuts it off).
 *
 * One live connection per id: aedes replaces a live client by a new one with the same id only once the new CONNECT
 * was accepted, i.e. after step 4 ([MQTT-3.1.4-2]). A CONNECT with a known id but the wrong key is refused here and
 * leaves the first connection alone; the right key (a restarted device) takes over.
 *
 * Each function takes the packet fields, the policy and the state it reads (the per-address guard, the nonce cache,
 * the admissions) and answers allow or refuse-with-a-reason; none of them touches a socket or aedes.
 */
import {
  type ConnectToken,
  connectTokenMessage,
  isValidId,
  type MeshErrorCode,
  readConnectToken,
  roleOfId,
  verifyBytes,
} from '@edge-mesh/protocol';
import { type MeshSession, newSession } from '../acl.ts';
import type { ClientGuard, IpGuard, NonceCache } from '../limits.ts';
import type { TopicLimits } from '../policy.ts';
import type { Grant, LookupRefusal } from '../store.ts';
import { REFUSAL_CODES, type RefusalReason } from './refusals.ts';
import { checkWillPolicy, willRoleRefusal } from './will.ts';

/** CONNACK return codes (MQTT 3.1.1 §3.2.2.3) used when refusing a CONNECT. */
export const CONNACK_IDENTIFIER_REJECTED = 2;
/** "Server unavailable": the answer to a CONNECT refused by a limit; the client should retry later. */
export const CONNACK_SERVER_UNAVAILABLE = 3;
export const CONNACK_NOT_AUTHORIZED = 5;

/** CONNECT field caps (bytes), checked before anything else looks at the fields. */
export const MAX_USERNAME_BYTES = 64;
export const MAX_PASSWORD_BYTES = 128;

/** The fields of a CONNECT packet the decisions read (a subset of mqtt-packet's IConnectPacket). */
export interface ConnectFields {
  clientId?: string;
  protocolVersion?: number;
  username?: string;
  password?: Buffer;
  clean?: boolean;
  keepalive?: number;
  will?: { topic: string; qos?: number } | undefined;
}

export interface ConnectPolicy {
  maxClientIdLength: number;
  /** 0 disables the keepalive limit. */
  keepaliveLimitS: number;
  limits: TopicLimits;
  /** Authenticated mode; undefined in open mode. */
  auth: { maxClockSkewMs: number } | undefined;
}

export interface ConnectRefusal {
  ok: false;
  reason: RefusalReason;
  /** The registry code the refusal is raised with (./refusals.ts). */
  code: MeshErrorCode;
  /** The CONNACK return code to answer with. */
  returnCode: number;
  /** The will topic, when the will is the reason. */
  topic: string | undefined;
}

/** Step 3's verdict: go on (with the token to verify in authenticated mode) or refuse. */
export type ConnectCheck = { ok: true; token: ConnectToken | undefined } | ConnectRefusal;

/** Step 4's verdict: the session to attach to the client, or a refusal (always CONNACK 5). */
export type ConnectVerification = { ok: true; session: MeshSession } | ConnectRefusal;

/**
 * Step 1's verdict. `go` with `limited` set: the address is limited (after a storm of unauthenticated refusals) or
 * over its CONNECT rate, so only a CONNECT naming an admitted id may go on (step 2 decides); `quiet` says this is a
 * repeat that is logged at debug only. `wrong-version`: let aedes answer CONNACK 1 itself, as [MQTT-3.1.2-2] asks;
 * `limited` says the address was already limited or over its rate, so the refusal must not count towards a limit.
 */
export type DoorVerdict =
  | { action: 'go'; limited: undefined }
  | { action: 'go'; limited: 'address-limited' | 'connect-rate'; quiet: boolean }
  | {
      action: 'wrong-version';
      reason: 'protocol-version';
      code: 'MESH_BAD_REQUEST';
      limited: 'address-limited' | 'connect-rate' | undefined;
    };

export function refuseConnect(returnCode: number, reason: RefusalReason, topic?: string): ConnectRefusal {
  return { ok: false, reason, code: REFUSAL_CODES[reason], returnCode, topic };
}

/** Step 1: the address's limit and CONNECT bucket (this takes a token from `ips`), then MQTT 3.1.1 only (level 4). */
export function doorVerdict(ips: IpGuard, ip: string, protocolVersion: number | undefined, now: number): DoorVerdict {
  const rate = ips.connect(ip, now);
  // 3.1 (level 3), MQTT 5 (level 5) and anything else: refused, also 3.1.1's level with another protocol name. The
  // answer is CONNACK 1 whatever the address, but a limit already holding is looked at first: a flood of them from a
  // limited address is that limit's business, not a new failure each.
  if (protocolVersion !== 4) {
    const limited = rate === 'ok' ? undefined : rate === 'limited' ? 'address-limited' : 'connect-rate';
    return { action: 'wrong-version', reason: 'protocol-version', code: 'MESH_BAD_REQUEST', limited };
  }
  if (rate === 'limited') return { action: 'go', limited: 'address-limited', quiet: true };
  if (rate === 'connect-rate') return { action: 'go', limited: 'connect-rate', quiet: false };
  if (rate === 'connect-rate-again') return { action: 'go', limited: 'connect-rate', quiet: true };
  return { action: 'go', limited: undefined };
}

/**
 * Step 2: the limits that depend on the id named. In authenticated mode a (id, address) pair banned after a storm of
 * failed tokens is refused before anything is verified; from a limited (or over-rate) address only an admitted id
 * goes on, so valid credentials still get in while a flood of strangers costs one Map lookup each. In open mode
 * there are no identities: a limited address is refused outright. Answered CONNACK 3 (server unavailable).
 *
 * What a dishonest sender gains: naming an admitted id it does not hold lets it spend at most
 * `authFailuresBeforeBan` signature checks per window per (id, address) before that pair is banned; the id's owner
 * connecting from another address is unaffected.
 */
export function limitRefusal(
  limited: boolean,
  clientId: string,
  ip: string,
  clients: ClientGuard,
  admissions: Admissions | undefined,
  now: number,
): ConnectRefusal | undefined {
  if (admissions === undefined) return limited ? refuseConnect(CONNACK_SERVER_UNAVAILABLE, 'address-limited') : undefined;
  if (!isValidId(clientId) || typeof admissions.lookup(clientId, now) === 'string') {
    return limited ? refuseConnect(CONNACK_SERVER_UNAVAILABLE, 'address-limited') : undefined;
  }
  if (clients.isBanned(ip, clientId, now)) return refuseConnect(CONNACK_SERVER_UNAVAILABLE, 'client-limited');
  return undefined;
}

/** Whether a refused CONNECT named an admitted id, so that its failure counts against the id, not the address. */
export function namesAdmittedId(clientId: string, admissions: Admissions | undefined, now: number): boolean {
  return admissions !== undefined && isValidId(clientId) && typeof admissions.lookup(clientId, now) !== 'string';
}

/** Step 3: the cheap checks, in order of cost. */
export function checkConnect(packet: ConnectFields, policy: ConnectPolicy, now: number): ConnectCheck {
  const clientId = packet.clientId ?? '';
  if (clientId.length > policy.maxClientIdLength) return refuseConnect(CONNACK_IDENTIFIER_REJECTED, 'client-id-too-long');
  const { username, password } = packet;
  if (username !== undefined && (username.length > MAX_USERNAME_BYTES || Buffer.byteLength(username) > MAX_USERNAME_BYTES)) {
    return refuseConnect(CONNACK_NOT_AUTHORIZED, 'username-too-long');
  }
  if (password !== undefined && password.byteLength > MAX_PASSWORD_BYTES) return refuseConnect(CONNACK_NOT_AUTHORIZED, 'password-too-long');
  // The mesh keeps no state for a client between connections.
  if (packet.clean === false) return refuseConnect(CONNACK_NOT_AUTHORIZED, 'persistent-session');
  const limit = policy.keepaliveLimitS;
  if (limit > 0 && (!packet.keepalive || packet.keepalive > limit)) {
    return refuseConnect(CONNACK_NOT_AUTHORIZED, packet.keepalive ? 'keepalive-too-long' : 'keepalive-zero');
  }
  if (packet.will) {
    const reason = checkWillPolicy(packet.will, clientId, policy.limits);
    if (reason !== undefined) return refuseConnect(CONNACK_NOT_AUTHORIZED, reason, packet.will.topic);
  }
  const auth = policy.auth;
  if (!auth) return { ok: true, token: undefined };
  const role = isValidId(clientId) ? roleOfId(clientId) : undefined;
  if (role === undefined) return refuseConnect(CONNACK_IDENTIFIER_REJECTED, 'id-not-key-derived');
  if (packet.will) {
    const reason = willRoleRefusal(role);
    if (reason !== undefined) return refuseConnect(CONNACK_NOT_AUTHORIZED, reason, packet.will.topic);
  }
  if (username !== undefined && username !== '' && username !== clientId)
    return refuseConnect(CONNACK_NOT_AUTHORIZED, 'username-not-client-id');
  if (password === undefined || password.byteLength === 0) return refuseConnect(CONNACK_NOT_AUTHORIZED, 'no-token');
  const token = readConnectToken(password);
  if (token === undefined) return refuseConnect(CONNACK_NOT_AUTHORIZED, 'bad-token');
  if (Math.abs(now - token.timestampMs) > auth.maxClockSkewMs) return refuseConnect(CONNACK_NOT_AUTHORIZED, 'stale-token');
  return { ok: true, token };
}

/** Where step 4 looks ids up: the admission store (./store.ts), or undefined in open mode. */
export interface Admissions {
  lookup(id: string, nowMs: number): Grant | LookupRefusal;
}

/**
 * Step 4: in open mode every client gets a session with no role (no ACL applies). In authenticated mode the id must
 * be admitted, the token's nonce unseen, and the signature made by the admitted key. Replays are refused before the
 * signature is checked (cheap); a nonce is recorded only once its signature held, so a forged token cannot burn a
 * nonce in advance.
 */
export function verifyConnect(
  clientId: string,
  token: ConnectToken | undefined,
  admissions: Admissions | undefined,
  nonces: NonceCache,
  now: number,
  publishBurst: number,
): ConnectVerification {
  if (!admissions) return { ok: true, session: newSession(clientId, undefined, Infinity, publishBurst) };
  if (!token) return refuseConnect(CONNACK_NOT_AUTHORIZED, 'no-token');
  const grant = admissions.lookup(clientId, now);
  if (typeof grant === 'string') return refuseConnect(CONNACK_NOT_AUTHORIZED, grant);
  const nonceKey = token.nonce.toString('base64');
  if (nonces.has(nonceKey, now)) return refuseConnect(CONNACK_NOT_AUTHORIZED, 'replayed-token');
  if (!verifyBytes(grant.publicKey, connectTokenMessage(clientId, token.timestampMs, token.nonce), token.signature)) {
    return refuseConnect(CONNACK_NOT_AUTHORIZED, 'bad-signature');
  }
  nonces.add(nonceKey, now);
  return { ok: true, session: newSession(clientId, grant.role, grant.expires, publishBurst) };
}

/**
 * Step 5, for a client aedes registered and again whenever a revocation is stored: whether its id is still admitted
 * (not revoked, admission not replaced or run out). Open mode (no admissions) never cuts anyone off. The session's own
 * expiry is watched by a timer in the wiring.
 */
export function stillAdmitted(admissions: Admissions | undefined, id: string, now: number): boolean {
  return admissions === undefined || typeof admissions.lookup(id, now) !== 'string';
}
