/**
 * The client layer every MQTT participant runs (agent, SDK, router, bridge, CLI): the connection
 * recipe, how statuses and replies are read, the retry and hedge budget, key files on disk and the
 * operator's admin channel.
 */

export * from './address.ts';
export * from './admin.ts';
export * from './buckets.ts';
export * from './budget.ts';
export * from './claims.ts';
export * from './connection.ts';
export * from './engine.ts';
export * from './fleet.ts';
export * from './keyfiles.ts';
export * from './logger.ts';
export * from './metrics-http.ts';
export * from './pipeline.ts';
export * from './pipelines/ocr.ts';
export * from './pipelines/wakeword.ts';
export * from './quantiles.ts';
export * from './random.ts';
export * from './receive.ts';
export * from './signal.ts';
export * from './stats.ts';
export * from './tls.ts';
export * from './transport.ts';
