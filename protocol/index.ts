export * from './errors.ts';
export * from './topics.ts';
export * from './tensor.ts';
export * from './messages.ts';
export * from './envelope.ts';
export * from './stats.ts';
export * from './transport.ts';
export * from './connection.ts';
