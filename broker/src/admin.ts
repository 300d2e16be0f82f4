/**
 * Admin over MQTT: an authenticated operator publishes a CBOR SignedRecord `{record, sig}` on
 * `topics.adminRecords(operatorId)`; the broker verifies and applies it (admission or revocation) and answers on
 * `topics.adminAcks(operatorId)` with an AdminAck (protocol/messages.ts). Records are applied by the broker, never
 * forwarded: nobody may subscribe to an admin records topic.
 *
 *   client.publish(topics.adminRecords(op.id), encodeAdminRecord(admit(op, subject)), { qos: 1 });
 *   // … on topics.adminAcks(op.id): decodeAdminAck(payload) → { v: 1, kind: 'ack', id, ok: true }
 */
import {
  type AdminAck,
  checkAdminAck,
  decodeCbor,
  encodeMessage,
  MeshError,
  PROTOCOL_VERSION,
  type SignedRecord,
  toMeshError,
} from '@edge-mesh/protocol';

/** A SignedRecord is at most 4096 + 64 bytes of content; anything much larger is refused before decoding. */
export const MAX_ADMIN_RECORD_BYTES = 8192;

/** The payload to publish on `topics.adminRecords(operatorId)`. */
export function encodeAdminRecord(signed: SignedRecord): Buffer {
  return encodeMessage({ record: signed.record, sig: signed.sig } as never);
}

/** Reads an ack from `topics.adminAcks(operatorId)`; throws MESH_BAD_REQUEST for anything else. */
export function decodeAdminAck(payload: Uint8Array): AdminAck {
  let value: unknown;
  try {
    value = decodeCbor(payload);
  } catch (cause) {
    throw new MeshError('MESH_BAD_REQUEST', 'admin ack is not valid CBOR', { cause });
  }
  if (!checkAdminAck.Check(value)) throw new MeshError('MESH_BAD_REQUEST', 'not an admin ack');
  return value;
}

export interface ParsedAdminRecord {
  signed: unknown;
  /** The record's subject id when it can be read ('' otherwise), for the ack. */
  id: string;
  kind: 'admission' | 'revocation' | undefined;
}

/** Decodes the outer CBOR and peeks at the (not yet verified) record for its id and kind. */
export function parseAdminRecord(payload: Uint8Array): ParsedAdminRecord {
  if (payload.byteLength > MAX_ADMIN_RECORD_BYTES) {
    throw new MeshError('MESH_TOO_LARGE', `admin record of ${payload.byteLength} bytes exceeds ${MAX_ADMIN_RECORD_BYTES}`);
  }
  let signed: unknown;
  try {
    signed = decodeCbor(payload);
  } catch (cause) {
    throw new MeshError('MESH_BAD_REQUEST', 'admin record is not valid CBOR', { cause });
  }
  let id = '';
  let kind: ParsedAdminRecord['kind'];
  const inner = (signed as { record?: unknown } | null)?.record;
  if (inner instanceof Uint8Array) {
    try {
      const r = decodeCbor(inner) as { id?: unknown; kind?: unknown } | null;
      if (typeof r?.id === 'string' && r.id.length <= 64) id = r.id;
      if (r?.kind === 'admission' || r?.kind === 'revocation') kind = r.kind;
    } catch {
      // verifyRecord reports it
    }
  }
  return { signed, id, kind };
}

export function ackOk(id: string): AdminAck {
  return { v: PROTOCOL_VERSION, kind: 'ack', id, ok: true };
}

export function ackError(id: string, err: unknown): AdminAck {
  const e = toMeshError(err);
  return { v: PROTOCOL_VERSION, kind: 'ack', id, ok: false, code: e.code, message: e.message.slice(0, 1024) };
}

/** What applying a record needs from the broker: its admit and revoke, which store, log and disconnect. */
export interface AdminRecordTarget {
  admit(signed: SignedRecord): Promise<unknown>;
  revoke(signed: SignedRecord): Promise<unknown>;
}

/**
 * Applies an operator's admin record (an admission or a revocation) and answers the ack to publish on the operator's
 * acks topic: ok, or the MeshError code and message that refused it.
 */
export async function applyAdminRecord(payload: Uint8Array, target: AdminRecordTarget): Promise<AdminAck> {
  let id = '';
  try {
    const parsed = parseAdminRecord(payload);
    id = parsed.id;
    const signed = parsed.signed as SignedRecord;
    if (parsed.kind === 'revocation') await target.revoke(signed);
    else await target.admit(signed); // verifyRecord refuses anything that is not a valid admission
    return ackOk(id);
  } catch (err) {
    return ackError(id, err);
  }
}
