/** Constants the schemas (schemas.ts) and the runtime share; a leaf module, so neither imports the other. */

export const PROTOCOL_VERSION = 1;

export const ROLES = ['agent', 'app', 'router', 'operator', 'bridge'] as const;
export type Role = (typeof ROLES)[number];
