/** The firmware bridge: microcontrollers reach the mesh over UDP and serial (docs/firmware-protocol.md). */
export * from './bridge.ts';
export * from './cbor.ts';
export * from './device.ts';
export * from './frame.ts';
export * from './link.ts';
export * from './messages.ts';
export * from './registry.ts';
export * from './replay.ts';
export * from './serial.ts';
export * from './udp.ts';
