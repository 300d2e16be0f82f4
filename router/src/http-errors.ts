/**
 * The one shape of every HTTP error body the router answers (docs/errors.md):
 *
 *   { "error": "<message for people>", "code": "MESH_…", "details": { … } }
 *
 * `error` is what the Open Inference Protocol (KServe v2) asks of an error body, so KServe clients read it as they
 * are; `code` is the registry code (protocol/errors.ts), whose `httpStatus` is the response status; `details` is
 * there when the error has structured context (the failing schema paths, a size limit, a chain's revert reason).
 * One fastify error handler and one not-found handler produce it, whatever failed: a route, fastify's body parser or
 * schema validation, or an unknown route.
 */
import { MeshError, type MeshErrorCode, toMeshError } from '@edge-mesh/protocol';
import type { FastifyError, FastifyInstance, FastifyReply, FastifyRequest } from 'fastify';

export interface HttpErrorBody {
  error: string;
  code: MeshErrorCode;
  details?: Record<string, unknown>;
}

/** JSON schema of the error body, for response schemas and the OpenAPI description. */
export const ERROR_BODY_SCHEMA = {
  type: 'object',
  required: ['error', 'code'],
  properties: {
    error: { type: 'string', description: 'what went wrong, for people (the KServe v2 error field)' },
    code: { type: 'string', pattern: '^MESH_[A-Z_]+$', description: 'the error code (docs/errors.md); the HTTP status follows from it' },
    details: { type: 'object', additionalProperties: true, description: 'structured context, when there is some' },
  },
} as const;

/** A response schema entry for an error status, with the codes that answer it. */
export function errorResponse(description: string): typeof ERROR_BODY_SCHEMA & { description: string } {
  return { ...ERROR_BODY_SCHEMA, description };
}

/**
 * Error responses every route documents besides its specific ones: any MESH_* code in the 4xx and 5xx range, with
 * its status. (Ranges, not `default`: fastify would serialize a success through a `default` schema too.)
 */
export const ANY_ERROR = {
  '4xx': errorResponse('a MESH_* code with a 4xx status (docs/errors.md)'),
  '5xx': errorResponse('a MESH_* code with a 5xx status (docs/errors.md)'),
};

/**
 * The body limit of the small JSON routes (the console's join, admit and revoke, the repository index), in place of
 * the router-wide one sized for infer bodies. The join route is open to anyone, so without it a caller with no
 * credential could have the router buffer and parse tens of megabytes, stalling forwarding meanwhile. The largest
 * legitimate body is a join request: role, public key and name, 144 characters at most by its schema, under 2 KiB
 * even with every character escaped as a JSON surrogate pair; 16 KiB leaves ample room for whitespace and extra
 * fields, and costs nothing to buffer.
 */
export const SMALL_BODY_LIMIT = 16 * 1024;

/** At most this many schema violations are listed in details. */
const MAX_VIOLATIONS = 10;

/** What fastify or a route threw, as a MeshError (a MeshError passes unchanged; anything else keeps it as the cause). */
export function httpMeshError(err: unknown, bodyLimit: number): MeshError {
  if (err instanceof MeshError) return err;
  const e = err as Partial<FastifyError> & { validation?: { instancePath?: string; keyword?: string; message?: string }[] };
  const message = e.message ?? String(err);
  if (Array.isArray(e.validation)) {
    return new MeshError('MESH_BAD_REQUEST', message, {
      cause: err,
      details: {
        in: e.validationContext,
        violations: e.validation
          .slice(0, MAX_VIOLATIONS)
          .map((v) => ({ path: v.instancePath ?? '', keyword: v.keyword, message: v.message })),
      },
    });
  }
  if (e.statusCode === 413) return new MeshError('MESH_TOO_LARGE', message, { cause: err, details: { limitBytes: bodyLimit } });
  if (e.statusCode !== undefined && e.statusCode >= 400 && e.statusCode < 500) {
    // Bad or empty JSON, an unsupported content type: the body could not be read.
    return new MeshError('MESH_BAD_REQUEST', message, { cause: err, details: e.code ? { reason: e.code } : undefined });
  }
  return toMeshError(err);
}

/** The error body for `err`; details that JSON cannot hold as they are (bigints) become strings. */
export function httpErrorBody(err: MeshError): HttpErrorBody {
  if (!err.details) return { error: err.message, code: err.code };
  const details = JSON.parse(JSON.stringify(err.details, (_k, v: unknown) => (typeof v === 'bigint' ? v.toString() : v))) as Record<
    string,
    unknown
  >;
  return { error: err.message, code: err.code, details };
}

export function sendError(reply: FastifyReply, err: MeshError): FastifyReply {
  return reply.code(err.httpStatus).send(httpErrorBody(err));
}

/**
 * Installs the error and not-found handlers on `app`; `onError` sees every error answered (for metrics). Call it
 * before the routes are registered so that every route (and plugin scope) inherits them.
 */
export function installErrorHandlers(
  app: FastifyInstance,
  { bodyLimit, onError }: { bodyLimit: number; onError?: (err: MeshError, request: FastifyRequest) => void },
): void {
  app.setErrorHandler((err, request, reply) => {
    // A route with its own limit (SMALL_BODY_LIMIT) reports that one in details.limitBytes.
    const mesh = httpMeshError(err, request.routeOptions.bodyLimit ?? bodyLimit);
    onError?.(mesh, request);
    return sendError(reply, mesh);
  });
  app.setNotFoundHandler((request, reply) => {
    const url = request.url.length > 256 ? `${request.url.slice(0, 256)}…` : request.url;
    return sendError(
      reply,
      new MeshError('MESH_NOT_FOUND', `no route ${request.method} ${url}`, { details: { method: request.method, url } }),
    );
  });
}
