/**
 * The mesh on a real mosquitto 2.0 (issue 14; docs/operations.md, "Running on mosquitto"): `edge-mesh auth mosquitto`
 * writes the password file, ACL file and configuration from the admitted identities; a real mosquitto runs with
 * them; an agent (the CLI, `--username/--password-file`), a router and SDK clients connect with passwords and serve
 * inferences: direct, through the router's leases, and through the router's KServe HTTP API. Then the hostile cases: an admitted eavesdropper, a topic
 * squatter, a client id squatter, a wrong password, and a revocation applied by SIGHUP.
 *
 * Skips, saying why, when the `mosquitto` binary (Debian package `mosquitto`) is not installed.
 */
import assert from 'node:assert/strict';
import { type ChildProcess, execFile } from 'node:child_process';
import { readFile, stat, writeFile } from 'node:fs/promises';
import type net from 'node:net';
import path from 'node:path';
import { type TestContext, test } from 'node:test';
import { promisify } from 'node:util';
import { mosquittoPasswordHash, verifyMosquittoPassword } from '@edge-mesh/broker';
import { freePort, installedCommand, sampleInputs } from '@edge-mesh/demo';
import {
  admit,
  encodeMessage,
  generateIdentity,
  type Identity,
  MeshError,
  publicIdentity,
  revoke,
  tensorToJson,
  topics,
} from '@edge-mesh/protocol';
import { makeApiKey, startRouter } from '@edge-mesh/router';
import { connect } from '@edge-mesh/sdk';
import mqtt from 'mqtt';
import { MOSQUITTO, startMosquitto as startMosquittoServer } from './engines.ts';
import { brokerFor, quiet, ROOT, spawnAgent, tempDir, waitFor } from './helpers.ts';

const run = promisify(execFile);

const SKIP = MOSQUITTO
  ? false
  : 'mosquitto is not installed (Debian package `mosquitto`; .ci/run installs it): the mosquitto tests need it';
const SKIP_PASSWD = installedCommand('mosquitto_passwd') ? false : 'mosquitto_passwd is not installed (Debian package `mosquitto`)';

/** Runs `edge-mesh auth mosquitto` and returns its JSON line. */
async function authMosquitto(outDir: string, identityFiles: string[], port: number, extra: string[] = []) {
  const args = [path.join(ROOT, 'cli/bin/edge-mesh.mjs'), 'auth', 'mosquitto', '--out', outDir, '--port', String(port), ...extra];
  for (const f of identityFiles) args.push('--identity', f);
  const { stdout } = await run(process.execPath, args);
  return JSON.parse(stdout) as {
    conf: string;
    passwordFile: string;
    aclFile: string;
    identities: { id: string; role: string; passwordFile: string }[];
    removed: string[];
  };
}

/** Starts mosquitto with the generated configuration (test/engines.ts), stopped after the test. */
async function startMosquitto(t: TestContext, confFile: string, port: number): Promise<ChildProcess> {
  const server = await startMosquittoServer(confFile, port);
  t.after(() => server.stop());
  return server.child;
}

async function publicFile(dir: string, identity: Identity): Promise<string> {
  const file = path.join(dir, `${identity.id}.json`);
  await writeFile(file, JSON.stringify(publicIdentity(identity)));
  return file;
}

/** A bare mqtt.js client with a generated password, recording every message it receives. */
async function bareClient(
  t: TestContext,
  url: string,
  username: string,
  password: string,
  clientId = username,
  extra: mqtt.IClientOptions = {},
) {
  const client = mqtt.connect(url, {
    username,
    password,
    clientId,
    reconnectPeriod: 0,
    protocolVersion: 4,
    connectTimeout: 5_000,
    ...extra,
  });
  t.after(() => client.end(true));
  const received: { topic: string; payload: Buffer; retain: boolean }[] = [];
  client.on('message', (topic, payload, packet) => received.push({ topic, payload, retain: packet.retain }));
  await new Promise<void>((resolve, reject) => {
    client.once('connect', () => resolve());
    client.once('error', reject);
  });
  return { client, received };
}

const code = (expected: string) => (err: unknown) => {
  assert.ok(err instanceof MeshError, `a MeshError, got ${String(err)}`);
  assert.equal(err.code, expected, err.message);
  return true;
};

test("the password hashes are mosquitto_passwd's $7$ PBKDF2-SHA512 format", { skip: SKIP_PASSWD }, async (t) => {
  const dir = await tempDir(t, 'edge-mesh-mosq-');
  const file = path.join(dir, 'pw');
  await run('mosquitto_passwd', ['-c', '-b', file, 'agent-x', 'correct horse']);
  const entry = (await readFile(file, 'utf8')).trim().split(':')[1]!;
  assert.match(entry, /^\$7\$101\$/);
  assert.equal(verifyMosquittoPassword(entry, 'correct horse'), true);
  assert.equal(verifyMosquittoPassword(entry, 'correct horsf'), false);
  // The same salt gives the same entry: node:crypto computes what mosquitto_passwd wrote.
  const salt = Buffer.from(entry.split('$')[3]!, 'base64');
  assert.equal(mosquittoPasswordHash('correct horse', salt), entry);
  assert.equal(verifyMosquittoPassword('$6$abc$def', 'correct horse'), false);
});

test('the mesh serves on mosquitto with generated passwords and ACLs; eavesdroppers, squatters and wrong passwords get nothing', {
  skip: SKIP,
  timeout: 180_000,
}, async (t) => {
  const dir = await tempDir(t, 'edge-mesh-mosq-');
  const port = await freePort();
  const url = `mqtt://127.0.0.1:${port}`;
  const [agentKey, routerKey, appKey, spyKey, squatKey, watchKey] = [
    generateIdentity('agent'),
    generateIdentity('router'),
    generateIdentity('app'),
    generateIdentity('app'),
    generateIdentity('agent'),
    generateIdentity('app'),
  ];
  const everyone = [agentKey, routerKey, appKey, spyKey, squatKey, watchKey];
  const files = await Promise.all(everyone.map((k) => publicFile(dir, k)));
  const out = path.join(dir, 'mosquitto');
  const generated = await authMosquitto(out, files, port);
  assert.equal(generated.identities.length, everyone.length);
  const conf = await readFile(generated.conf, 'utf8');
  assert.match(conf, /^allow_anonymous false$/m);
  assert.match(conf, /^set_tcp_nodelay true$/m);
  assert.match(conf, /^use_username_as_clientid true$/m);
  const mosquitto = await startMosquitto(t, generated.conf, port);

  // What `--username ID --password-file FILE` gives each command.
  const secretOf = async (k: Identity) => {
    const entry = generated.identities.find((i) => i.id === k.id)!;
    assert.equal((await stat(entry.passwordFile)).mode & 0o777, 0o600, `${entry.passwordFile} is 0600`);
    return (await readFile(entry.passwordFile, 'utf8')).trim();
  };
  const creds = async (k: Identity) => ({ identity: k, username: k.id, password: await secretOf(k) });

  // The agent is the CLI (`edge-mesh agent --username ID --password-file FILE`), the router and SDK in-process.
  const agentPasswordFile = generated.identities.find((i) => i.id === agentKey.id)!.passwordFile;
  await secretOf(agentKey);
  await spawnAgent(t, url, agentKey, ['--username', agentKey.id, '--password-file', agentPasswordFile]);
  const agent = { id: agentKey.id };
  const apiKey = makeApiKey('mosq-test', ['infer']);
  const router = await startRouter({
    brokerUrl: url,
    logger: quiet,
    http: { port: 0, processMetrics: false, auth: { trustedOperators: [], apiKeys: [apiKey.entry] } },
    ...(await creds(routerKey)),
  });
  t.after(() => router.close());

  // The eavesdropper, an admitted app, asks for everything and for the app's replies before any request is sent.
  const spy = await bareClient(t, url, spyKey.id, await secretOf(spyKey));
  const granted = await spy.client.subscribeAsync(
    ['mesh/#', topics.clientRepliesFor(appKey.id), topics.agentRequestsFor(agentKey.id), '#'],
    {
      qos: 1,
    },
  );
  t.diagnostic(`eavesdropper SUBACK codes: ${granted.map((g) => g.qos).join(',')}`);

  // Direct: the SDK picks the agent from its retained status.
  const mesh = await connect({ brokerUrl: url, logger: quiet, ...(await creds(appKey)) });
  t.after(() => mesh.close());
  await mesh.waitForModel('kws', 30_000);
  const direct = await mesh.infer('kws', sampleInputs('kws', 0), { deadlineMs: 10_000 });
  assert.equal(direct.agentId, agent.id);
  assert.ok(Object.keys(direct.outputs).length > 0);

  // Through the router: its lease picks the agent (the same app id, a new connection after the first closed).
  await mesh.close();
  await router.waitForModel('kws', 30_000);
  const leased = await connect({ brokerUrl: url, logger: quiet, router: router.id, leaseTimeoutMs: 5_000, ...(await creds(appKey)) });
  t.after(() => leased.close());
  await leased.waitForModel('kws', 30_000);
  const viaLease = await leased.infer('kws', sampleInputs('kws', 1), { deadlineMs: 10_000 });
  assert.equal(viaLease.agentId, agent.id);
  assert.equal(viaLease.routedBy, router.id, 'the first attempt followed the router lease');

  // Through the router's own forwarding: a KServe request on its HTTP API, the router as the sender on mosquitto.
  const res = await fetch(`${router.http!.url}/v2/models/kws/infer`, {
    method: 'POST',
    headers: { authorization: `Bearer ${apiKey.key}`, 'content-type': 'application/json' },
    body: JSON.stringify({
      inputs: Object.entries(sampleInputs('kws', 3)).map(([name, tensor]) => {
        const json = tensorToJson(tensor);
        return { name, shape: json.shape, datatype: 'FP32', data: json.data };
      }),
    }),
  });
  const body = (await res.json()) as { outputs?: unknown[] };
  assert.equal(res.status, 200, JSON.stringify(body));
  assert.ok((body.outputs ?? []).length > 0);

  // The eavesdropper saw no request, reply or lease of anyone (statuses and load it may read, like any app).
  await new Promise((r) => setTimeout(r, 300));
  assert.ok(
    spy.received.some((m) => m.topic === topics.agentStatus(agent.id)),
    'the eavesdropper subscription is live (it gets what it may read)',
  );
  const stolen = spy.received.filter((m) => !/^mesh\/v1\/agent\/[a-z0-9-]+\/(status|load)$/.test(m.topic));
  assert.deepEqual(
    stolen.map((m) => m.topic),
    [],
  );

  // A squatter (an admitted agent) publishes a status, retained, under the real agent's topic, and a request in the
  // app's name. mosquitto drops both (it acks a refused QoS 1 publish and forwards nothing).
  const squat = await bareClient(t, url, squatKey.id, await secretOf(squatKey));
  const watch = await bareClient(t, url, watchKey.id, await secretOf(watchKey));
  let watchClosed = false;
  watch.client.on('close', () => (watchClosed = true));
  await watch.client.subscribeAsync(topics.allAgentStatus(), { qos: 1 });
  await waitFor(() => watch.received.some((m) => m.topic === topics.agentStatus(agent.id)), 5_000, 'the retained status');
  const before = watch.received.length;
  const fake = Buffer.from('forged status');
  await squat.client.publishAsync(topics.agentStatus(agent.id), fake, { qos: 1, retain: true });
  await squat.client.publishAsync(topics.agentRequest(agent.id, appKey.id), Buffer.from(encodeMessage({ v: 1 } as never)), { qos: 1 });
  const spyFake = await bareClient(t, url, spyKey.id, await secretOf(spyKey), 'anything');
  await spyFake.client.publishAsync(topics.agentStatus(agent.id), fake, { qos: 1, retain: true });
  await new Promise((r) => setTimeout(r, 300));
  assert.equal(watch.received.slice(before).filter((m) => m.payload.equals(fake)).length, 0, 'no forged status reached the watcher');
  // A newcomer gets the genuine retained status, not the squatter's.
  // (As the eavesdropper: with use_username_as_clientid a second connection as the watcher would replace the watcher.)
  const late = await bareClient(t, url, spyKey.id, await secretOf(spyKey), 'late');
  await late.client.subscribeAsync(topics.agentStatus(agent.id), { qos: 1 });
  await waitFor(() => late.received.length > 0, 5_000, 'the retained status for a newcomer');
  assert.ok(!late.received[0]!.payload.equals(fake));

  // Last wills: the squatter's own will (an agent's offline status on its own topic) is delivered when its
  // connection drops; a will it sets on the real agent's topic never reaches anyone (mosquitto checks wills against
  // the ACL; whether it then refuses the CONNECT or drops the will, the watcher must not see it).
  const forgedWill = Buffer.from('forged will');
  const ownWill = Buffer.from('own will');
  const dropWith = async (topic: string, payload: Buffer, clientId: string) => {
    let c: Awaited<ReturnType<typeof bareClient>> | undefined;
    try {
      c = await bareClient(t, url, squatKey.id, await secretOf(squatKey), clientId, { will: { topic, payload, qos: 1, retain: false } });
    } catch (err) {
      t.diagnostic(`CONNECT with a will on ${topic}: ${(err as Error).message}`);
      return;
    }
    (c.client.stream as net.Socket).destroy();
  };
  await dropWith(topics.agentStatus(agent.id), forgedWill, 'w1');
  await dropWith(topics.agentStatus(squatKey.id), ownWill, 'w2');
  await waitFor(() => watch.received.some((m) => m.payload.equals(ownWill)), 10_000, "the squatter's own will");
  await new Promise((r) => setTimeout(r, 200));
  assert.ok(!watch.received.some((m) => m.payload.equals(forgedWill)), 'no forged will reached the watcher');

  // A client id squatter: the eavesdropper connects with the watcher's id as its client id. mosquitto replaces the
  // client id by the username (use_username_as_clientid), so the watcher keeps its session (without it, the
  // second CONNECT with a known client id would close the first).
  const idSquat = await bareClient(t, url, spyKey.id, await secretOf(spyKey), watchKey.id);
  assert.ok(idSquat.client.connected);
  await new Promise((r) => setTimeout(r, 300));
  assert.equal(watchClosed, false, 'the watcher was not kicked by a CONNECT that reused its client id');
  const after = await leased.infer('kws', sampleInputs('kws', 2), { deadlineMs: 10_000 });
  assert.equal(after.agentId, agent.id);

  // A wrong password, and an identity nobody listed, are refused with a coded error at once.
  await assert.rejects(
    connect({
      brokerUrl: url,
      logger: quiet,
      identity: spyKey,
      username: spyKey.id,
      password: 'not-the-password',
      connectTimeoutMs: 5_000,
    }),
    code('MESH_UNAUTHORIZED'),
  );
  const stranger = generateIdentity('app');
  await assert.rejects(
    connect({
      brokerUrl: url,
      logger: quiet,
      identity: stranger,
      username: stranger.id,
      password: await secretOf(spyKey),
      connectTimeoutMs: 5_000,
    }),
    code('MESH_UNAUTHORIZED'),
  );
  // Without a password the SDK sends its mesh CONNECT token, which mosquitto does not know either.
  await assert.rejects(connect({ brokerUrl: url, logger: quiet, identity: appKey, connectTimeoutMs: 5_000 }), code('MESH_UNAUTHORIZED'));
  assert.equal(mosquitto.exitCode, null, 'mosquitto still runs');
});

test('revocation on mosquitto: regenerate without the id, SIGHUP, and the revoked client is refused', {
  skip: SKIP,
  timeout: 60_000,
}, async (t) => {
  const dir = await tempDir(t, 'edge-mesh-mosq-');
  const port = await freePort();
  const url = `mqtt://127.0.0.1:${port}`;
  const [keep, gone] = [generateIdentity('app'), generateIdentity('app')];
  const [keepFile, goneFile] = [await publicFile(dir, keep), await publicFile(dir, gone)];
  const out = path.join(dir, 'mosquitto');
  const first = await authMosquitto(out, [keepFile, goneFile], port);
  const mosquitto = await startMosquitto(t, first.conf, port);
  const secret = (id: string, files = first) =>
    readFile(files.identities.find((i) => i.id === id)!.passwordFile, 'utf8').then((s) => s.trim());
  const keepPassword = await secret(keep.id);
  const gonePassword = await secret(gone.id);
  const live = await bareClient(t, url, gone.id, gonePassword);
  let closed = false;
  live.client.on('close', () => (closed = true));

  const second = await authMosquitto(out, [keepFile], port);
  assert.deepEqual(
    second.removed.map((f) => path.basename(f)),
    [`${gone.id}.password`],
  );
  // The identity that stays keeps its password: regenerating does not log everyone else out.
  assert.equal(await secret(keep.id, second), keepPassword);
  assert.doesNotMatch(await readFile(second.aclFile, 'utf8'), new RegExp(gone.id));
  mosquitto.kill('SIGHUP');

  // mosquitto 2.0 checks connected clients again on reload: the revoked one is disconnected, and cannot come back.
  await waitFor(() => closed, 10_000, 'the revoked client to be disconnected');
  await assert.rejects(
    connect({ brokerUrl: url, logger: quiet, identity: gone, username: gone.id, password: gonePassword, connectTimeoutMs: 5_000 }),
    code('MESH_UNAUTHORIZED'),
  );
  const still = await connect({
    brokerUrl: url,
    logger: quiet,
    identity: keep,
    username: keep.id,
    password: keepPassword,
    connectTimeoutMs: 5_000,
  });
  await still.close();
});

test("auth mosquitto reads an embedded broker's admission store: revoked ids are left out; bad identities are refused", async (t) => {
  const dir = await tempDir(t, 'edge-mesh-mosq-');
  const operator = generateIdentity('operator');
  const dataDir = path.join(dir, 'store');
  const broker = await brokerFor(t, { auth: { trustedOperators: [{ id: operator.id, publicKey: operator.publicKey }], dataDir } });
  const [agentKey, appKey, goneKey] = [generateIdentity('agent'), generateIdentity('app'), generateIdentity('app')];
  for (const k of [agentKey, appKey, goneKey]) await broker.admit(admit(operator, k));
  await broker.revoke(revoke(operator, goneKey.id));
  await broker.close();

  const opKey = Buffer.from(operator.publicKey).toString('base64url');
  const out = await authMosquitto(path.join(dir, 'out'), [], 1883, ['--data', dataDir, '--operator', opKey]);
  assert.deepEqual(out.identities.map((i) => `${i.role}:${i.id}`).sort(), [`agent:${agentKey.id}`, `app:${appKey.id}`].sort());
  const acl = await readFile(out.aclFile, 'utf8');
  assert.match(acl, new RegExp(`^user ${agentKey.id}\ntopic write mesh/v1/agent/${agentKey.id}/status$`, 'm'));
  assert.doesNotMatch(acl, new RegExp(goneKey.id));
  const passwd = (await readFile(out.passwordFile, 'utf8')).trim().split('\n');
  assert.equal(passwd.length, 2);
  for (const line of passwd) {
    const [id, hash] = line.split(':');
    const secret = (await readFile(out.identities.find((i) => i.id === id)!.passwordFile, 'utf8')).trim();
    assert.equal(verifyMosquittoPassword(hash!, secret), true, `${id}'s secret checks against its passwd entry`);
  }

  // Another operator's view of the same store admits nobody: the records do not verify against it.
  const stranger = Buffer.from(generateIdentity('operator').publicKey).toString('base64url');
  await assert.rejects(authMosquitto(path.join(dir, 'out2'), [], 1883, ['--data', dataDir, '--operator', stranger]), /MESH_CONFIG/);
  // Nobody to admit: a coded configuration error, exit code 78 (docs/cli.md, "Exit codes").
  await assert.rejects(authMosquitto(path.join(dir, 'out5'), [], 1883), (err: { code?: number; stderr?: string }) => {
    assert.equal(err.code, 78, err.stderr);
    assert.match(err.stderr ?? '', /MESH_CONFIG: nobody to admit/);
    return true;
  });
  // A public identity whose id does not derive from its key is refused, as is one listed twice.
  const forged = path.join(dir, 'forged.json');
  await writeFile(forged, JSON.stringify({ ...publicIdentity(appKey), id: agentKey.id.replace('agent-', 'app-') }));
  await assert.rejects(authMosquitto(path.join(dir, 'out3'), [forged], 1883), /does not derive/);
  const appFile = await publicFile(dir, appKey);
  await assert.rejects(authMosquitto(path.join(dir, 'out4'), [appFile, appFile], 1883), /listed twice/);
});
