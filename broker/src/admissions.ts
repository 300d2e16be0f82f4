/**
 * Admissions at run time: storing operator-signed admissions and revocations (./store.ts), applying admin records
 * sent over MQTT (./admin.ts), and cutting clients off when their id is revoked or their admission runs out.
 */
import { type Admission, encodeMessage, MeshError, type Revocation, type SignedRecord, topics } from '@edge-mesh/protocol';
import type { Aedes, Client } from 'aedes';
import type { Logger } from 'pino';
import type { MeshSession } from './acl.ts';
import { applyAdminRecord } from './admin.ts';
import { liveClient } from './aedes-adapter.ts';
import { stillAdmitted } from './handlers/connect.ts';
import type { AdmissionStore } from './store.ts';

/** setTimeout's ceiling (~24.8 days). */
const MAX_TIMER_MS = 2 ** 31 - 1;

export interface AdmissionControl {
  /** Rejects with MESH_CONFIG in open mode. */
  admit(signed: SignedRecord): Promise<Admission>;
  /** Same; a live client with the revoked id is disconnected at once. */
  revoke(signed: SignedRecord): Promise<Revocation>;
  /** Applies an operator's admin record and publishes the ack on its acks topic. */
  applyRecord(session: MeshSession, payload: Buffer): Promise<void>;
}

/** Wires admission checks into `aedes`' client events; `closing` tells when acks must no longer be published. */
export function admissionControl(aedes: Aedes, store: AdmissionStore | undefined, log: Logger, closing: () => boolean): AdmissionControl {
  function requireStore(): AdmissionStore {
    if (!store) throw new MeshError('MESH_CONFIG', 'this broker runs in open mode: start it with auth to manage admissions');
    return store;
  }

  async function admit(signed: SignedRecord): Promise<Admission> {
    const admission = await requireStore().admit(signed);
    log.info({ id: admission.id, role: admission.role, expires: admission.expires, operator: admission.operator }, 'admission stored');
    // A live client with this id now holds the new admission: it ends when that one does, sooner or later than the one
    // it connected with.
    const live = liveClient(aedes, admission.id);
    if (live) watchExpiry(live);
    return admission;
  }

  /** Republishes a stored revocation, retained, for routers to refuse the id's tokens (they check its signature). */
  function announce(signed: SignedRecord, id: string): void {
    if (closing()) return;
    aedes.publish(
      {
        cmd: 'publish',
        topic: topics.revocation(id),
        payload: encodeMessage({ record: signed.record, sig: signed.sig } as never),
        qos: 1,
        retain: true,
        dup: false,
      },
      (err) => {
        if (err) log.warn({ id, err: err.message }, 'revocation not republished');
      },
    );
  }
  // After a restart the retained copies are gone with aedes' in-memory store: publish the stored ones again.
  for (const { id, signed } of store?.signedRevocations() ?? []) announce(signed, id);

  async function revoke(signed: SignedRecord): Promise<Revocation> {
    const s = requireStore();
    const revocation = await s.revoke(signed);
    log.info({ id: revocation.id, revokedAt: revocation.revokedAt, operator: revocation.operator }, 'revocation stored');
    announce(signed, revocation.id);
    const live = liveClient(aedes, revocation.id);
    if (live && !stillAdmitted(s, revocation.id, Date.now())) {
      log.warn({ clientId: revocation.id, reason: 'revoked' }, 'client disconnected');
      live.close();
    }
    return revocation;
  }

  async function applyRecord(session: MeshSession, payload: Buffer): Promise<void> {
    const ack = await applyAdminRecord(payload, { admit, revoke });
    if (!ack.ok) log.warn({ clientId: session.id, id: ack.id, reason: ack.code, err: ack.message }, 'admin record refused');
    if (closing()) return;
    aedes.publish(
      { cmd: 'publish', topic: session.adminAcks, payload: encodeMessage(ack as never), qos: 1, retain: false, dup: false },
      (err) => {
        if (err) log.warn({ clientId: session.id, err: err.message }, 'admin ack not published');
      },
    );
  }

  /**
   * Cuts `client` off when the admission in force for its id ends, and at once when none is: the store is asked each
   * time, not the expiry the client connected with, so a re-admission (shorter or longer) moves the cut-off and a
   * revocation that landed while the client was between authenticate and registration is seen.
   */
  const expiryTimers = new WeakMap<Client, NodeJS.Timeout>();
  function watchExpiry(client: Client): void {
    clearTimeout(expiryTimers.get(client));
    expiryTimers.delete(client);
    const now = Date.now();
    const grant = store?.lookup(client.id, now);
    if (typeof grant === 'string') {
      log.warn({ clientId: client.id, reason: grant }, 'client disconnected');
      client.close();
      return;
    }
    // Open mode (no store) and trusted operators never expire.
    const expires = grant?.expires ?? Infinity;
    if (expires === Infinity) return;
    // Re-armed in steps below setTimeout's ceiling for admissions that end months away.
    const timer = setTimeout(() => watchExpiry(client), Math.min(expires - now, MAX_TIMER_MS));
    timer.unref();
    expiryTimers.set(client, timer);
  }
  aedes.on('client', (client) => {
    log.debug({ clientId: client.id }, 'client connected');
    watchExpiry(client);
  });
  aedes.on('clientDisconnect', (client) => {
    log.debug({ clientId: client.id }, 'client disconnected');
    clearTimeout(expiryTimers.get(client));
  });

  return { admit, revoke, applyRecord };
}
