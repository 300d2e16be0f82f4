/**
 * SUBSCRIBE decisions (MQTT 3.1.1 §3.8), one per topic filter: the built-in filter policy (../policy.ts: caps, no `$`
 * filters, nothing that matches every topic), then in authenticated mode the role ACL (../acl.ts), then the cap on
 * filters one connection holds (`maxSubscriptions`). A refused filter gets return code 0x80 (Failure, §3.9.3) in the
 * SUBACK and the connection stays up; a granted one is granted at most QoS 1, since the broker never runs QoS 2
 * ([MQTT-3.8.4-6] lets it grant less than was asked).
 */
import type { MeshErrorCode } from '@edge-mesh/protocol';
import { aclSubscribe, type MeshSession } from '../acl.ts';
import { checkSubscribeFilter, type TopicLimits } from '../policy.ts';
import { REFUSAL_CODES, type RefusalReason } from './refusals.ts';

/** A refusal's `code` is the registry code it is logged with (./refusals.ts); the client only sees 0x80. */
export type SubscribeVerdict = { ok: true; qos: number } | { ok: false; reason: RefusalReason; code: MeshErrorCode };

/** The QoS the broker grants for a requested one: QoS 2 becomes 1. */
export function grantedQos(requested: number): number {
  return requested === 2 ? 1 : requested;
}

/**
 * Whether a client with `session` (undefined: it has none) may subscribe to `filter` at `qos`, and at which QoS. This
 * only looks at the room left under `maxSubscriptions`; `takeSubscription` takes it once the filter is granted.
 */
export function decideSubscribe(
  filter: string,
  qos: number,
  session: MeshSession | undefined,
  auth: boolean,
  limits: TopicLimits,
  maxSubscriptions: number,
): SubscribeVerdict {
  const reason = checkSubscribeFilter(filter, limits);
  if (reason !== undefined) return { ok: false, reason, code: REFUSAL_CODES[reason] };
  if (auth && (session === undefined || !aclSubscribe(session, filter))) return { ok: false, reason: 'acl', code: REFUSAL_CODES.acl };
  if (session !== undefined && !hasRoomFor(session, filter, maxSubscriptions)) return tooMany;
  return { ok: true, qos: grantedQos(qos) };
}

const tooMany: SubscribeVerdict = { ok: false, reason: 'too-many-subscriptions', code: REFUSAL_CODES['too-many-subscriptions'] };

/** A filter the connection already holds needs no more room (subscribing again only replaces its QoS). */
function hasRoomFor(session: MeshSession, filter: string, maxSubscriptions: number): boolean {
  return session.subscriptions.size < maxSubscriptions || session.subscriptions.has(filter);
}

/**
 * Records `filter` as held by the connection. Called just before aedes is told the filter is granted, after any
 * application hook: filters waiting on a hook hold no room, so neither a hook that refuses nor an UNSUBSCRIBE that
 * overtakes the grant leaves the count apart from what aedes holds. False, with nothing recorded, when there is no
 * room left.
 */
export function takeSubscription(session: MeshSession, filter: string, maxSubscriptions: number): boolean {
  if (!hasRoomFor(session, filter, maxSubscriptions)) return false;
  session.subscriptions.add(filter);
  return true;
}

/** An UNSUBSCRIBE frees the room of each filter it names. */
export function releaseSubscriptions(session: MeshSession, filters: readonly string[]): void {
  for (const filter of filters) session.subscriptions.delete(filter);
}

/** A SUBSCRIBE's topic filter as the MQTT parser gives it. */
export interface SubscribeEntry {
  topic: string;
  qos: number;
  [option: string]: unknown;
}

/**
 * MQTT 3.1.1 §3.8.4 [MQTT-3.8.4-4]: a SUBSCRIBE with several filters is handled as a sequence of SUBSCRIBEs, one per
 * filter, whose answers go in one SUBACK with a return code for each filter asked for [MQTT-3.9.3-1], duplicates
 * included. aedes (lib/handlers/subscribe.js, `_dedupe`) keeps only the last of duplicate filters and answers fewer
 * codes than were asked for, which mqtt.js takes as a protocol error and closes the connection (issue 13). This keeps
 * every entry and gives each duplicate the options of the filter's last occurrence, as handling them in sequence
 * would leave it; true when the list had duplicates.
 */
export function unifyDuplicateFilters(subscriptions: SubscribeEntry[]): boolean {
  if (subscriptions.length < 2) return false;
  const last = new Map<string, SubscribeEntry>();
  for (const sub of subscriptions) last.set(sub.topic, sub);
  if (last.size === subscriptions.length) return false;
  for (let i = 0; i < subscriptions.length; i++) subscriptions[i] = { ...last.get(subscriptions[i]!.topic)! };
  return true;
}
