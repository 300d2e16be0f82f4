/** The wire contract of the mesh (docs/protocol.md): pure, no sockets, no RPC, no timers. */

export * from './deployment.ts';
export * from './envelope.ts';
export * from './errors.ts';
export * from './http-token.ts';
export * from './identity.ts';
export * from './keccak.ts';
export * from './messages.ts';
export * from './receipts.ts';
export * from './tensor.ts';
export * from './topics.ts';
export * from './validate.ts';
export * from './validators.generated.ts';
export * from './voucher.ts';
