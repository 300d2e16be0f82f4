/**
 * The mesh over TLS (issue 14, acceptance 1): an authenticated broker on mqtts, an agent, a router whose HTTP API is
 * on HTTPS, and an SDK client, all with certificates this test makes with openssl (nothing committed). A plaintext
 * client, a client that trusts another CA and a client without the certificate mutual TLS asks for are refused with
 * a coded error well within their deadline, and the broker keeps serving.
 */
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { readFile, writeFile } from 'node:fs/promises';
import https from 'node:https';
import net from 'node:net';
import path from 'node:path';
import { type TestContext, test } from 'node:test';
import tls from 'node:tls';
import { promisify } from 'node:util';
import { startAgent } from '@edge-mesh/agent';
import { installedCommand, sampleInputs } from '@edge-mesh/demo';
import { admit, generateIdentity, MeshError } from '@edge-mesh/protocol';
import { makeApiKey, startRouter } from '@edge-mesh/router';
import { connect } from '@edge-mesh/sdk';
import pino from 'pino';
import { brokerFor, kwsOnlyDir, modelsDir, quiet, tcpRelay, tempDir, waitFor } from './helpers.ts';

const run = promisify(execFile);

const hasOpenssl = installedCommand('openssl') !== undefined;
const SKIP = hasOpenssl ? false : 'openssl is not installed: the TLS tests make their certificates with it';

interface Pki {
  ca: Buffer;
  otherCa: Buffer;
  serverCert: Buffer;
  serverKey: Buffer;
  clientCert: Buffer;
  clientKey: Buffer;
  strangerCert: Buffer;
  strangerKey: Buffer;
}

/** A CA, a server certificate for 127.0.0.1/localhost, a client certificate, and a second CA with its own client. */
async function makePki(t: TestContext): Promise<Pki> {
  const dir = await tempDir(t, 'edge-mesh-tls-');
  const f = (name: string) => path.join(dir, name);
  const ssl = (...args: string[]) => run('openssl', args, { cwd: dir });
  const newKey = ['-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256', '-nodes'];
  for (const name of ['ca', 'other-ca']) {
    await ssl('req', '-x509', ...newKey, '-days', '2', '-subj', `/CN=${name}`, '-keyout', f(`${name}.key`), '-out', f(`${name}.pem`));
  }
  const leaf = async (name: string, issuer: string, extensions: string) => {
    await writeFile(f(`${name}.ext`), extensions);
    await ssl('req', ...newKey, '-subj', `/CN=${name}`, '-keyout', f(`${name}.key`), '-out', f(`${name}.csr`));
    const signer = ['-CA', f(`${issuer}.pem`), '-CAkey', f(`${issuer}.key`), '-CAcreateserial'];
    await ssl('x509', '-req', '-in', f(`${name}.csr`), ...signer, '-days', '2', '-out', f(`${name}.pem`), '-extfile', f(`${name}.ext`));
  };
  await leaf('server', 'ca', 'subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n');
  await leaf('client', 'ca', 'extendedKeyUsage=clientAuth\n');
  await leaf('stranger', 'other-ca', 'extendedKeyUsage=clientAuth\n');
  const read = (name: string) => readFile(f(name));
  return {
    ca: await read('ca.pem'),
    otherCa: await read('other-ca.pem'),
    serverCert: await read('server.pem'),
    serverKey: await read('server.key'),
    clientCert: await read('client.pem'),
    clientKey: await read('client.key'),
    strangerCert: await read('stranger.pem'),
    strangerKey: await read('stranger.key'),
  };
}

const code = (expected: string) => (err: unknown) => {
  assert.ok(err instanceof MeshError, `a MeshError, got ${String(err)}`);
  assert.equal(err.code, expected, err.message);
  return true;
};

async function tlsBroker(t: TestContext, pki: Pki, requireClientCert = false) {
  const operator = generateIdentity('operator');
  const broker = await brokerFor(t, {
    auth: { trustedOperators: [{ id: operator.id, publicKey: operator.publicKey }], dataDir: await tempDir(t) },
    tls: { cert: pki.serverCert, key: pki.serverKey, ca: pki.ca, requireClientCert },
  });
  return { broker, operator };
}

test('the mesh serves over TLS: mqtts broker, agent, HTTPS router and SDK', { skip: SKIP, timeout: 120_000 }, async (t) => {
  const pki = await makePki(t);
  const { broker, operator } = await tlsBroker(t, pki);
  assert.match(broker.url, /^mqtts:\/\/127\.0\.0\.1:\d+$/);
  const [agentKey, routerKey, appKey] = [generateIdentity('agent'), generateIdentity('router'), generateIdentity('app')];
  for (const id of [agentKey, routerKey, appKey]) await broker.admit(admit(operator, id));
  const tls = { ca: pki.ca };

  const agent = await startAgent({
    brokerUrl: broker.url,
    modelsDir: await modelsDir(),
    workers: 1,
    logger: quiet,
    identity: agentKey,
    tls,
  });
  t.after(() => agent.close());
  const router = await startRouter({
    brokerUrl: broker.url,
    identity: routerKey,
    logger: quiet,
    tls,
    http: { port: 0, tls: { cert: pki.serverCert, key: pki.serverKey } },
  });
  t.after(() => router.close());
  const mesh = await connect({ brokerUrl: broker.url, identity: appKey, logger: quiet, tls });
  t.after(() => mesh.close());
  await mesh.waitForModel('kws', 20_000);
  const result = await mesh.infer('kws', sampleInputs('kws', 0), { deadlineMs: 10_000 });
  assert.equal(result.agentId, agent.id);
  assert.ok(Object.keys(result.outputs).length > 0);

  // The router's HTTP API is HTTPS, trusted through the test CA; its forwarding runs over the mqtts connection.
  assert.match(router.http!.url, /^https:\/\//);
  await router.waitForModel('kws', 20_000);
  const status = await new Promise<{ status: number; body: string }>((resolve, reject) => {
    const req = https.get(`${router.http!.url}/v2/health/ready`, { ca: pki.ca }, (res) => {
      let body = '';
      res.on('data', (c) => (body += c));
      res.on('end', () => resolve({ status: res.statusCode ?? 0, body }));
    });
    req.on('error', reject);
  });
  assert.equal(status.status, 200, status.body);
  // A client that does not trust the router's CA fails its handshake; it never reaches the API.
  await assert.rejects(
    new Promise((resolve, reject) => https.get(`${router.http!.url}/v2/health/live`, { ca: pki.otherCa }, resolve).on('error', reject)),
    (err: NodeJS.ErrnoException) => err.code === 'UNABLE_TO_VERIFY_LEAF_SIGNATURE',
  );
});

test('plaintext and wrong-CA clients are refused with a coded error within their deadline; the broker keeps serving', {
  skip: SKIP,
  timeout: 120_000,
}, async (t) => {
  const pki = await makePki(t);
  const { broker, operator } = await tlsBroker(t, pki);
  const appKey = generateIdentity('app');
  await broker.admit(admit(operator, appKey));
  const deadlineMs = 3_000;

  // The server's certificate is signed by a CA this client does not trust: MESH_TLS at once, not a reconnect loop.
  let started = Date.now();
  await assert.rejects(
    connect({ brokerUrl: broker.url, identity: appKey, logger: quiet, tls: { ca: pki.otherCa }, connectTimeoutMs: deadlineMs }),
    (err: unknown) => {
      code('MESH_TLS')(err);
      // Node names the failed verification: the broker sends its CA along, so the chain ends in a self-signed root.
      assert.ok(
        ['SELF_SIGNED_CERT_IN_CHAIN', 'UNABLE_TO_VERIFY_LEAF_SIGNATURE'].includes(String((err as MeshError).details?.reason)),
        (err as MeshError).message,
      );
      return true;
    },
  );
  assert.ok(Date.now() - started < deadlineMs, `refused in ${Date.now() - started} ms`);

  // No CA at all: Node's public CAs do not know the test CA either.
  await assert.rejects(connect({ brokerUrl: broker.url, identity: appKey, logger: quiet, connectTimeoutMs: deadlineMs }), code('MESH_TLS'));

  // Plaintext MQTT to the TLS port: the broker's TLS server drops it; the client gives up by its connect deadline.
  started = Date.now();
  const plain = broker.url.replace('mqtts://', 'mqtt://');
  await assert.rejects(connect({ brokerUrl: plain, identity: appKey, logger: quiet, connectTimeoutMs: deadlineMs }), (err: unknown) => {
    assert.ok(err instanceof MeshError);
    assert.ok(err.code === 'MESH_NOT_CONNECTED' || err.code === 'MESH_TLS', `${err.code}: ${err.message}`);
    return true;
  });
  assert.ok(Date.now() - started < deadlineMs + 1_500, `gave up in ${Date.now() - started} ms`);

  // TLS to the right CA works, on the same broker, after all that.
  const mesh = await connect({ brokerUrl: broker.url, identity: appKey, logger: quiet, tls: { ca: pki.ca }, connectTimeoutMs: 10_000 });
  await mesh.close();
});

test("the console admits through a broker with a private CA and mutual TLS, with the router's own TLS settings", {
  skip: SKIP,
  timeout: 60_000,
}, async (t) => {
  const pki = await makePki(t);
  const { broker, operator } = await tlsBroker(t, pki, true);
  const routerKey = generateIdentity('router');
  await broker.admit(admit(operator, routerKey));
  const tls = { ca: pki.ca, cert: pki.clientCert, key: pki.clientKey };
  const apiKey = makeApiKey('console', ['read', 'operator']);
  // The console's admin connection is given no TLS of its own: it takes the router's.
  const router = await startRouter({
    brokerUrl: broker.url,
    identity: routerKey,
    logger: quiet,
    tls,
    http: {
      port: 0,
      processMetrics: false,
      auth: { trustedOperators: [{ id: operator.id, publicKey: operator.publicKey }], apiKeys: [apiKey.entry] },
      console: { admin: { operator, brokerUrl: broker.url, timeoutMs: 10_000 } },
    },
  });
  t.after(() => router.close());
  const url = router.http!.url;
  const post = (p: string, body: unknown, auth = true) =>
    fetch(`${url}${p}`, {
      method: 'POST',
      headers: { 'content-type': 'application/json', ...(auth ? { authorization: `Bearer ${apiKey.key}` } : {}) },
      body: JSON.stringify(body),
    });

  // Before the admission the app is refused; after the console admits its join request, it connects.
  const app = generateIdentity('app');
  await assert.rejects(
    connect({ brokerUrl: broker.url, identity: app, logger: quiet, tls, connectTimeoutMs: 3_000 }),
    code('MESH_UNAUTHORIZED'),
  );
  const asked = await post(
    '/v1/admissions/requests',
    { role: 'app', public_key: Buffer.from(app.publicKey).toString('base64url'), name: 'cam' },
    false,
  );
  assert.equal(asked.status, 202, await asked.text());
  const admitted = await post('/v1/admissions/admit', { id: app.id });
  assert.equal(admitted.status, 200, await admitted.text());
  const mesh = await connect({ brokerUrl: broker.url, identity: app, logger: quiet, tls });
  await mesh.close();

  // Revoked from the console, the app is refused again.
  const revoked = await post('/v1/admissions/revoke', { id: app.id });
  assert.equal(revoked.status, 200, await revoked.text());
  await assert.rejects(
    connect({ brokerUrl: broker.url, identity: app, logger: quiet, tls, connectTimeoutMs: 3_000 }),
    code('MESH_UNAUTHORIZED'),
  );
});

/** An authenticated broker on mqtts with MQTT over WebSocket (wss) on a second port. */
async function wssBroker(t: TestContext, pki: Pki, extra: Parameters<typeof brokerFor>[1] = {}) {
  const operator = generateIdentity('operator');
  const broker = await brokerFor(t, {
    auth: { trustedOperators: [{ id: operator.id, publicKey: operator.publicKey }], dataDir: await tempDir(t) },
    tls: { cert: pki.serverCert, key: pki.serverKey },
    wsPort: 0,
    ...extra,
  });
  return { broker, operator };
}

test("mutual TLS: a client without a certificate from the broker's CA is refused at once", {
  skip: SKIP,
  timeout: 120_000,
}, async (t) => {
  const pki = await makePki(t);
  const { broker, operator } = await tlsBroker(t, pki, true);
  const appKey = generateIdentity('app');
  await broker.admit(admit(operator, appKey));
  const connectWith = (tls: Parameters<typeof connect>[0]['tls']) =>
    connect({ brokerUrl: broker.url, identity: appKey, logger: quiet, tls, connectTimeoutMs: 5_000 });

  // No certificate, or one another CA signed: the broker answers the CONNECT with CONNACK 5 and closes (Node checks
  // client certificates after the handshake, too late for a TLS alert), so the client fails at once, not by timeout.
  for (const tls of [{ ca: pki.ca }, { ca: pki.ca, cert: pki.strangerCert, key: pki.strangerKey }]) {
    const started = Date.now();
    await assert.rejects(connectWith(tls), code('MESH_UNAUTHORIZED'));
    assert.ok(Date.now() - started < 4_000, `refused in ${Date.now() - started} ms`);
  }
  const mesh = await connectWith({ ca: pki.ca, cert: pki.clientCert, key: pki.clientKey });
  await mesh.close();
});

test('MQTT over WebSocket with TLS (wss): the SDK is served; a client that does not trust the CA never connects', {
  skip: SKIP,
  timeout: 60_000,
}, async (t) => {
  const pki = await makePki(t);
  const { broker, operator } = await wssBroker(t, pki);
  assert.match(broker.wsUrl ?? '', /^wss:\/\/127\.0\.0\.1:\d+\/mqtt$/);
  const [agentKey, appKey] = [generateIdentity('agent'), generateIdentity('app')];
  for (const id of [agentKey, appKey]) await broker.admit(admit(operator, id));
  const agent = await startAgent({
    brokerUrl: broker.url,
    modelsDir: await modelsDir(),
    workers: 1,
    logger: quiet,
    identity: agentKey,
    tls: { ca: pki.ca },
  });
  t.after(() => agent.close());
  const mesh = await connect({ brokerUrl: broker.wsUrl!, identity: appKey, logger: quiet, tls: { ca: pki.ca } });
  t.after(() => mesh.close());
  await mesh.waitForModel('kws', 20_000);
  const result = await mesh.infer('kws', sampleInputs('kws', 0), { deadlineMs: 10_000 });
  assert.equal(result.agentId, agent.id);
  const started = Date.now();
  await assert.rejects(
    connect({ brokerUrl: broker.wsUrl!, identity: appKey, logger: quiet, tls: { ca: pki.otherCa }, connectTimeoutMs: 3_000 }),
    (err: unknown) => err instanceof MeshError && ['MESH_TLS', 'MESH_NOT_CONNECTED'].includes(err.code),
  );
  assert.ok(Date.now() - started < 4_000, 'within its connect deadline');
});

test('over TLS, where a read holds one or two wake-word requests, a burst that arrives together still runs stacked', {
  skip: SKIP,
  timeout: 120_000,
}, async (t) => {
  const pki = await makePki(t);
  const { broker, operator } = await tlsBroker(t, pki);
  const [agentKey, appKey] = [generateIdentity('agent'), generateIdentity('app')];
  for (const id of [agentKey, appKey]) await broker.admit(admit(operator, id));
  const relay = await tcpRelay(t, Number(new URL(broker.url).port), { scheme: 'mqtts' });
  const logged: string[] = [];
  const agent = await startAgent({
    brokerUrl: relay.url,
    modelsDir: await kwsOnlyDir(t),
    workers: 1,
    logger: pino({ level: 'info' }, { write: (line: string) => void logged.push(line) }),
    identity: agentKey,
    tls: { ca: pki.ca },
    // A generous bound, so that on a busy machine the wake-word model still runs inline.
    inlineMaxMs: 20,
  });
  t.after(() => agent.close());
  assert.ok(
    logged.some((l) => l.includes('model runs stacked when requests wait together')),
    `the wake-word model runs stacked: ${logged.join('')}`,
  );
  const mesh = await connect({ brokerUrl: broker.url, identity: appKey, logger: quiet, tls: { ca: pki.ca } });
  t.after(() => mesh.close());
  await mesh.waitForModel('kws', 20_000);
  const count = 32;
  const inputs = Array.from({ length: count }, (_, i) => sampleInputs('kws', i + 1));
  const inputBytes = Object.values(inputs[0]!).reduce((n, x) => n + x.data.byteLength, 0);

  // The burst reaches the agent's socket at once: held at the relay until every request has come and no more bytes do.
  const before = { ...agent.counters.stacked };
  relay.hold();
  const replies = Promise.all(inputs.map((x) => mesh.infer('kws', x, { deadlineMs: 30_000 })));
  let last = -1;
  let still = 0;
  await waitFor(
    () => {
      const now = relay.heldBytes();
      still = now === last ? still + 1 : 0;
      last = now;
      return now >= count * inputBytes && still >= 10;
    },
    20_000,
    'the burst at the relay',
  );
  relay.release();
  const results = await replies;
  const runs = agent.counters.stacked.runs - before.runs;
  const stacked = agent.counters.stacked.requests - before.requests;
  // A TLS read hands over at most 16 KiB, which completes at most two 9.6 KB requests; the runs are larger, on average,
  // than any one read could make them (edge-agent/src/inline.ts, "Flush order").
  assert.ok(runs > 0 && stacked / runs >= 3, `${stacked} of ${count} requests stacked in ${runs} runs`);
  assert.equal(agent.counters.stacked.fallbacks, before.fallbacks);

  // Each reply is its own request's: the same outputs as a request of that input alone gets, one at a time.
  for (const [i, x] of inputs.entries()) {
    const alone = await mesh.infer('kws', x, { deadlineMs: 10_000 });
    for (const [name, tensor] of Object.entries(alone.outputs)) {
      const got = results[i]!.outputs[name]!.data as Float32Array;
      const own = tensor.data as Float32Array;
      assert.equal(got.length, own.length);
      for (let k = 0; k < own.length; k++)
        assert.ok(Math.abs(got[k]! - own[k]!) <= 1e-5 * Math.max(1, Math.abs(own[k]!)), `request ${i} output ${name}[${k}]`);
    }
  }
});

test('sockets that never finish their TLS handshake or WebSocket upgrade count against their address: one address cannot fill the connection cap', {
  skip: SKIP,
  timeout: 60_000,
}, async (t) => {
  const pki = await makePki(t);
  // Each server refuses sockets past maxConnections before anything else runs: 40 handshakes that never finish, from
  // one address, would hold all 30 places for the handshake timeout, and no client could connect.
  const { broker, operator } = await wssBroker(t, pki, { maxConnections: 30, maxConnectionsPerIp: 5, connectTimeoutMs: 30_000 });
  const appKey = generateIdentity('app');
  await broker.admit(admit(operator, appKey));
  const wsPort = Number(new URL(broker.wsUrl!).port);
  const idle: net.Socket[] = [];
  t.after(() => {
    for (const s of idle) s.destroy();
  });
  const open = (port: number) =>
    new Promise<void>((resolve) => {
      const s = net.connect({ port, host: '127.0.0.1', localAddress: '127.0.0.2' });
      s.on('error', () => {});
      idle.push(s);
      s.once('connect', () => resolve());
      s.once('close', () => resolve());
    });
  for (let i = 0; i < 40; i++) await open(broker.port);
  for (let i = 0; i < 40; i++) await open(wsPort);
  await waitFor(() => idle.filter((s) => !s.destroyed && !s.closed).length <= 5, 5_000, 'the address held to its 5 pending sockets');
  // Clients from another address, and from the flooding one, still get in over mqtts and wss.
  for (const brokerUrl of [broker.url, broker.wsUrl!]) {
    const mesh = await connect({ brokerUrl, identity: appKey, logger: quiet, tls: { ca: pki.ca }, connectTimeoutMs: 5_000 });
    await mesh.close();
  }
  // A real TLS client from the flooding address finishes its handshake: its socket evicted the oldest idle one.
  const under = net.connect({ port: broker.port, host: '127.0.0.1', localAddress: '127.0.0.2' });
  under.on('error', () => {});
  const fromFlood = tls.connect({ socket: under, ca: pki.ca, servername: 'localhost' });
  fromFlood.on('error', () => {});
  t.after(() => fromFlood.destroy());
  await new Promise<void>((resolve, reject) => {
    fromFlood.once('secureConnect', () => resolve());
    fromFlood.once('close', () => reject(new Error('closed before its handshake finished')));
  });
});
