/**
 * The router part's front door. This step exports the pure core (registry, estimates, Vivaldi, selection);
 * `startRouter` (MQTT, HTTP, timers) builds on it and the simulator drives the very same functions.
 */

export {
  type BaselinePolicy,
  type BaselineReply,
  createEnvoyPolicy,
  createFinaglePolicy,
  createLinkerdPolicy,
  createPrequalPolicy,
  type Endpoint,
  type EnvoyOptions,
  FailureAccrual,
  FINAGLE_PENALTY,
  type FinagleOptions,
  FinaglePeakEwma,
  hotColdPick,
  type LinkerdOptions,
  LOST,
  Membership,
  type PrequalOptions,
  type ProbeAnswer,
  type ProbeChannel,
  reuseBudget,
  TokenRetryBudget,
  TowerPeakEwma,
  WeightedSampler,
  WindowedLatencies,
} from './baselines/index.ts';
export { AdaptiveConcurrency, type AdaptiveConcurrencyOptions, type ConcurrencyPermit, type ConcurrencySnapshot } from './concurrency.ts';
export {
  type ConsoleAdminOptions,
  JOIN_ROLES,
  type JoinRole,
  type LedgerEntry,
  type PendingAdmission,
  type RouterConsoleOptions,
} from './console-admissions.ts';
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
  MAX_MODELS_PER_AGENT,
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
export {
  GRPC_STATUS_OF,
  grpcErrorOf,
  KSERVE_PROTO_OPTIONS,
  KSERVE_PROTO_PATH,
  loadKServeProto,
  MESH_CODE_METADATA,
  startRouterGrpc,
} from './grpc.ts';
export type {
  AttemptRecord,
  RoutedRecord,
  RouteOptions,
  RouteResult,
  RouterChainOptions,
  RouterCounters,
  RouterGrpcHandle,
  RouterGrpcOptions,
  RouterHandle,
  RouterHttpHandle,
  RouterHttpOptions,
  RouterInferOptions,
  RouterInferResult,
  RouterLogger,
} from './handle.ts';
export { KSERVE_TO_DTYPE, type KServeDatatype, kserveDatatypeOf, startRouterHttp } from './http.ts';
export {
  API_KEY_PREFIX,
  type ApiKeyEntry,
  addressCaller,
  installHttpAuth,
  makeApiKey,
  type RouterHttpAuthOptions,
  scopeOfRoute,
} from './http-auth.ts';
export { binaryHeaderLength, HEADER_LENGTH } from './kserve.ts';
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
  type RelayCounters,
  type RelayOptions,
  type RelayRefusal,
  type RelayServer,
  type RelayServerOptions,
  type RelayVerdict,
  type RelayVoucherInput,
  registerRelayRoutes,
  startRelayServer,
  VoucherRelay,
} from './relay.ts';
export {
  type AuditEntry,
  judgeCanary,
  type RolloutOptions,
  type RolloutStatus,
  RouterRollouts,
  summarize,
  type Verdict,
  type VersionWindow,
} from './rollout.ts';
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
export { createWarmer, type Warmer, type WarmingOptions } from './warming.ts';
