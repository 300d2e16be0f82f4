/**
 * Admissions at run time: storing operator-signed admissions and revocations (./store.ts), applying admin records
 * sent over MQTT (./admin.ts), and cutting clients off when their id is revoked or their admission runs out.
 */
import { type Admission, encodeMessage, MeshError, type Revocation, type SignedRecord, topics } from '@edge-mesh/protocol';
import type { Aedes, Client } from 'aedes';
import type { Logger } from 'pino';
import type { MeshSession } from './acl.ts';
import { applyAdminRecord } from './admin.ts';
import { liveClient, sessionOf } from './aedes-adapter.ts';
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

  /** Cuts a client off when its admission expires. */
  const expiryTimers = new WeakMap<Client, NodeJS.Timeout>();
  aedes.on('client', (client) => {
    log.debug({ clientId: client.id }, 'client connected');
    // A revocation that landed while this client was between authenticate and registration.
    if (!stillAdmitted(store, client.id, Date.now())) {
      log.warn({ clientId: client.id, reason: 'revoked' }, 'client disconnected');
      client.close();
      return;
    }
    const expires = sessionOf(client)?.expires ?? Infinity;
    if (expires === Infinity) return;
    const arm = (): void => {
      const inMs = expires - Date.now();
      if (inMs <= 0) {
        log.warn({ clientId: client.id, reason: 'admission-expired' }, 'client disconnected');
        client.close();
        return;
      }
      // Re-armed in steps below setTimeout's ceiling for admissions that end months away.
      const timer = setTimeout(arm, Math.min(inMs, MAX_TIMER_MS));
      timer.unref();
      expiryTimers.set(client, timer);
    };
    arm();
  });
  aedes.on('clientDisconnect', (client) => {
    log.debug({ clientId: client.id }, 'client disconnected');
    clearTimeout(expiryTimers.get(client));
  });

  return { admit, revoke, applyRecord };
}
