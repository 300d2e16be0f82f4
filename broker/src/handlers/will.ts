/**
 * Wills (MQTT 3.1.1 §3.1.2.5): a message the broker publishes for a client after it is gone, so the broker decides
 * twice about it: when the CONNECT carrying it arrives, and when aedes republishes a stored will whose owner's
 * session is no longer there (an "orphaned" will, published with no client at all).
 *
 * A will may only be QoS 0/1 and aimed at its owner's own status topic; in authenticated mode only an agent may set
 * one (an agent's will is how the mesh learns it went offline). Retained messages follow the same idea and are
 * checked with the other topic rules in ../policy.ts (`checkPublish`: retain only on the publisher's own status or a
 * bridge's own device availability).
 */
import { type Role, roleOfId } from '@edge-mesh/protocol';
import { checkWill, isOwnStatusTopic, type TopicLimits, type WillRefusal } from '../policy.ts';

export type { WillRefusal } from '../policy.ts';

/** The will's own rules (QoS, topic caps, own status topic), checked before the client's id is looked at. */
export function checkWillPolicy(will: { topic: string; qos?: number }, clientId: string, limits: TopicLimits): WillRefusal | undefined {
  return checkWill(will, clientId, limits);
}

/** In authenticated mode: whether a client of `role` may leave a will at all. */
export function willRoleRefusal(role: Role): 'will-not-agent' | undefined {
  return role === 'agent' ? undefined : 'will-not-agent';
}

/**
 * Whether an orphaned will (no client, no session) may be published in authenticated mode: only an agent's own
 * status, which is all its CONNECT could have stored.
 */
export function orphanWillAllowed(topic: string, ownerId: string | null | undefined): boolean {
  return isOwnStatusTopic(topic, ownerId) && roleOfId(ownerId ?? '') === 'agent';
}
