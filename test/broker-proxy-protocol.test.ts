/**
 * The PROXY protocol on the broker's listener (docs/operations.md, "Behind a load balancer"): every client reaches
 * the broker from the balancer's address, and the header tells which client it is. Limits and bans must then fall on
 * that client, not on the balancer's address (issue 14: one device with a stale key must not get the fleet banned),
 * and a connection that does not open with a valid header, which could come only from something that bypassed the
 * balancer, must be closed without disturbing anyone else.
 */
import assert from 'node:assert/strict';
import test from 'node:test';
import { generateIdentity, makeConnectToken } from '@edge-mesh/protocol';
import {
  Command,
  INETProtocol,
  IPv4Address,
  IPv4ProxyAddress,
  IPv6Address,
  IPv6ProxyAddress,
  Peer,
  TransportProtocol,
  V1ProxyProtocol,
  V2ProxyProtocol,
} from 'proxy-protocol-js';
import { frameProxyHeader, sourceOfProxyHeader } from '../broker/src/proxy-protocol.ts';
import { admitted, authBrokerFor, cleanup, connectPacket, rawSocket } from './broker-fixtures.ts';

const authBroker = authBrokerFor('proxy-');

const v1 = (source: string, family: 'TCP4' | 'TCP6' = 'TCP4'): Buffer =>
  Buffer.from(
    new V1ProxyProtocol(INETProtocol[family], new Peer(source, 40000), new Peer(family === 'TCP4' ? '10.9.9.9' : '::1', 1883)).build(),
    'latin1',
  );

const v2 = (source: number[], command = Command.PROXY): Buffer =>
  Buffer.from(
    new V2ProxyProtocol(
      command,
      TransportProtocol.STREAM,
      new IPv4ProxyAddress(IPv4Address.createFrom(source), 40000, IPv4Address.createFrom([10, 9, 9, 9]), 1883),
    ).build(),
  );

test('headers are framed and read: v1, v2 over IPv4 and IPv6, LOCAL and UNKNOWN; anything else is refused', () => {
  const one = v1('203.0.113.7');
  assert.deepEqual(frameProxyHeader(one.subarray(0, 10)), { need: true });
  assert.deepEqual(frameProxyHeader(Buffer.concat([one, Buffer.from([0x10, 0x00])])), { length: one.length });
  assert.equal(sourceOfProxyHeader(one), '203.0.113.7');
  assert.equal(sourceOfProxyHeader(v1('2001:db8:0:0:0:0:0:7', 'TCP6')), '2001:db8::7', 'IPv6 written as Node writes it');
  assert.equal(sourceOfProxyHeader(Buffer.from('PROXY UNKNOWN\r\n')), undefined);

  const two = v2([198, 51, 100, 4]);
  assert.deepEqual(frameProxyHeader(two.subarray(0, 14)), { need: true });
  assert.deepEqual(frameProxyHeader(two), { length: two.length });
  assert.equal(sourceOfProxyHeader(two), '198.51.100.4');
  assert.equal(sourceOfProxyHeader(v2([198, 51, 100, 4], Command.LOCAL)), undefined, "a balancer's own health check");
  const six = Buffer.from(
    new V2ProxyProtocol(
      Command.PROXY,
      TransportProtocol.STREAM,
      new IPv6ProxyAddress(
        IPv6Address.createFrom([0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 9]),
        1,
        IPv6Address.createFrom(Array(16).fill(0)),
        2,
      ),
    ).build(),
  );
  assert.equal(sourceOfProxyHeader(six), '2001:db8::9');

  // A plain MQTT CONNECT, a truncated signature, an endless v1 line, an oversized v2 length, a bogus address.
  assert.ok('error' in frameProxyHeader(connectPacket({ clientId: 'x' })));
  assert.ok('error' in frameProxyHeader(Buffer.from([0x0d, 0x0a, 0x0d, 0x0a, 0x01])));
  assert.ok('error' in frameProxyHeader(Buffer.from(`PROXY TCP4 ${'1'.repeat(200)}`)));
  const huge = Buffer.from(two);
  huge.writeUInt16BE(60_000, 14);
  assert.ok('error' in frameProxyHeader(huge));
  assert.throws(() => sourceOfProxyHeader(Buffer.from('PROXY TCP4 evil.example 10.0.0.1 1 2\r\n')), /not an IP address/);
});

test('behind a PROXY-protocol balancer, limits fall on the client the header names, not on the balancer', {
  timeout: 30_000,
}, async (t) => {
  const defer = cleanup(t);
  const ab = await authBroker(defer, { proxyProtocol: true, connectBurstPerIp: 5, connectRatePerIp: 1 });
  const connack = async (header: Buffer, packet: Buffer): Promise<number | undefined> => {
    const raw = await rawSocket(defer, ab.b);
    raw.socket.write(Buffer.concat([header, packet]));
    const deadline = Date.now() + 3000;
    while (raw.bytes().length < 4 && !raw.isClosed() && Date.now() < deadline) await new Promise((r) => setTimeout(r, 5));
    const b = raw.bytes();
    return b.length >= 4 ? b[3] : undefined;
  };
  const stranger = () => {
    const who = generateIdentity('app');
    return connectPacket({ clientId: who.id, username: who.id, password: makeConnectToken(who) });
  };
  // One client (203.0.113.1) runs over its CONNECT rate; every socket comes from 127.0.0.1, the balancer.
  const noisy: (number | undefined)[] = [];
  for (let i = 0; i < 8; i++) noisy.push(await connack(v1('203.0.113.1'), stranger()));
  assert.deepEqual(noisy.slice(0, 5), Array(5).fill(5), 'checked and refused as not admitted');
  assert.deepEqual(noisy.slice(5), Array(3).fill(3), 'then over its rate');
  assert.ok(
    ab.logs.some((l) => l.reason === 'connect-rate' && l.remoteAddress === '203.0.113.1'),
    'logged under its own address',
  );
  // Another client behind the same balancer is not limited: its strangers are still checked (5, not 3) ...
  assert.equal(await connack(v2([203, 0, 113, 2]), stranger()), 5);
  // ... and an admitted app there gets in, header and CONNECT in one write.
  const app = await admitted(ab, 'app');
  assert.equal(
    await connack(v2([203, 0, 113, 2]), connectPacket({ clientId: app.id, username: app.id, password: makeConnectToken(app) })),
    0,
  );
});

test('a connection without a valid PROXY header is closed, and the broker keeps serving', { timeout: 30_000 }, async (t) => {
  const defer = cleanup(t);
  const ab = await authBroker(defer, { proxyProtocol: true, connectTimeoutMs: 1000 });
  const app = await admitted(ab, 'app');
  const connect = connectPacket({ clientId: app.id, username: app.id, password: makeConnectToken(app) });
  // Straight MQTT, as a client that bypassed the balancer would send it: it may not name its own address.
  const bare = await rawSocket(defer, ab.b);
  bare.socket.write(connect);
  await bare.closed;
  assert.equal(bare.bytes().length, 0, 'no CONNACK');
  // A header naming something that is not an address.
  const forged = await rawSocket(defer, ab.b);
  forged.socket.write(Buffer.concat([Buffer.from('PROXY TCP4 me 10.0.0.1 1 2\r\n'), connect]));
  await forged.closed;
  assert.equal(forged.bytes().length, 0);
  // Silence: closed after the handshake timeout.
  const silent = await rawSocket(defer, ab.b);
  const opened = Date.now();
  const closedAt = await silent.closed;
  assert.ok(closedAt - opened >= 900 && closedAt - opened < 5000, `closed after ${closedAt - opened} ms`);
  assert.ok(ab.logs.some((l) => l.reason === 'proxy-protocol' && l.code === 'MESH_BAD_REQUEST'));
  assert.ok(ab.logs.some((l) => l.reason === 'proxy-protocol' && l.code === 'MESH_TIMEOUT'));
  // A proper header and CONNECT in separate writes still get in.
  const ok = await rawSocket(defer, ab.b);
  ok.socket.write(v1('198.51.100.20'));
  await new Promise((r) => setTimeout(r, 50));
  ok.socket.write(connect);
  const deadline = Date.now() + 3000;
  while (ok.bytes().length < 4 && Date.now() < deadline) await new Promise((r) => setTimeout(r, 5));
  assert.equal(ok.bytes()[3], 0);
});
