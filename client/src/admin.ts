/**
 * `edge-mesh admit` and `edge-mesh revoke`: the operator signs a record locally and hands it to the
 * broker over MQTT, connected as itself: the CBOR SignedRecord goes to `mesh/v1/admin/{operator}/records`
 * and the broker answers `{ v: 1, kind: 'ack', id, ok, code?, message? }` on `mesh/v1/admin/{operator}/acks`.
 */

import {
  type AdminAck,
  checkAdminAck,
  decodeCbor,
  encodeCbor,
  type Identity,
  isMeshErrorCode,
  MeshError,
  type SignedRecord,
  topics,
} from '@edge-mesh/protocol';
import type { MqttClient } from 'mqtt';
import { type MeshConnectionOptions, openMeshConnection } from './connection.ts';

/** How the operator's connection reaches the broker: TLS files for `mqtts://`, a password for a broker that checks one. */
export type AdminBrokerAccess = Pick<MeshConnectionOptions, 'tls' | 'username' | 'password'>;

/**
 * Sends one signed record as `operator` and resolves with the broker's ack for `subjectId`. Rejects with
 * MESH_UNAUTHORIZED when the broker refuses the operator, MESH_TIMEOUT when no ack comes in time, and the
 * ack's own code when the broker refuses the record. `access` carries the TLS and password settings the broker
 * needs (a private CA, a client certificate, a shared password), as every other part's connection does.
 */
export async function sendAdminRecord(
  brokerUrl: string,
  operator: Identity,
  signed: SignedRecord,
  subjectId: string,
  timeoutMs: number,
  access: AdminBrokerAccess = {},
): Promise<AdminAck> {
  const recordsTopic = topics.adminRecords(operator.id);
  const acksTopic = topics.adminAcks(operator.id);
  const payload = encodeCbor(signed);
  let connected = false;
  let settle!: { resolve: (ack: AdminAck) => void; reject: (err: MeshError) => void };
  const result = new Promise<AdminAck>((resolve, reject) => (settle = { resolve, reject }));

  const connection = openMeshConnection(brokerUrl, {
    ...(access.tls ? { tls: access.tls } : {}),
    ...(access.username !== undefined ? { username: access.username } : {}),
    ...(access.password !== undefined ? { password: access.password } : {}),
    identity: operator,
    backoff: { baseMs: 100, maxMs: 1_000 },
    onConnect: (c: MqttClient) => {
      connected = true;
      c.subscribe(acksTopic, { qos: 1 }, (err, granted) => {
        // An error without a refusal is the connection closing under the subscription: the network, or another session
        // with the operator's id (a second admin command running at once) taking it over. The next connect subscribes
        // and sends the record again; the timeout bounds the retries.
        if (err) return;
        if (granted?.[0]?.qos === 128) {
          settle.reject(
            new MeshError(
              'MESH_FORBIDDEN',
              `the broker refused ${operator.id} a subscription to ${acksTopic}: does it manage admissions (started with --operator)?`,
            ),
          );
          return;
        }
        c.publish(recordsTopic, payload, { qos: 1 });
      });
    },
    onRefused: (err) => {
      if (err.code === 'MESH_UNAUTHORIZED') {
        settle.reject(
          new MeshError(
            'MESH_UNAUTHORIZED',
            `${err.message}; is ${operator.id} one of the broker's trusted operators (edge-mesh broker --operator)?`,
            { cause: err },
          ),
        );
      } else settle.reject(err);
    },
  });
  connection.client.on('message', (topic, message) => {
    if (topic !== acksTopic) return;
    let ack: unknown;
    try {
      ack = decodeCbor(message);
    } catch {
      return;
    }
    // '' is the broker's id for a record it could not read at all.
    if (checkAdminAck.Check(ack) && (ack.id === subjectId || ack.id === '')) settle.resolve(ack);
  });
  const timer = setTimeout(() => {
    settle.reject(
      connected
        ? new MeshError(
            'MESH_TIMEOUT',
            `no acknowledgement from the broker at ${brokerUrl} within ${timeoutMs} ms: an open (--insecure) broker does not manage admissions`,
          )
        : new MeshError('MESH_NOT_CONNECTED', `could not connect to the broker at ${brokerUrl} within ${timeoutMs} ms`),
    );
  }, timeoutMs);
  try {
    const ack = await result;
    if (!ack.ok) {
      const code = isMeshErrorCode(ack.code) ? ack.code : 'MESH_UNAUTHORIZED';
      throw new MeshError(code, `the broker refused the record for ${subjectId}: ${ack.message ?? ack.code ?? 'no reason given'}`, {
        details: { id: subjectId },
      });
    }
    return ack;
  } finally {
    clearTimeout(timer);
    await connection.close();
  }
}
