/**
 * The local mesh and what it shares with the tests and benchmarks: `edge-mesh up`, the sample app,
 * the real models copied out of their npm packages, sample inputs, the simulated bridge device, the
 * local chain with a funded escrow, and a KServe v2 HTTP client.
 */

export * from './bridge-demo.ts';
export * from './host.ts';
export * from './kserve-client.ts';
export * from './models.ts';
export * from './parts.ts';
export * from './pipeline-local.ts';
export * from './pipeline-models.ts';
export * from './rabbitmq.ts';
export * from './sample-app.ts';
export * from './sample-inputs.ts';
export * from './stats.ts';
export * from './supervisor.ts';
export * from './text-image.ts';
export * from './up.ts';
export * from './up-settlement.ts';
