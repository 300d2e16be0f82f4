/**
 * Revocations for the router's credential check (./http-auth.ts, HTTP and gRPC). The broker republishes every
 * operator-signed revocation it stores, retained, on mesh/v1/revoked/{id}; the router keeps, per id, the newest one
 * whose signature a trusted operator made. A token is refused when its id was revoked at or after the admission it
 * carries was issued, so a re-admission signed later lets the key back in, as at the broker.
 *
 * The broker is not trusted here: a payload that does not decode, a record no trusted operator signed, one that is not
 * a revocation, or one naming another id than its topic is ignored and logged, so a broker cannot lock a client out
 * of the router with a record of its own making.
 */

import type { MeshLogger } from '@edge-mesh/client';
import { decodeCbor, MeshError, verifyRecord } from '@edge-mesh/protocol';

export class RevocationList {
  private readonly revokedAt = new Map<string, number>();

  constructor(
    private readonly trusted: ReadonlyMap<string, Uint8Array>,
    private readonly logger?: MeshLogger,
  ) {}

  /** A retained message on mesh/v1/revoked/{id}; returns whether it was taken. */
  onMessage(id: string, payload: Uint8Array): boolean {
    if (payload.byteLength === 0) return false;
    try {
      const record = verifyRecord(decodeCbor(payload), this.trusted, Date.now());
      if (record.kind !== 'revocation') throw new MeshError('MESH_BAD_REQUEST', `a ${record.kind}, not a revocation`);
      if (record.id !== id) throw new MeshError('MESH_BAD_REQUEST', `it revokes ${record.id}, not ${id}`);
      if ((this.revokedAt.get(id) ?? -Infinity) < record.revokedAt) this.revokedAt.set(id, record.revokedAt);
      this.logger?.info({ id, revokedAt: record.revokedAt, operator: record.operator }, 'revocation learned');
      return true;
    } catch (err) {
      this.logger?.warn({ id, code: (err as MeshError).code, err: (err as Error).message }, 'revocation ignored');
      return false;
    }
  }

  /** Whether `id`, admitted at `admissionIssuedMs`, has been revoked since. */
  isRevoked(id: string, admissionIssuedMs: number): boolean {
    const at = this.revokedAt.get(id);
    return at !== undefined && at >= admissionIssuedMs;
  }

  get size(): number {
    return this.revokedAt.size;
  }
}
