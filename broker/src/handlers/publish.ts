/**
 * PUBLISH decisions (MQTT 3.1.1 §3.3), in order: the built-in topic policy (../policy.ts: no QoS 2, topic caps, no
 * `$` topics, retain only on the publisher's own status or a deployment step, never an empty step), the client's
 * publish token bucket, and in authenticated mode the role ACL (../acl.ts), where an operator's admin record costs an
 * admin token as well.
 *
 * A refused PUBLISH disconnects its client: MQTT 3.1.1 has no PUBACK error code, and a silently dropped QoS 1 message
 * would look delivered ([MQTT-3.3.5-2] lets the server close the connection instead).
 */
import type { MeshErrorCode } from '@edge-mesh/protocol';
import { ACL_ADMIN, ACL_DENY, aclPublish, type MeshSession, takeAdminToken } from '../acl.ts';
import { checkPublish, type TopicLimits } from '../policy.ts';
import { REFUSAL_CODES, type RefusalReason } from './refusals.ts';
import { orphanWillAllowed } from './will.ts';

export interface PublishContext {
  /** The publisher's id; for an orphaned will, the id stored with it. */
  ownerId: string | null | undefined;
  /** The publisher's session; undefined for an orphaned will (no client). */
  session: MeshSession | undefined;
  /** aedes republishes a stored will with no client (its owner's session is gone). */
  orphanWill: boolean;
  /** The packet is the publisher's own will, published as it goes: never rate limited. */
  ownWill: boolean;
  /** Authenticated mode: the role ACL applies. */
  auth: boolean;
  limits: TopicLimits;
  /** The per-client publish bucket: tokens per millisecond and the burst. */
  ratePerMs: number;
  burst: number;
  now: number;
}

/** `admin`: the packet is an operator's admin record, which the broker applies itself (../admin.ts). */
export type PublishVerdict = { ok: true; admin: boolean } | PublishRefusal;
/** `code`: the registry code the refusal is raised with (./refusals.ts). */
export type PublishRefusal = { ok: false; reason: RefusalReason; code: MeshErrorCode };

const refuse = (reason: RefusalReason): PublishRefusal => ({ ok: false, reason, code: REFUSAL_CODES[reason] });

/** Refills and takes one token from the session's publish bucket; false when it is empty. */
export function takePublishToken(session: MeshSession, now: number, ratePerMs: number, burst: number): boolean {
  let tokens = session.tokens + (now - session.last) * ratePerMs;
  if (tokens > burst) tokens = burst;
  session.last = now;
  if (tokens < 1) {
    session.tokens = tokens;
    return false;
  }
  session.tokens = tokens - 1;
  return true;
}

/** Whether `packet` may be published; updates the session's buckets when it has one. */
export function decidePublish(
  packet: { topic: string; qos?: number; retain?: boolean; payload?: Buffer | string },
  ctx: PublishContext,
): PublishVerdict {
  const { ownerId, session } = ctx;
  const reason = checkPublish(packet, ownerId, ctx.limits);
  if (reason !== undefined) return refuse(reason);
  if (session === undefined) {
    // No session: an orphaned will, which in authenticated mode may only be its agent's own status. A client without
    // a session (it never passed authentication) may publish nothing in authenticated mode.
    if (ctx.auth && (!ctx.orphanWill || !orphanWillAllowed(packet.topic, ownerId))) return refuse('acl');
    return { ok: true, admin: false };
  }
  if (!ctx.ownWill && !takePublishToken(session, ctx.now, ctx.ratePerMs, ctx.burst)) return refuse('publish-rate');
  if (!ctx.auth) return { ok: true, admin: false };
  const acl = aclPublish(session, packet.topic);
  if (acl === ACL_DENY) return refuse('acl');
  if (acl === ACL_ADMIN) {
    if (!takeAdminToken(session, ctx.now)) return refuse('admin-rate');
    return { ok: true, admin: true };
  }
  return { ok: true, admin: false };
}
