/**
 * The operator console (issue 15, docs/console.md) in a real headless Chromium (Debian's `chromium`, driven by
 * playwright-core): an authenticated broker, a router with API keys and an operator key for admissions, two agents and
 * a hostile one. The page loads behind the router's authentication, shows the fleet and updates it live as an agent
 * joins and leaves, admits a pending device (which then connects) and revokes it (which the broker then cuts off),
 * renders every agent- or requester-supplied string as text, and writes a screenshot for a person to look at.
 */
import assert from 'node:assert/strict';
import { existsSync } from 'node:fs';
import { mkdir, mkdtemp, rm } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { type TestContext, test } from 'node:test';
import { sampleInputs } from '@edge-mesh/demo';
import {
  type AgentStatus,
  admit,
  encodeMessage,
  generateIdentity,
  type Identity,
  PROTOCOL_VERSION,
  type Role,
  signStatus,
  topics,
} from '@edge-mesh/protocol';
import { makeApiKey, startRouter } from '@edge-mesh/router';
import { chromium } from 'playwright-core';
import { agentFor, brokerFor, quiet, ROOT, rawClient, tempDir } from './helpers.ts';

const CHROMIUM = '/usr/bin/chromium';
const skip = existsSync(CHROMIUM) ? false : `needs Debian's chromium at ${CHROMIUM} (apt-get install chromium; .ci/run installs it)`;
/** Flags for a closed network: no background connections Chromium would otherwise try (and be refused). */
const CHROMIUM_ARGS = [
  '--headless',
  '--no-sandbox',
  '--disable-gpu',
  '--disable-quic',
  '--no-first-run',
  '--disable-background-networking',
  '--disable-component-update',
  '--disable-sync',
];

/** Strings a dishonest agent or requester would like the page to run. Each sets window.__pwned if it ever runs. */
const HOSTILE_VERSION = '<script>window.__pwned=1</script>';
const HOSTILE_CPU = '<img src=x onerror="window.__pwned=2">Cortex-A78AE';
const HOSTILE_NAME = '<img src=x onerror="window.__pwned=3">Alice';

async function meshWithConsole(t: TestContext) {
  const operator = generateIdentity('operator');
  const broker = await brokerFor(t, {
    auth: { trustedOperators: [{ id: operator.id, publicKey: operator.publicKey }], dataDir: await tempDir(t, 'edge-mesh-console-') },
  });
  const admitted = async (role: Role): Promise<Identity> => {
    const who = generateIdentity(role);
    await broker.admit(admit(operator, who));
    return who;
  };
  const operatorKey = makeApiKey('console', ['read', 'operator']);
  const readKey = makeApiKey('viewer', ['read']);
  const router = await startRouter({
    brokerUrl: broker.url,
    identity: await admitted('router'),
    logger: quiet,
    http: {
      port: 0,
      processMetrics: false,
      auth: { trustedOperators: [{ id: operator.id, publicKey: operator.publicKey }], apiKeys: [operatorKey.entry, readKey.entry] },
      console: { admin: { operator, brokerUrl: broker.url } },
    },
  });
  t.after(() => router.close());
  return { broker, router, url: router.http!.url, admitted, operatorKey: operatorKey.key, readKey: readKey.key };
}

test('the console endpoints refuse a caller without a credential, and admissions need the operator scope', async (t) => {
  const { url, readKey } = await meshWithConsole(t);
  for (const p of ['/v1/agents', '/v1/admissions', '/v1/earnings']) {
    const res = await fetch(`${url}${p}`);
    assert.equal(res.status, 401, p);
    assert.equal(((await res.json()) as { code: string }).code, 'MESH_UNAUTHORIZED');
    assert.equal((await fetch(`${url}${p}`, { headers: { authorization: `Bearer ${readKey}` } })).status, 200, p);
  }
  const someone = generateIdentity('agent').id;
  for (const action of ['admit', 'revoke']) {
    const post = (authorization?: string) =>
      fetch(`${url}/v1/admissions/${action}`, {
        method: 'POST',
        headers: { 'content-type': 'application/json', ...(authorization ? { authorization } : {}) },
        body: JSON.stringify({ id: someone }),
      });
    assert.equal((await post()).status, 401, action);
    const forbidden = await post(`Bearer ${readKey}`);
    assert.equal(forbidden.status, 403, action);
    assert.equal(((await forbidden.json()) as { code: string }).code, 'MESH_FORBIDDEN');
  }
  // The page itself is open code without data, under a policy that runs no inline script but the import map.
  const page = await fetch(`${url}/console`);
  assert.equal(page.status, 200);
  const csp = page.headers.get('content-security-policy') ?? '';
  assert.match(csp, /script-src 'self' 'sha256-[A-Za-z0-9+/=]+'/);
  assert.doesNotMatch(csp, /unsafe-inline|unsafe-eval/);
  assert.equal(page.headers.get('set-cookie'), null);
  for (const asset of ['app.js', 'vendor/preact.js', 'vendor/preact-hooks.js', 'vendor/htm.js', 'vendor/uplot.js', 'vendor/uplot.css']) {
    assert.equal((await fetch(`${url}/console/${asset}`)).status, 200, asset);
  }
  assert.equal((await fetch(`${url}/console/../package.json`)).status !== 200, true);
});

test('join requests are bounded and malformed ones refused', async (t) => {
  const { url } = await meshWithConsole(t);
  const ask = (body: unknown) =>
    fetch(`${url}/v1/admissions/requests`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify(body) });
  const key = (who: Identity) => Buffer.from(who.publicKey).toString('base64url');
  assert.equal((await ask({ role: 'operator', public_key: key(generateIdentity('operator')) })).status, 400);
  assert.equal((await ask({ role: 'agent', public_key: 'not-a-key' })).status, 400);
  assert.equal((await ask({ role: 'agent', public_key: key(generateIdentity('agent')), name: 'x'.repeat(65) })).status, 400);
  // One address may keep 8 requests waiting; the 9th is refused, not swapped for an older one.
  for (let i = 0; i < 8; i++)
    assert.equal((await ask({ role: 'agent', public_key: key(generateIdentity('agent')), name: `n${i}` })).status, 202);
  const refused = await ask({ role: 'agent', public_key: key(generateIdentity('agent')) });
  assert.equal(refused.status, 429);
  assert.equal(((await refused.json()) as { code: string }).code, 'MESH_RATE_LIMITED');
});

test("the console's POST routes refuse a body over 16 KiB with a coded 413, the open join route without a credential too; smaller ones still go in", async (t) => {
  const { url, operatorKey } = await meshWithConsole(t);
  /** SMALL_BODY_LIMIT (router/src/http-errors.ts): the console's POST routes take no larger body. */
  const limit = 16 * 1024;
  const key = (who: Identity) => Buffer.from(who.publicKey).toString('base64url');
  /** `body` as JSON of exactly `bytes` bytes, padded with a field the schema lets through: only its size is wrong. */
  const sized = (body: Record<string, unknown>, bytes: number) => {
    const bare = JSON.stringify({ ...body, pad: '' });
    return JSON.stringify({ ...body, pad: 'x'.repeat(bytes - bare.length) });
  };
  const post = (p: string, body: string | ReadableStream<Uint8Array>, headers: Record<string, string> = {}) =>
    fetch(`${url}${p}`, {
      method: 'POST',
      headers: { 'content-type': 'application/json', ...headers },
      body,
      duplex: 'half',
    } as RequestInit);
  const assertTooLarge = async (res: Response, what: string) => {
    const body = (await res.json()) as { code?: string; error?: string; details?: { limitBytes?: number } };
    assert.equal(res.status, 413, `${what}: ${JSON.stringify(body)}`);
    assert.equal(body.code, 'MESH_TOO_LARGE', what);
    assert.equal(typeof body.error, 'string', what);
    assert.equal(body.details?.limitBytes, limit, what);
  };
  const join = () => ({ role: 'agent', public_key: key(generateIdentity('agent')), name: 'padded' });

  // No credential: refused on its declared length, and without one (chunked) once the limit is passed.
  const over = sized(join(), limit + 1);
  assert.equal(Buffer.byteLength(over), limit + 1);
  await assertTooLarge(await post('/v1/admissions/requests', over), 'join, declared length');
  const chunked = new ReadableStream<Uint8Array>({
    start(controller) {
      controller.enqueue(new TextEncoder().encode(over));
      controller.close();
    },
  });
  await assertTooLarge(await post('/v1/admissions/requests', chunked), 'join, chunked');
  // An operator route, with the operator's credential, has the same small limit.
  await assertTooLarge(
    await post('/v1/admissions/admit', sized({ id: generateIdentity('agent').id }, limit + 1), { authorization: `Bearer ${operatorKey}` }),
    'admit',
  );
  // A body at the limit, and a plain one, are still taken.
  assert.equal((await post('/v1/admissions/requests', sized(join(), limit))).status, 202);
  const plain = await post('/v1/admissions/requests', JSON.stringify(join()));
  assert.equal(plain.status, 202);
  assert.equal(((await plain.json()) as { state: string }).state, 'pending');
});

test('the console in Chromium: loads behind auth, updates live, admits and revokes, escapes what agents say', {
  skip,
  timeout: 180_000,
}, async (t) => {
  const { broker, router, url, admitted, operatorKey } = await meshWithConsole(t);
  const first = await agentFor(t, { brokerUrl: broker.url, identity: await admitted('agent') });
  const second = await agentFor(t, { brokerUrl: broker.url, identity: await admitted('agent') });
  await router.waitForModel('kws', 30_000, 2);

  // A dishonest (but admitted) agent announces markup as its version and CPU model.
  const hostile = await admitted('agent');
  const raw = await rawClient(t, broker.url, hostile);
  const hostileStatus: AgentStatus = {
    v: PROTOCOL_VERSION,
    kind: 'status',
    agent: hostile.id,
    state: 'online',
    ts: Date.now(),
    session: 'hostile',
    version: HOSTILE_VERSION,
    hardware: { platform: 'linux', arch: 'arm64', cpus: 4, cpuModel: HOSTILE_CPU, memoryMb: 4096 },
    models: first.status().models,
    workers: 1,
  };
  raw.client.publish(topics.agentStatus(hostile.id), encodeMessage(signStatus(hostile, hostileStatus)), { qos: 1, retain: true });

  // A device asks to join, naming itself with markup.
  const device = generateIdentity('agent');
  const asked = await fetch(`${url}/v1/admissions/requests`, {
    method: 'POST',
    headers: { 'content-type': 'application/json' },
    body: JSON.stringify({ role: 'agent', public_key: Buffer.from(device.publicKey).toString('base64url'), name: HOSTILE_NAME }),
  });
  assert.equal(asked.status, 202);

  const profile = await mkdtemp(path.join(os.tmpdir(), 'edge-mesh-chromium-'));
  t.after(() => rm(profile, { recursive: true, force: true }));
  const context = await chromium.launchPersistentContext(profile, {
    executablePath: CHROMIUM,
    headless: true,
    args: CHROMIUM_ARGS,
    viewport: { width: 1400, height: 1000 },
  });
  t.after(() => context.close());
  const page = context.pages()[0] ?? (await context.newPage());
  const pageErrors: string[] = [];
  page.on('pageerror', (err) => pageErrors.push(err.message));
  page.on('console', (m) => {
    // The wrong credential's 401 is expected; anything else logged as an error is not.
    if (m.type() === 'error' && !m.text().includes('status of 401')) pageErrors.push(m.text());
  });

  // Without a credential the page asks for one; a wrong one is refused and asked for again.
  await page.goto(`${url}/console`);
  await page.getByTestId('credential').fill('meshkey.console.wrong-secret');
  await page.getByTestId('sign-in').click();
  await page.getByTestId('login-error').waitFor({ timeout: 10_000 });
  assert.match((await page.getByTestId('login-error').textContent()) ?? '', /MESH_UNAUTHORIZED|unknown API key/);

  await page.getByTestId('credential').fill(operatorKey);
  await page.getByTestId('sign-in').click();
  const row = (id: string) => page.locator(`[data-testid=agent-row][data-agent="${id}"]`);
  for (const id of [first.id, second.id, hostile.id]) await row(id).waitFor({ timeout: 15_000 });
  assert.equal(await page.evaluate("sessionStorage.getItem('edge-mesh.console.credential')"), operatorKey);
  assert.deepEqual(await context.cookies(), []);

  // The hostile strings are there as text; nothing ran and no element was made from them.
  assert.equal(await row(hostile.id).getByText(HOSTILE_VERSION, { exact: true }).count(), 1);
  assert.match((await row(hostile.id).textContent()) ?? '', /<img src=x onerror="window.__pwned=2">Cortex-A78AE/);
  const pending = page.locator(`[data-testid=pending-row][data-id="${device.id}"]`);
  await pending.waitFor({ timeout: 10_000 });
  assert.equal(await pending.locator('.name').textContent(), HOSTILE_NAME);
  assert.equal(await page.locator('main img, main script').count(), 0);
  assert.equal(await page.evaluate('window.__pwned'), undefined);

  // Plots are drawn.
  await page.locator('[data-testid=chart-rtt] canvas').waitFor({ timeout: 10_000 });
  await page.locator('[data-testid=chart-load] canvas').waitFor({ timeout: 10_000 });

  // Traffic through the router shows in the earnings per owner (unpaid agents: one owner without a payout address).
  for (let i = 0; i < 4; i++) await router.infer('kws', sampleInputs('kws', i));
  const servedShown = async () => (await page.getByTestId('owner-requests').allTextContents()).reduce((s, n) => s + Number(n), 0);
  for (const until = Date.now() + 10_000; (await servedShown()) < 4; ) {
    assert.ok(Date.now() < until, 'the earnings never showed the 4 requests');
    await new Promise((r) => setTimeout(r, 100));
  }

  // Admit the pending device from the page: the broker now lets it in, and the fleet shows it join, live.
  await pending.getByTestId('admit').click();
  await page.locator(`[data-testid=admitted-row][data-id="${device.id}"]`).waitFor({ timeout: 10_000 });
  assert.equal(await pending.count(), 0);
  const joined = await agentFor(t, { brokerUrl: broker.url, identity: device });
  await row(joined.id).waitFor({ timeout: 15_000 });
  await page.locator(`[data-testid=agent-row][data-agent="${joined.id}"].up`).waitFor({ timeout: 15_000 });

  // A person can look at it.
  const outDir = path.join(ROOT, 'test-output');
  await mkdir(outDir, { recursive: true });
  const screenshot = path.join(outDir, 'console.png');
  await page.screenshot({ path: screenshot, fullPage: true });
  t.diagnostic(`console screenshot: ${screenshot}`);
  process.stdout.write(`console screenshot written to ${screenshot}\n`);

  // Revoke it from the page: the broker cuts it off and the fleet shows it leave.
  await page.locator(`[data-testid=admitted-row][data-id="${device.id}"]`).getByTestId('revoke').click();
  await page.locator(`[data-testid=revoked-row][data-id="${device.id}"]`).waitFor({ timeout: 10_000 });
  // Gone from the table, or shown down: no row for it that is not down.
  await page.locator(`[data-testid=agent-row][data-agent="${joined.id}"]:not(.down)`).waitFor({ state: 'detached', timeout: 20_000 });
  const view = (await (await fetch(`${url}/v1/agents`, { headers: { authorization: `Bearer ${operatorKey}` } })).json()) as {
    agents: { id: string; up: boolean }[];
  };
  assert.notEqual(view.agents.find((a) => a.id === joined.id)?.up, true);

  // An agent that shuts down leaves the fleet view too.
  await second.close();
  await page.locator(`[data-testid=agent-row][data-agent="${second.id}"]:not(.down)`).waitFor({ state: 'detached', timeout: 20_000 });
  assert.deepEqual(pageErrors, []);
});
