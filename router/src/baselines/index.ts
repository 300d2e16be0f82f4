/**
 * Baseline balancers as request-engine policies, each as its source implements it (docs/routing.md,
 * "Baselines"): the simulator measures the router against them, and a live router could run any of them.
 */
export { type BaselinePolicy, type BaselineReply, type Endpoint, LOST, Membership, TokenRetryBudget, WeightedSampler } from './common.ts';
export { createEnvoyPolicy, type EnvoyOptions } from './envoy.ts';
export { createFinaglePolicy, FailureAccrual, type FinagleOptions, WindowedLatencies } from './finagle.ts';
export { createLinkerdPolicy, type LinkerdOptions } from './linkerd.ts';
export { FINAGLE_PENALTY, FinaglePeakEwma, TowerPeakEwma } from './peak-ewma.ts';
export { createPrequalPolicy, hotColdPick, type PrequalOptions, type ProbeAnswer, type ProbeChannel, reuseBudget } from './prequal.ts';
