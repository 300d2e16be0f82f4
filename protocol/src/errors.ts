/**
 * The one error registry of the mesh: every error a part raises on purpose is a MeshError with one of these codes,
 * whether it travels in an MQTT reply, an admin ack, an HTTP error body (docs/errors.md) or stays in the process.
 * The code is the machine identity of an error; the message is for people and may change. `retryable` says whether
 * the same request may succeed if sent again, elsewhere or later (another agent, after a back-off); `httpStatus` is
 * the status the router's HTTP API answers with.
 */
export const ERROR_CODES = {
  MESH_BAD_REQUEST: {
    httpStatus: 400,
    retryable: false,
    summary: 'a request, envelope, packet or argument could not be decoded or failed its schema or checks',
  },
  MESH_BAD_TENSOR: { httpStatus: 400, retryable: false, summary: 'a tensor has a bad dtype, shape, byte length or size' },
  MESH_BAD_INPUT: { httpStatus: 400, retryable: false, summary: 'inputs do not match the model (names, dtypes or shapes)' },
  MESH_TOO_LARGE: { httpStatus: 413, retryable: false, summary: 'a message or tensor exceeds the configured size cap' },
  MESH_UNKNOWN_MODEL: { httpStatus: 404, retryable: true, summary: 'no such model is served here (another agent may serve it)' },
  MESH_NOT_FOUND: { httpStatus: 404, retryable: false, summary: 'no such HTTP route, device or other named thing' },
  MESH_NO_AGENT: { httpStatus: 503, retryable: true, summary: 'no live agent serves the model' },
  MESH_BUSY: { httpStatus: 429, retryable: true, summary: "a queue is full: the agent's for the model, or a device's downlinks" },
  MESH_OVERLOADED: {
    httpStatus: 503,
    retryable: true,
    summary: 'refused at admission, before any work: the wait and service time would pass the deadline, or a concurrency limit is reached',
  },
  MESH_DEADLINE_EXCEEDED: { httpStatus: 504, retryable: false, summary: 'the request deadline passed before a result' },
  MESH_TIMEOUT: { httpStatus: 504, retryable: true, summary: 'an agent (or the bridge, for a device) did not answer in time' },
  MESH_AGENT_LOST: { httpStatus: 502, retryable: true, summary: 'the agent went offline while the request was outstanding' },
  MESH_CANCELLED: { httpStatus: 499, retryable: false, summary: 'the request was cancelled by its sender' },
  MESH_SHUTTING_DOWN: { httpStatus: 503, retryable: true, summary: 'the agent is draining and accepts no new work' },
  MESH_INFERENCE_FAILED: {
    httpStatus: 500,
    retryable: true,
    summary: 'the runtime failed while running the model (another agent may not)',
  },
  MESH_MODEL_INTEGRITY: { httpStatus: 500, retryable: false, summary: "a model file does not match its manifest's sha256" },
  MESH_UNAUTHORIZED: { httpStatus: 401, retryable: false, summary: 'identity, admission or signature check failed' },
  MESH_FORBIDDEN: { httpStatus: 403, retryable: false, summary: 'the identity may not do this (topic ACL, role)' },
  MESH_RATE_LIMITED: { httpStatus: 429, retryable: true, summary: 'a rate limit was exceeded' },
  MESH_CONFIG: {
    httpStatus: 500,
    retryable: false,
    summary: 'configuration is invalid or unusable (options, data folder, port, escrow address, read-only signer)',
  },
  MESH_NOT_CONNECTED: { httpStatus: 503, retryable: true, summary: 'the client is not connected to the broker' },
  MESH_TLS: {
    httpStatus: 502,
    retryable: false,
    summary: 'a TLS handshake failed: an untrusted or mismatched certificate, a plaintext peer, a client certificate refused',
  },
  MESH_RECEIPT_INVALID: {
    httpStatus: 400,
    retryable: false,
    summary: 'a usage receipt or price list failed a check (signature, sequence, chain, price rule, sum)',
  },
  MESH_VOUCHER_INVALID: { httpStatus: 400, retryable: false, summary: 'a payment voucher failed a check (signer, lane, amount)' },
  MESH_PAYMENT_REQUIRED: {
    httpStatus: 402,
    retryable: true,
    summary: 'the agent serves only paid requests, and this one named no lane it can bill (another agent may serve it)',
  },
  MESH_CREDIT_EXCEEDED: {
    httpStatus: 402,
    retryable: true,
    summary: "the payer's unpaid amount on this lane is at the agent's credit window; send a voucher",
  },
  MESH_CHAIN_UNREACHABLE: {
    httpStatus: 503,
    retryable: true,
    summary: "the EVM chain's JSON-RPC endpoint could not be reached, timed out or answered badly",
  },
  MESH_CHAIN_REVERTED: {
    httpStatus: 409,
    retryable: false,
    summary: 'the chain refused a transaction or call (a revert, a short balance, a nonce); details.reason holds why',
  },
  MESH_INTERNAL: { httpStatus: 500, retryable: false, summary: 'an unexpected internal error' },
} as const;

export type MeshErrorCode = keyof typeof ERROR_CODES;

export function isMeshErrorCode(code: unknown): code is MeshErrorCode {
  return typeof code === 'string' && Object.hasOwn(ERROR_CODES, code);
}

export interface MeshErrorOptions {
  cause?: unknown;
  /** Structured context (agent id, model, field); never secrets. */
  details?: Record<string, unknown>;
}

export class MeshError extends Error {
  override readonly name = 'MeshError';
  readonly code: MeshErrorCode;
  readonly details: Record<string, unknown> | undefined;

  constructor(code: MeshErrorCode, message: string, options: MeshErrorOptions = {}) {
    super(message, options.cause === undefined ? undefined : { cause: options.cause });
    this.code = code;
    this.details = options.details;
  }

  get httpStatus(): number {
    return ERROR_CODES[this.code].httpStatus;
  }

  get retryable(): boolean {
    return ERROR_CODES[this.code].retryable;
  }

  toJSON(): { code: MeshErrorCode; message: string; details?: Record<string, unknown> } {
    return this.details ? { code: this.code, message: this.message, details: this.details } : { code: this.code, message: this.message };
  }
}

/** Wraps anything thrown into a MeshError, keeping the original as the cause. */
export function toMeshError(err: unknown, fallback: MeshErrorCode = 'MESH_INTERNAL'): MeshError {
  if (err instanceof MeshError) return err;
  const message = err instanceof Error ? err.message : String(err);
  return new MeshError(fallback, message, { cause: err });
}
