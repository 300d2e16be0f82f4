/**
 * Revocation reaches the router's HTTP and gRPC credential check (docs/security.md, "The router's HTTP API"): the
 * broker republishes each stored revocation, retained, and the router refuses the revoked id's tokens within a
 * second, including a router that starts after the revocation. The broker is not trusted with it: a revocation no
 * trusted operator signed, or one published under another id's topic, is ignored; no client may publish there.
 */
import assert from 'node:assert/strict';
import test from 'node:test';
import { admit, generateIdentity, type Identity, makeHttpToken, revoke, topics } from '@edge-mesh/protocol';
import { startRouter } from '@edge-mesh/router';
import { admitted, authBrokerFor, cleanup, connect } from './broker-fixtures.ts';
import { quiet } from './helpers.ts';

const authBroker = authBrokerFor('revocation-');

async function routerOn(defer: (fn: () => unknown) => void, ab: Awaited<ReturnType<typeof authBroker>>, op: Identity) {
  const identity = await admitted(ab, 'router');
  const router = await startRouter({
    brokerUrl: ab.b.url,
    identity,
    logger: quiet,
    http: { port: 0, processMetrics: false, auth: { trustedOperators: [{ id: op.id, publicKey: op.publicKey }] } },
  });
  defer(() => router.close());
  return router;
}

/** The status of GET /v1/agents with a fresh token of `who` carrying `admission`. */
async function statusWith(router: Awaited<ReturnType<typeof startRouter>>, who: Identity, admission: ReturnType<typeof admit>) {
  const token = makeHttpToken(who, admission, { audience: router.id, scopes: ['read'] });
  const res = await fetch(`${router.http!.url}/v1/agents`, { headers: { authorization: `Bearer ${token}` } });
  return { status: res.status, body: (await res.json()) as { code?: string; details?: { reason?: string } } };
}

async function until(what: string, check: () => Promise<boolean>, ms = 1000): Promise<number> {
  const started = Date.now();
  while (!(await check())) {
    if (Date.now() - started > ms) assert.fail(`${what} not within ${ms} ms`);
    await new Promise((r) => setTimeout(r, 20));
  }
  return Date.now() - started;
}

test("a revocation reaches the router's credential check within a second; a later admission lets the key back in", {
  timeout: 30_000,
}, async (t) => {
  const defer = cleanup(t);
  const ab = await authBroker(defer);
  const reader = generateIdentity('router');
  const first = admit(ab.op, reader);
  await ab.b.admit(first);
  const router = await routerOn(defer, ab, ab.op);
  assert.equal((await statusWith(router, reader, first)).status, 200);

  await ab.b.revoke(revoke(ab.op, reader.id));
  const tookMs = await until('the revoked token refused', async () => (await statusWith(router, reader, first)).status === 401);
  const refused = await statusWith(router, reader, first);
  assert.equal(refused.body.code, 'MESH_UNAUTHORIZED');
  assert.equal(refused.body.details?.reason, 'revoked');
  assert.ok(tookMs < 1000, `${tookMs} ms`);

  // A router started after the revocation learns it from the retained copy.
  const late = await routerOn(defer, ab, ab.op);
  await until('the late router refuses it', async () => (await statusWith(late, reader, first)).status === 401);

  // A new admission, signed after the revocation, is accepted again; the old one stays refused.
  await new Promise((r) => setTimeout(r, 5));
  const second = admit(ab.op, reader);
  await ab.b.admit(second);
  assert.equal((await statusWith(router, reader, second)).status, 200);
  assert.equal((await statusWith(router, reader, first)).status, 401);
});

test('revocations the broker keeps are republished after it restarts', { timeout: 30_000 }, async (t) => {
  const defer = cleanup(t);
  const ab = await authBroker(defer);
  const reader = generateIdentity('router');
  const admission = admit(ab.op, reader);
  await ab.b.admit(admission);
  await ab.b.revoke(revoke(ab.op, reader.id));
  await ab.b.close();
  const again = await authBroker(defer, { op: ab.op, dataDir: ab.dataDir });
  const router = await routerOn(defer, again, ab.op);
  await until('refused after the broker restart', async () => (await statusWith(router, reader, admission)).status === 401);
});

test('a dishonest broker or client cannot revoke: unsigned, foreign-signed and misfiled revocations are ignored', {
  timeout: 30_000,
}, async (t) => {
  const defer = cleanup(t);
  const ab = await authBroker(defer);
  const victim = generateIdentity('router');
  const admission = admit(ab.op, victim);
  await ab.b.admit(admission);
  const router = await routerOn(defer, ab, ab.op);
  const publish = (topic: string, payload: Buffer) =>
    new Promise<void>((resolve, reject) =>
      ab.b.aedes.publish({ cmd: 'publish', topic, payload, qos: 1, retain: true, dup: false }, (err) => (err ? reject(err) : resolve())),
    );
  const { encodeMessage } = await import('@edge-mesh/protocol');
  const encoded = (r: ReturnType<typeof revoke>) => Buffer.from(encodeMessage({ record: r.record, sig: r.sig } as never));
  // Published by the broker itself: a revocation signed by an operator the router does not trust ...
  await publish(topics.revocation(victim.id), encoded(revoke(generateIdentity('operator'), victim.id)));
  // ... a real operator's revocation of another id, filed under the victim's topic ...
  const other = generateIdentity('app');
  await publish(topics.revocation(victim.id), encoded(revoke(ab.op, other.id)));
  // ... and garbage.
  await publish(topics.revocation(victim.id), Buffer.from('not cbor'));
  // An admitted client may not publish there at all.
  const app = await admitted(ab, 'app');
  const client = await connect(defer, ab.b, app);
  await new Promise<void>((resolve) =>
    client.publish(topics.revocation(victim.id), encoded(revoke(ab.op, victim.id)), { qos: 0 }, () => resolve()),
  );
  await new Promise((r) => setTimeout(r, 300));
  assert.equal((await statusWith(router, victim, admission)).status, 200, 'still served');
});
