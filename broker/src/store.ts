/**
 * Admissions and revocations, kept in `level` under the broker's data folder and mirrored in memory.
 *
 * Each value is the operator-signed record itself (CBOR `{record, sig}`), so at start every stored record is checked
 * again against the operators trusted *now*: removing an operator from the configuration withdraws its admissions.
 * Keys: `adm!{id}` and `rev!{id}`; only the newest record of each kind per id is kept (by issuedAt / revokedAt), and a
 * record that would change nothing (an admission older than the id's revocation, a revocation older than its
 * admission) is refused with MESH_BAD_REQUEST so the operator learns of it.
 * A write is synced to disk before the in-memory state changes and before the caller hears back.
 *
 * An id is admitted when it has an admission that has not expired, whose role is the id's role, and that was issued
 * after the id's newest revocation (so a re-admission re-enables a revoked id, a replayed old admission does not).
 * The trusted operators are admitted implicitly with role operator; revocations do not apply to them (remove them
 * from the configuration instead).
 */

import {
  type Admission,
  decodeCbor,
  encodeMessage,
  MeshError,
  type Revocation,
  roleOfId,
  type SignedRecord,
  verifyRecord,
} from '@edge-mesh/protocol';
import { Level } from 'level';
import type { Logger } from 'pino';

const ADMISSION = 'adm!';
const REVOCATION = 'rev!';

/** What authentication needs to know about an id: its key and until when it holds. */
export interface Grant {
  publicKey: Uint8Array;
  role: Admission['role'];
  expires: number;
}

export type LookupRefusal = 'not-admitted' | 'revoked' | 'admission-expired' | 'role-mismatch';

export class AdmissionStore {
  private readonly admitted = new Map<string, Admission>();
  private readonly revoked = new Map<string, Revocation>();
  /** The newest revocation per id as its operator signed it, for the broker to republish. */
  private readonly revokedSigned = new Map<string, SignedRecord>();
  private readonly operators = new Map<string, Grant>();
  /** Writes are serialized so two records for one id cannot interleave between check and put. */
  private queue: Promise<unknown> = Promise.resolve();
  private closed = false;

  private constructor(
    private readonly db: Level<string, Uint8Array>,
    private readonly trusted: ReadonlyMap<string, Uint8Array>,
  ) {
    for (const [id, publicKey] of trusted) this.operators.set(id, { publicKey, role: 'operator', expires: Infinity });
  }

  /** Opens (creating) the database and loads every record that still verifies. Throws MESH_CONFIG if it cannot. */
  static async open(dataDir: string, trusted: ReadonlyMap<string, Uint8Array>, log: Logger): Promise<AdmissionStore> {
    const db = new Level<string, Uint8Array>(dataDir, { keyEncoding: 'utf8', valueEncoding: 'view' });
    try {
      await db.open();
    } catch (err) {
      throw new MeshError('MESH_CONFIG', `cannot open the admission store in ${dataDir}: ${(err as Error).message}`, { cause: err });
    }
    const store = new AdmissionStore(db, trusted);
    let skipped = 0;
    for await (const [key, value] of db.iterator()) {
      let record: Admission | Revocation;
      try {
        // Expiry is judged at lookup, so load with nowMs 0 to keep expired admissions readable.
        record = verifyRecord(decodeCbor(value), trusted, 0);
      } catch (err) {
        skipped++;
        log.warn({ key, reason: (err as Error).message }, 'stored record ignored');
        continue;
      }
      if (record.kind === 'admission' && key === ADMISSION + record.id) store.admitted.set(record.id, record);
      else if (record.kind === 'revocation' && key === REVOCATION + record.id) {
        store.revoked.set(record.id, record);
        store.revokedSigned.set(record.id, decodeCbor(value) as SignedRecord);
      } else skipped++;
    }
    log.info({ admissions: store.admitted.size, revocations: store.revoked.size, skipped }, 'admission store loaded');
    return store;
  }

  /** The key and expiry an id may connect with, or why it may not. */
  lookup(id: string, nowMs: number): Grant | LookupRefusal {
    const op = this.operators.get(id);
    if (op) return op;
    const adm = this.admitted.get(id);
    if (!adm) return 'not-admitted';
    const rev = this.revoked.get(id);
    if (rev && rev.revokedAt >= adm.issuedAt) return 'revoked';
    if (adm.expires <= nowMs) return 'admission-expired';
    if (roleOfId(id) !== adm.role) return 'role-mismatch';
    return { publicKey: adm.publicKey, role: adm.role, expires: adm.expires };
  }

  isAdmitted(id: string, nowMs: number): boolean {
    return typeof this.lookup(id, nowMs) !== 'string';
  }

  /** Admissions in force now (not revoked, not expired), oldest id first. */
  admissions(nowMs = Date.now()): Admission[] {
    return [...this.admitted.values()].filter((a) => this.isAdmitted(a.id, nowMs));
  }

  /** The newest revocation stored per id. */
  revocations(): Revocation[] {
    return [...this.revoked.values()];
  }

  /** The same, as the records their operators signed. */
  signedRevocations(): { id: string; signed: SignedRecord }[] {
    return [...this.revokedSigned].map(([id, signed]) => ({ id, signed }));
  }

  /** Verifies, persists (synced) and applies an admission. Throws MESH_UNAUTHORIZED for a record that does not verify. */
  admit(signed: SignedRecord, nowMs = Date.now()): Promise<Admission> {
    return this.serial(async () => {
      const record = verifyRecord(signed, this.trusted, nowMs);
      if (record.kind !== 'admission') throw new MeshError('MESH_BAD_REQUEST', `expected an admission, got a ${record.kind}`);
      const current = this.admitted.get(record.id);
      if (current && current.issuedAt > record.issuedAt) {
        throw new MeshError('MESH_BAD_REQUEST', `a newer admission of ${record.id} (issued ${current.issuedAt}) is already stored`);
      }
      const revocation = this.revoked.get(record.id);
      if (revocation && revocation.revokedAt >= record.issuedAt) {
        throw new MeshError(
          'MESH_BAD_REQUEST',
          `${record.id} was revoked at ${revocation.revokedAt}, after this admission was issued: sign a new one`,
        );
      }
      await this.db.put(ADMISSION + record.id, encodeRecord(signed), { sync: true });
      this.admitted.set(record.id, record);
      return record;
    });
  }

  /** Verifies, persists (synced) and applies a revocation. Throws MESH_UNAUTHORIZED for a record that does not verify. */
  revoke(signed: SignedRecord, nowMs = Date.now()): Promise<Revocation> {
    return this.serial(async () => {
      const record = verifyRecord(signed, this.trusted, nowMs);
      if (record.kind !== 'revocation') throw new MeshError('MESH_BAD_REQUEST', `expected a revocation, got an ${record.kind}`);
      if (this.trusted.has(record.id)) {
        throw new MeshError(
          'MESH_BAD_REQUEST',
          `${record.id} is a trusted operator of this broker: remove it from the configuration instead`,
        );
      }
      const admission = this.admitted.get(record.id);
      if (admission && admission.issuedAt > record.revokedAt) {
        throw new MeshError(
          'MESH_BAD_REQUEST',
          `${record.id} was admitted at ${admission.issuedAt}, after this revocation was signed: sign a new one`,
        );
      }
      const current = this.revoked.get(record.id);
      if (current && current.revokedAt >= record.revokedAt) return current;
      await this.db.put(REVOCATION + record.id, encodeRecord(signed), { sync: true });
      this.revoked.set(record.id, record);
      this.revokedSigned.set(record.id, { record: signed.record, sig: signed.sig });
      return record;
    });
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    await this.queue.catch(() => {});
    await this.db.close();
  }

  private serial<T>(fn: () => Promise<T>): Promise<T> {
    if (this.closed) return Promise.reject(new MeshError('MESH_SHUTTING_DOWN', 'the admission store is closed'));
    const run = this.queue.then(fn, fn);
    this.queue = run.catch(() => {});
    return run;
  }
}

function encodeRecord(signed: SignedRecord): Buffer {
  // Only the two fields, whatever else the caller's object carries.
  return encodeMessage({ record: signed.record, sig: signed.sig } as never);
}
