/**
 * The broker's built-in topic policy (docs/security.md, "Hostile input"): pure functions that return a refusal reason or
 * undefined. They run on every PUBLISH, so they avoid allocation: one charCode pass per topic.
 */
import { parseDeploymentTopic, parseTopic } from '@edge-mesh/protocol';

export interface TopicLimits {
  maxTopicLevels: number;
  maxTopicBytes: number;
}

export type TopicRefusal =
  | 'empty-topic'
  | 'topic-too-long'
  | 'too-many-levels'
  | 'nul-in-topic'
  | 'invalid-utf8'
  | 'reserved-topic'
  | 'wildcard-in-topic'
  | 'wildcard-all';

export type PublishRefusal = TopicRefusal | 'qos2' | 'retain-not-own-status' | 'empty-retained-step';
export type WillRefusal = 'will-qos2' | 'will-not-own-status' | TopicRefusal;

const SLASH = 47;
const NUL = 0;
const DOLLAR = 36;
const PLUS = 43;
const HASH = 35;
/** mqtt-packet decodes ill-formed UTF-8 to U+FFFD; MQTT 3.1.1 §1.5.3 requires such a topic to be refused. */
const REPLACEMENT = 0xfffd;

/**
 * Caps shared by topics and filters: empty, NUL, ill-formed UTF-8, `$` prefix (reserved for the broker: `$SYS`,
 * `$share`), levels, bytes.
 */
function checkCommon(topic: string, limits: TopicLimits, allowWildcards: boolean): TopicRefusal | undefined {
  const n = topic.length;
  if (n === 0) return 'empty-topic';
  // UTF-16 length never exceeds UTF-8 byte length, so this is a sound early exit.
  if (n > limits.maxTopicBytes) return 'topic-too-long';
  if (topic.charCodeAt(0) === DOLLAR) return 'reserved-topic';
  let levels = 1;
  let ascii = true;
  for (let i = 0; i < n; i++) {
    const c = topic.charCodeAt(i);
    if (c === SLASH) levels++;
    else if (c === NUL) return 'nul-in-topic';
    else if (!allowWildcards && (c === PLUS || c === HASH)) return 'wildcard-in-topic';
    else if (c > 0x7f) {
      if (c === REPLACEMENT) return 'invalid-utf8';
      ascii = false;
    }
  }
  if (levels > limits.maxTopicLevels) return 'too-many-levels';
  if (!ascii && Buffer.byteLength(topic, 'utf8') > limits.maxTopicBytes) return 'topic-too-long';
  return undefined;
}

/** A concrete PUBLISH topic (no wildcards). */
export function checkPublishTopic(topic: string, limits: TopicLimits): TopicRefusal | undefined {
  return checkCommon(topic, limits, false);
}

/**
 * A SUBSCRIBE filter. Besides the common caps, filters that match every topic are refused: `#`, `+/#`, `+/+/#`, …
 * (all levels before a trailing `#` are `+`). Narrower ACLs per role come with the identity issue.
 */
export function checkSubscribeFilter(filter: string, limits: TopicLimits): TopicRefusal | undefined {
  const refusal = checkCommon(filter, limits, true);
  if (refusal !== undefined) return refusal;
  if (filter.charCodeAt(filter.length - 1) === HASH) {
    let allPlus = true;
    for (let i = 0; i < filter.length - 1; i += 2) {
      if (filter.charCodeAt(i) !== PLUS || filter.charCodeAt(i + 1) !== SLASH) {
        allPlus = false;
        break;
      }
    }
    if (allPlus) return 'wildcard-all';
  }
  return undefined;
}

/** True when `topic` is `mesh/v1/agent/{ownerId}/status`. */
export function isOwnStatusTopic(topic: string, ownerId: string | null | undefined): boolean {
  if (!ownerId) return false;
  const parsed = parseTopic(topic);
  return parsed !== undefined && parsed.kind === 'status' && parsed.agentId === ownerId;
}

/** True when `topic` is `mesh/v1/bridge/{ownerId}/dev/{deviceId}/availability`: a bridge's retained device state. */
export function isOwnDeviceAvailabilityTopic(topic: string, ownerId: string | null | undefined): boolean {
  if (!ownerId) return false;
  const parsed = parseTopic(topic);
  return parsed !== undefined && parsed.kind === 'device' && parsed.what === 'availability' && parsed.bridgeId === ownerId;
}

/**
 * Built-in publish rules: no QoS 2, topic caps, retain only on the publisher's own status topic (or a bridge's device
 * availability, or a deployment step), and never an empty retained deployment step.
 */
export function checkPublish(
  packet: { topic: string; qos?: number; retain?: boolean; payload?: Buffer | string },
  ownerId: string | null | undefined,
  limits: TopicLimits,
): PublishRefusal | undefined {
  if (packet.qos === 2) return 'qos2';
  const refusal = checkPublishTopic(packet.topic, limits);
  if (refusal !== undefined) return refusal;
  if (!packet.retain) return undefined;
  if (isOwnStatusTopic(packet.topic, ownerId) || isOwnDeviceAvailabilityTopic(packet.topic, ownerId)) return undefined;
  // A deployment step is retained for agents that connect later; the ACL (acl.ts) says who may publish one. An empty
  // retained message deletes the retained one (MQTT 3.1.1 §3.3.1.3), and the ACL lets every router publish on every
  // group's topics, so one router could erase every group's step; a step is replaced by the next one, never cleared.
  if (parseDeploymentTopic(packet.topic) !== undefined) return packet.payload?.length === 0 ? 'empty-retained-step' : undefined;
  return 'retain-not-own-status';
}

/** A CONNECT's will must be QoS 0/1 and aimed at the connecting client's own status topic. */
export function checkWill(will: { topic: string; qos?: number }, clientId: string, limits: TopicLimits): WillRefusal | undefined {
  if (will.qos === 2) return 'will-qos2';
  const refusal = checkPublishTopic(will.topic, limits);
  if (refusal !== undefined) return refusal;
  if (!isOwnStatusTopic(will.topic, clientId)) return 'will-not-own-status';
  return undefined;
}
