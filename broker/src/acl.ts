/**
 * Per-role topic ACLs for authenticated mode (docs/security.md, "Authorization"; docs/protocol.md, "Topics"). Identity sits at a fixed topic level, so every
 * rule is "this level must be my own id": the checks are string comparisons against strings precomputed once per
 * connection (no split, no allocation on the publish hot path).
 *
 *   role                  publish                                                 subscribe
 *   agent                 mesh/v1/agent/{self}/status   (retain only here)        mesh/v1/agent/{self}/req/+
 *                         mesh/v1/agent/{self}/load                               mesh/v1/agent/{self}/cancel/+
 *                                                                                 mesh/v1/agent/{self}/voucher/+
 *                         mesh/v1/client/{any}/res/{self}                          (or a concrete sender id in place of +)
 *                                                                                 mesh/v1/discover/+
 *   app, bridge, router   mesh/v1/agent/{any}/req/{self}                          mesh/v1/client/{self}/res/+
 *                         mesh/v1/agent/{any}/cancel/{self}                       mesh/v1/client/{self}/lease/+
 *                         mesh/v1/router/{any}/route/{self}                       mesh/v1/agent/+/status, mesh/v1/agent/+/load
 *                         mesh/v1/agent/{any}/voucher/{self}
 *                         mesh/v1/discover/{self}  (agents answer with their status; operators may send it too)
 *                                                                                 (or a concrete agent id in place of +)
 *   router (also)         mesh/v1/client/{any}/lease/{self}                       mesh/v1/router/{self}/route/+
 *   bridge (also)         mesh/v1/bridge/{self}/dev/{id}/availability (retained)  mesh/v1/bridge/+/dev/+/availability
 *                         mesh/v1/bridge/{self}/dev/{id}/telemetry                mesh/v1/bridge/+/dev/+/telemetry
 *                                                                                 (apps, routers, operators too)
 *   operator              mesh/v1/admin/{self}/records  (applied by the broker,   mesh/v1/agent/+/status, mesh/v1/agent/+/load
 *                         never forwarded)                                        mesh/v1/admin/{self}/acks
 *   router, operator      (nobody publishes; the broker does)                     mesh/v1/revoked/+ (or one id)
 *   operator, router      mesh/v1/deploy/{group}/{model} (retained)              mesh/v1/deploy/{group}/+ (agents too)
 *
 * Everything else is refused: `#`, `+/#`, `$SYS/#`, other clients' replies, other agents' requests, status or
 * replies in someone else's name, requests with a sender id that is not the publisher's own.
 */
import { parseDeploymentTopic, parseTopic, type Role, topics } from '@edge-mesh/protocol';

const DEPLOY_PREFIX = 'mesh/v1/deploy/';

/**
 * Deployment steps (docs/deployment.md): operators and routers publish them, anyone with a role may read them. The
 * signature inside, not the ACL, is what an agent trusts; the ACL only keeps the retained slots from squatters.
 */
function isDeploymentFilter(filter: string): boolean {
  if (!filter.startsWith(DEPLOY_PREFIX)) return false;
  const [group, model, ...rest] = filter.slice(DEPLOY_PREFIX.length).split('/');
  if (rest.length > 0 || group === undefined || model === undefined) return false;
  // Each level is a wildcard or a concrete name; the concrete topic rule checks the names.
  return parseDeploymentTopic(`${DEPLOY_PREFIX}${group === '+' ? 'any' : group}/${model === '+' ? 'any' : model}`) !== undefined;
}

/** What the broker caches on each aedes client after its CONNECT was accepted. */
export interface MeshSession {
  readonly id: string;
  /** Undefined in open mode (no ACLs apply). */
  readonly role: Role | undefined;
  /** Admission expiry (epoch ms); Infinity for trusted operators and in open mode. */
  readonly expires: number;
  /** Publish token bucket. */
  tokens: number;
  last: number;
  /** Admin record token bucket (each record may cost a signature check and a synced write). */
  adminTokens: number;
  adminLast: number;
  /** The filters this connection holds, capped at the broker's `maxSubscriptions` (./handlers/subscribe.ts). */
  readonly subscriptions: Set<string>;
  // Precomputed topic strings for the ACL checks.
  readonly status: string;
  readonly load: string;
  /** `/res/{self}`: the tail of a reply an agent sends. */
  readonly replyTail: string;
  /** `/req/{self}` and `/cancel/{self}`: the tails of a request or cancel a sender sends. */
  readonly requestTail: string;
  readonly cancelTail: string;
  /** `/route/{self}`: a route request to a router; `/lease/{self}`: a router's lease to a client. */
  readonly routeTail: string;
  readonly leaseTail: string;
  readonly leaseFilter: string;
  readonly routeFilter: string;
  readonly voucherTail: string;
  readonly adminRecords: string;
  readonly adminAcks: string;
  readonly replyFilter: string;
  readonly requestFilter: string;
  readonly cancelFilter: string;
  /** `mesh/v1/bridge/{self}/dev/`: where a bridge publishes its devices' availability and telemetry. */
  readonly bridgeDevices: string;
  readonly voucherFilter: string;
  /** `mesh/v1/discover/{self}`: asks every agent to announce its status again. */
  readonly discover: string;
}

/** Admin records one operator connection may send: a burst of 100, then 10 per second. */
export const ADMIN_RECORD_BURST = 100;
export const ADMIN_RECORDS_PER_SECOND = 10;

/** Takes one admin-record token; false when the operator's connection is over its admin rate. */
export function takeAdminToken(s: MeshSession, now: number): boolean {
  const tokens = Math.min(ADMIN_RECORD_BURST, s.adminTokens + ((now - s.adminLast) * ADMIN_RECORDS_PER_SECOND) / 1000);
  s.adminLast = now;
  if (tokens < 1) {
    s.adminTokens = tokens;
    return false;
  }
  s.adminTokens = tokens - 1;
  return true;
}

export function newSession(id: string, role: Role | undefined, expires: number, burst: number): MeshSession {
  return {
    id,
    role,
    expires,
    tokens: burst,
    last: Date.now(),
    adminTokens: ADMIN_RECORD_BURST,
    adminLast: Date.now(),
    subscriptions: new Set(),
    status: topics.agentStatus(id),
    load: topics.agentLoad(id),
    replyTail: `/res/${id}`,
    requestTail: `/req/${id}`,
    cancelTail: `/cancel/${id}`,
    routeTail: `/route/${id}`,
    leaseTail: `/lease/${id}`,
    leaseFilter: topics.clientLeasesFor(id),
    routeFilter: topics.routerRoutesFor(id),
    voucherTail: `/voucher/${id}`,
    adminRecords: topics.adminRecords(id),
    adminAcks: topics.adminAcks(id),
    replyFilter: topics.clientRepliesFor(id),
    requestFilter: topics.agentRequestsFor(id),
    cancelFilter: topics.agentCancelsFor(id),
    bridgeDevices: `mesh/v1/bridge/${id}/dev/`,
    voucherFilter: topics.agentVouchersFor(id),
    discover: topics.discover(id),
  };
}

/** Verdicts of `aclPublish`. */
export const ACL_DENY = 0;
export const ACL_ALLOW = 1;
/** An operator's admin record: the broker applies it itself. */
export const ACL_ADMIN = 2;

const AGENT_PREFIX = 'mesh/v1/agent/';
const CLIENT_PREFIX = 'mesh/v1/client/';
const ROUTER_PREFIX = 'mesh/v1/router/';

/** True when topic[start, end) is a valid participant id: 3-64 of [a-z0-9-], not starting with '-'. */
function isIdSpan(topic: string, start: number, end: number): boolean {
  const n = end - start;
  if (n < 3 || n > 64) return false;
  for (let i = start; i < end; i++) {
    const c = topic.charCodeAt(i);
    if ((c >= 97 && c <= 122) || (c >= 48 && c <= 57)) continue;
    if (c === 45 && i !== start) continue;
    return false;
  }
  return true;
}

/** `prefix{id}tail` with a valid id in the middle. */
function matchesIdBetween(topic: string, prefix: string, tail: string): boolean {
  return topic.startsWith(prefix) && topic.endsWith(tail) && isIdSpan(topic, prefix.length, topic.length - tail.length);
}

/** What every sender (app, bridge, router) may publish: requests, cancels, vouchers and route requests in its own name. */
function clientPublish(s: MeshSession, topic: string): number {
  return topic === s.discover ||
    matchesIdBetween(topic, AGENT_PREFIX, s.requestTail) ||
    matchesIdBetween(topic, AGENT_PREFIX, s.cancelTail) ||
    matchesIdBetween(topic, AGENT_PREFIX, s.voucherTail) ||
    matchesIdBetween(topic, ROUTER_PREFIX, s.routeTail)
    ? ACL_ALLOW
    : ACL_DENY;
}

/** The ACL verdict for a PUBLISH by an authenticated client (open-mode sessions have no role: always allowed). */
export function aclPublish(s: MeshSession, topic: string): number {
  switch (s.role) {
    case 'agent':
      if (topic === s.status || topic === s.load) return ACL_ALLOW;
      return matchesIdBetween(topic, CLIENT_PREFIX, s.replyTail) ? ACL_ALLOW : ACL_DENY;
    case 'router':
      if (matchesIdBetween(topic, CLIENT_PREFIX, s.leaseTail)) return ACL_ALLOW;
      if (topic.startsWith(DEPLOY_PREFIX)) return parseDeploymentTopic(topic) ? ACL_ALLOW : ACL_DENY;
      return clientPublish(s, topic);
    case 'bridge':
      if (matchesIdBetween(topic, s.bridgeDevices, '/availability') || matchesIdBetween(topic, s.bridgeDevices, '/telemetry'))
        return ACL_ALLOW;
      return clientPublish(s, topic);
    case 'app':
      return clientPublish(s, topic);
    case 'operator':
      if (topic.startsWith(DEPLOY_PREFIX)) return parseDeploymentTopic(topic) ? ACL_ALLOW : ACL_DENY;
      if (topic === s.discover) return ACL_ALLOW;
      return topic === s.adminRecords ? ACL_ADMIN : ACL_DENY;
    case undefined:
      return ACL_ALLOW;
    default:
      return ACL_DENY;
  }
}

const ALL_STATUS = topics.allAgentStatus();
const ALL_LOAD = topics.allAgentLoad();
const ALL_DEVICE_AVAILABILITY = topics.allDeviceAvailability();
const ALL_DEVICE_TELEMETRY = topics.allDeviceTelemetry();
const ALL_REVOCATIONS = topics.allRevocations();
const ALL_DISCOVER = topics.allDiscover();

/** Whether a client may SUBSCRIBE to `filter` (not on the hot path; exact strings or one concrete id). */
export function aclSubscribe(s: MeshSession, filter: string): boolean {
  const role = s.role;
  if (role === undefined) return true;
  if (isDeploymentFilter(filter)) return true;
  if (role === 'agent') {
    if (filter === s.requestFilter || filter === s.cancelFilter || filter === s.voucherFilter || filter === ALL_DISCOVER) return true;
    const p = parseTopic(filter);
    return p !== undefined && (p.kind === 'request' || p.kind === 'cancel' || p.kind === 'voucher') && p.agentId === s.id;
  }
  if (filter === ALL_STATUS || filter === ALL_LOAD || filter === ALL_DEVICE_AVAILABILITY || filter === ALL_DEVICE_TELEMETRY) return true;
  const p = parseTopic(filter);
  if (p?.kind === 'device') return true;
  if (filter === ALL_REVOCATIONS || p?.kind === 'revocation') return role === 'router' || role === 'operator';
  if (role === 'operator') {
    if (filter === s.adminAcks) return true;
    return p !== undefined && (p.kind === 'status' || p.kind === 'load');
  }
  // app, bridge, router
  if (filter === s.replyFilter || filter === s.leaseFilter) return true;
  if (role === 'router' && filter === s.routeFilter) return true;
  if (p === undefined) return false;
  if (p.kind === 'reply' || p.kind === 'lease') return p.clientId === s.id;
  if (p.kind === 'route') return role === 'router' && p.routerId === s.id;
  return p.kind === 'status' || p.kind === 'load';
}
