/**
 * The router part's front door. This step exports the pure core (registry, estimates, Vivaldi, selection);
 * `startRouter` (MQTT, HTTP, timers) builds on it and the simulator drives the very same functions.
 */
export {
  type AgentDescriptor,
  type AgentEntry,
  type AgentModelDescriptor,
  type ClassModelStats,
  createRegistry,
  decayedEwma,
  decayWeight,
  eject,
  evaluateOutliers,
  type FailureInfo,
  hardwareClassOf,
  isAlive,
  isEjected,
  isOnProbation,
  kappaAt,
  type ModelEntry,
  type ModelPool,
  markDown,
  mulberry32,
  onCancel,
  onFailure,
  onLoad,
  onModelState,
  onQueueClaim,
  onQueueReport,
  onReply,
  onSend,
  onStatus,
  type PoolCache,
  p95E2eMs,
  pFailAt,
  priorRttMs,
  type Registry,
  type ReplySample,
  type Rng,
  type RouterConfig,
  type RouterOptions,
  resolveConfig,
  type StatusExtras,
  serviceMsAt,
  slowStartFactor,
  upsertAgent,
} from './estimates.ts';
export type {
  AttemptRecord,
  RouteOptions,
  RouteResult,
  RouterChainOptions,
  RouterCounters,
  RouterHandle,
  RouterHttpHandle,
  RouterHttpOptions,
  RouterInferOptions,
  RouterInferResult,
  RouterLogger,
} from './handle.ts';
export { KSERVE_TO_DTYPE, type KServeDatatype, kserveDatatypeOf, startRouterHttp } from './http.ts';
export { answerRoute, type LeaseOptions, leaseAgents } from './leases.ts';
export { addNetSample, type NetFit, type NetFitOptions, netFitMs, newNetFit } from './netfit.ts';
export {
  type LivePolicy,
  type LivePolicyContext,
  type LivePolicyFactory,
  observedBy,
  ROUTER_POLICIES,
  ROUTER_POLICY_NAMES,
  resolveRouterPolicy,
} from './policies.ts';
export { createRouterPolicy, type ReplyTimes, type RouterAsk, type RouterPolicy, type RouterPolicyOptions } from './policy.ts';
export {
  currentPool,
  expectedCompletionMs,
  failureAwareScoreMs,
  fleetUtilization,
  hedgeDelayMs,
  networkRttMs,
  perTryTimeoutMs,
  type RouteRequest,
  type Selection,
  type SelectOptions,
  selectAgent,
} from './select.ts';
export { type StartRouterOptions, startRouter } from './start.ts';
export {
  applyVivaldiSample,
  isCoordKnown,
  newCoord,
  VIVALDI_DEFAULTS,
  type VivaldiCoord,
  type VivaldiOptions,
  vivaldiDistanceMs,
} from './vivaldi.ts';
