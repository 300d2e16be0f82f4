/**
 * Credentials kept across reconnects (issue 14): on a broker that checks a fixed username and password (an aedes
 * broker with a password hook here, as mosquitto with a password file would), a client with a mesh identity that was
 * given a password sends that password on every reconnect, not its mesh token. The broker is restarted on the same
 * port mid-test; the client must get back in.
 */
import assert from 'node:assert/strict';
import { type TestContext, test } from 'node:test';
import { resolveCredentials } from '@edge-mesh/client';
import { generateIdentity } from '@edge-mesh/protocol';
import { connect } from '@edge-mesh/sdk';
import { brokerFor, quiet, waitFor } from './helpers.ts';

const USER = 'fleet';
const PASSWORD = 'correct horse battery staple';

/** An open broker whose connect hook accepts only USER/PASSWORD, counting what it saw. */
async function passwordBroker(t: TestContext, port = 0) {
  const seen: { username: string | undefined; password: string | undefined }[] = [];
  const broker = await brokerFor(t, {
    port,
    hooks: {
      authenticate: (_client, username, password) => {
        seen.push({ username, password: password?.toString() });
        return username === USER && password?.toString() === PASSWORD;
      },
    },
  });
  return { broker, seen };
}

for (const how of ['options', 'url'] as const) {
  test(`a password given in ${how} is sent again after a broker restart, never the mesh token`, { timeout: 60_000 }, async (t) => {
    const first = await passwordBroker(t);
    const port = first.broker.port;
    const url = how === 'url' ? `mqtt://${encodeURIComponent(USER)}:${encodeURIComponent(PASSWORD)}@127.0.0.1:${port}` : first.broker.url;
    const mesh = await connect({
      brokerUrl: url,
      identity: generateIdentity('app'),
      logger: quiet,
      backoff: { baseMs: 50, maxMs: 200 },
      connectTimeoutMs: 10_000,
      ...(how === 'options' ? { username: USER, password: PASSWORD } : {}),
    });
    t.after(() => mesh.close());
    assert.deepEqual(first.seen, [{ username: USER, password: PASSWORD }]);

    await first.broker.close();
    const second = await passwordBroker(t, port);
    await waitFor(() => second.seen.some((s) => s.password === PASSWORD), 10_000, 'the client to reconnect with its password');
    assert.ok(
      second.seen.every((s) => s.username === USER && s.password === PASSWORD),
      `every reconnect sent the password: ${JSON.stringify(second.seen)}`,
    );
    // Connected for real, not just attempting.
    assert.equal(second.broker.clientCount(), 1);
  });
}

test('without a password the identity signs a fresh token for every attempt', () => {
  const identity = generateIdentity('app');
  assert.deepEqual(resolveCredentials('mqtt://127.0.0.1:1883', {}, identity), {
    username: identity.id,
    password: undefined,
    useToken: true,
  });
  assert.deepEqual(resolveCredentials('mqtt://u:p%40ss@h:1', {}, identity), { username: 'u', password: 'p@ss', useToken: false });
  assert.deepEqual(resolveCredentials('mqtt://u:p@h:1', { username: 'v', password: 'q' }, identity), {
    username: 'v',
    password: 'q',
    useToken: false,
  });
});
