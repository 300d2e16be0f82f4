/**
 * The MQTT topic tree. Identity sits at a fixed level so broker ACLs can be pattern rules and a
 * subscriber always knows who published:
 *
 *   mesh/v1/agent/{agentId}/req/{senderId}    request to one agent (QoS 1)
 *   mesh/v1/client/{clientId}/res/{agentId}   reply to a client (QoS 1)
 *   mesh/v1/agent/{agentId}/cancel/{senderId} cancel by request id (QoS 1)
 *   mesh/v1/agent/{agentId}/status            retained presence and capabilities; the LWT marks it offline
 *   mesh/v1/agent/{agentId}/load              heartbeat (QoS 0)
 *   mesh/v1/router/{routerId}/route/{senderId}  a client asks a router for a route lease (QoS 1)
 *   mesh/v1/client/{clientId}/lease/{routerId}  the router's lease (QoS 1)
 *   mesh/v1/agent/{agentId}/voucher/{senderId} payer-signed voucher for the sender's lane (QoS 1)
 *   mesh/v1/admin/{operatorId}/records        signed admission/revocation records for the broker (operator only)
 *   mesh/v1/admin/{operatorId}/acks           the broker's answers to that operator's records
 *   mesh/v1/revoked/{id}                       retained operator-signed revocation of id, republished by the broker
 *   mesh/v1/bridge/{bridgeId}/dev/{deviceId}/availability  a firmware bridge's device: online/asleep/offline (retained)
 *   mesh/v1/bridge/{bridgeId}/dev/{deviceId}/telemetry     a firmware bridge's device: sensor readings (QoS 0)
 */
import { MeshError } from './errors.ts';

export const TOPIC_ROOT = 'mesh/v1';
/** Deepest topic the mesh itself uses is 7 levels (a bridged device's topics); the broker refuses anything deeper than this. */
export const MAX_TOPIC_LEVELS = 8;
export const MAX_TOPIC_BYTES = 256;

const ID_PATTERN = /^[a-z0-9][a-z0-9-]{2,63}$/;

/** Participant ids: lower-case letters, digits and dashes, 3 to 64 characters, no wildcards or `__proto__`. */
export function isValidId(id: unknown): id is string {
  return typeof id === 'string' && ID_PATTERN.test(id);
}

export function assertValidId(id: unknown, what = 'id'): string {
  if (!isValidId(id)) {
    throw new MeshError(
      'MESH_CONFIG',
      `${what} ${JSON.stringify(id)} is not valid: use 3-64 of [a-z0-9-], starting with a letter or digit`,
    );
  }
  return id;
}

export const topics = {
  agentRequest: (agentId: string, senderId: string) => `${TOPIC_ROOT}/agent/${agentId}/req/${senderId}`,
  agentRequestsFor: (agentId: string) => `${TOPIC_ROOT}/agent/${agentId}/req/+`,
  agentCancel: (agentId: string, senderId: string) => `${TOPIC_ROOT}/agent/${agentId}/cancel/${senderId}`,
  agentCancelsFor: (agentId: string) => `${TOPIC_ROOT}/agent/${agentId}/cancel/+`,
  agentVoucher: (agentId: string, senderId: string) => `${TOPIC_ROOT}/agent/${agentId}/voucher/${senderId}`,
  agentVouchersFor: (agentId: string) => `${TOPIC_ROOT}/agent/${agentId}/voucher/+`,
  agentStatus: (agentId: string) => `${TOPIC_ROOT}/agent/${agentId}/status`,
  agentLoad: (agentId: string) => `${TOPIC_ROOT}/agent/${agentId}/load`,
  allAgentStatus: () => `${TOPIC_ROOT}/agent/+/status`,
  allAgentLoad: () => `${TOPIC_ROOT}/agent/+/load`,
  clientReply: (clientId: string, agentId: string) => `${TOPIC_ROOT}/client/${clientId}/res/${agentId}`,
  clientRepliesFor: (clientId: string) => `${TOPIC_ROOT}/client/${clientId}/res/+`,
  routerRoute: (routerId: string, senderId: string) => `${TOPIC_ROOT}/router/${routerId}/route/${senderId}`,
  routerRoutesFor: (routerId: string) => `${TOPIC_ROOT}/router/${routerId}/route/+`,
  clientLease: (clientId: string, routerId: string) => `${TOPIC_ROOT}/client/${clientId}/lease/${routerId}`,
  clientLeasesFor: (clientId: string) => `${TOPIC_ROOT}/client/${clientId}/lease/+`,
  /** An operator publishes CBOR `{record, sig}` (a SignedRecord) here; the broker applies it, never forwards it. */
  adminRecords: (operatorId: string) => `${TOPIC_ROOT}/admin/${operatorId}/records`,
  /** The broker's `{v, kind:'ack', id, ok, code?, message?}` answers; only that operator may subscribe. */
  adminAcks: (operatorId: string) => `${TOPIC_ROOT}/admin/${operatorId}/acks`,
  /**
   * Retained CBOR `{record, sig}`: the operator-signed revocation of `id`, as the broker stored it, republished by the
   * broker (no client may publish here) so routers can refuse the id's HTTP tokens; readers check the signature.
   */
  revocation: (id: string) => `${TOPIC_ROOT}/revoked/${id}`,
  allRevocations: () => `${TOPIC_ROOT}/revoked/+`,
  /** Retained `{v, kind:'availability', device, state, last_seen, next_wake, via}` for a device behind a firmware bridge. */
  deviceAvailability: (bridgeId: string, deviceId: string) => `${TOPIC_ROOT}/bridge/${bridgeId}/dev/${deviceId}/availability`,
  deviceTelemetry: (bridgeId: string, deviceId: string) => `${TOPIC_ROOT}/bridge/${bridgeId}/dev/${deviceId}/telemetry`,
  allDeviceAvailability: () => `${TOPIC_ROOT}/bridge/+/dev/+/availability`,
  allDeviceTelemetry: () => `${TOPIC_ROOT}/bridge/+/dev/+/telemetry`,
  /**
   * "Agents, announce yourselves": a client that watches statuses publishes here (empty payload, QoS 0) on every
   * (re)connect, and every agent answers by publishing its status again. A broker that keeps retained messages
   * per node, or matches them only on exact topics (RabbitMQ 3.10), never hands a newcomer the retained statuses.
   */
  discover: (senderId: string) => `${TOPIC_ROOT}/discover/${senderId}`,
  allDiscover: () => `${TOPIC_ROOT}/discover/+`,
} as const;

export const DEVICE_TOPIC_KINDS = ['availability', 'telemetry'] as const;
export type DeviceTopicKind = (typeof DEVICE_TOPIC_KINDS)[number];

export type ParsedTopic =
  | { kind: 'request'; agentId: string; senderId: string }
  | { kind: 'cancel'; agentId: string; senderId: string }
  | { kind: 'voucher'; agentId: string; senderId: string }
  | { kind: 'status'; agentId: string }
  | { kind: 'load'; agentId: string }
  | { kind: 'reply'; clientId: string; agentId: string }
  | { kind: 'route'; routerId: string; senderId: string }
  | { kind: 'lease'; clientId: string; routerId: string }
  | { kind: 'admin-records'; operatorId: string }
  | { kind: 'admin-acks'; operatorId: string }
  | { kind: 'revocation'; id: string }
  | { kind: 'discover'; senderId: string }
  | { kind: 'device'; bridgeId: string; deviceId: string; what: DeviceTopicKind };

/** Parses a concrete (wildcard-free) mesh topic; returns undefined for anything outside the tree. */
export function parseTopic(topic: string): ParsedTopic | undefined {
  const parts = topic.split('/');
  if (parts[0] !== 'mesh' || parts[1] !== 'v1') return undefined;
  const [, , area, id, verb, other] = parts;
  if (!isValidId(id)) return undefined;
  if (area === 'agent') {
    if (parts.length === 5 && verb === 'status') return { kind: 'status', agentId: id };
    if (parts.length === 5 && verb === 'load') return { kind: 'load', agentId: id };
    if (parts.length === 6 && isValidId(other)) {
      if (verb === 'req') return { kind: 'request', agentId: id, senderId: other };
      if (verb === 'cancel') return { kind: 'cancel', agentId: id, senderId: other };
      if (verb === 'voucher') return { kind: 'voucher', agentId: id, senderId: other };
    }
    return undefined;
  }
  if (area === 'client' && parts.length === 6 && isValidId(other)) {
    if (verb === 'res') return { kind: 'reply', clientId: id, agentId: other };
    if (verb === 'lease') return { kind: 'lease', clientId: id, routerId: other };
    return undefined;
  }
  if (area === 'router' && parts.length === 6 && verb === 'route' && isValidId(other)) {
    return { kind: 'route', routerId: id, senderId: other };
  }
  if (area === 'bridge' && parts.length === 7 && verb === 'dev' && isValidId(other)) {
    const what = parts[6] as DeviceTopicKind;
    return (DEVICE_TOPIC_KINDS as readonly string[]).includes(what) ? { kind: 'device', bridgeId: id, deviceId: other, what } : undefined;
  }
  if (area === 'revoked' && parts.length === 4) return { kind: 'revocation', id };
  if (area === 'discover' && parts.length === 4) return { kind: 'discover', senderId: id };
  if (area === 'admin' && parts.length === 5) {
    if (verb === 'records') return { kind: 'admin-records', operatorId: id };
    if (verb === 'acks') return { kind: 'admin-acks', operatorId: id };
  }
  return undefined;
}
