/**
 * The router's HTTP API with authentication (issue 14, acceptance 2): every endpoint except the health probes refuses
 * a request without a credential (401, the one error body of docs/errors.md), each scope opens its own endpoints and
 * no others (403), and the attacks a caller could try are refused: a token for another router, an expired one, one
 * whose lifetime is too long, one from an unadmitted or revoked key, a forged one, a role asking for a scope it may not
 * hold, a wrong API key secret, a flood of bad tokens and a credential over its rate.
 */
import assert from 'node:assert/strict';
import { type TestContext, test } from 'node:test';
import { sampleInputs } from '@edge-mesh/demo';
import {
  admit,
  ERROR_CODES,
  generateIdentity,
  type HttpScope,
  type Identity,
  isMeshErrorCode,
  makeHttpToken,
  tensorToJson,
} from '@edge-mesh/protocol';
import { makeApiKey, type RouterHttpAuthOptions, startRouter } from '@edge-mesh/router';
import { agentFor, brokerFor, quiet } from './helpers.ts';

const operator = generateIdentity('operator');
const trustedOperators = [{ id: operator.id, publicKey: operator.publicKey }];

async function meshWithAuth(t: TestContext, auth: Omit<RouterHttpAuthOptions, 'trustedOperators'> = {}, trustProxy?: string[]) {
  const broker = await brokerFor(t);
  await agentFor(t, { brokerUrl: broker.url });
  const routerKey = generateIdentity('router');
  const router = await startRouter({
    brokerUrl: broker.url,
    identity: routerKey,
    logger: quiet,
    http: { port: 0, processMetrics: false, auth: { trustedOperators, ...auth }, ...(trustProxy ? { trustProxy } : {}) },
  });
  t.after(() => router.close());
  await router.waitForModel('kws', 20_000);
  return { router, url: router.http!.url };
}

const tokenFor = (identity: Identity, audience: string, scopes: HttpScope[], extra: { nowMs?: number; ttlMs?: number } = {}) =>
  makeHttpToken(identity, admit(operator, identity), { audience, scopes, ...extra });

const kwsBody = () =>
  JSON.stringify({
    inputs: Object.entries(sampleInputs('kws', 0)).map(([name, t]) => {
      const json = tensorToJson(t);
      return { name, shape: json.shape, datatype: 'FP32', data: json.data };
    }),
  });

/** Every route of the router's API, with the scope it needs. */
const ROUTES: { method: 'GET' | 'POST'; path: string; scope: HttpScope | 'open' }[] = [
  { method: 'GET', path: '/v2/health/live', scope: 'open' },
  { method: 'GET', path: '/v2/health/ready', scope: 'open' },
  { method: 'GET', path: '/v2', scope: 'infer' },
  { method: 'GET', path: '/v2/models/kws', scope: 'infer' },
  { method: 'GET', path: '/v2/models/kws/ready', scope: 'infer' },
  { method: 'POST', path: '/v2/models/kws/infer', scope: 'infer' },
  { method: 'GET', path: '/v2/models/kws/versions/1', scope: 'infer' },
  { method: 'GET', path: '/v2/models/kws/versions/1/ready', scope: 'infer' },
  { method: 'GET', path: '/v2/models/kws/config', scope: 'infer' },
  { method: 'GET', path: '/v2/models/kws/versions/1/config', scope: 'infer' },
  { method: 'POST', path: '/v2/models/kws/versions/1/infer', scope: 'infer' },
  { method: 'GET', path: '/v2/models/stats', scope: 'read' },
  { method: 'GET', path: '/v2/models/kws/stats', scope: 'read' },
  { method: 'GET', path: '/v2/models/kws/versions/1/stats', scope: 'read' },
  { method: 'POST', path: '/v2/repository/index', scope: 'read' },
  { method: 'GET', path: '/v1/agents', scope: 'read' },
  { method: 'GET', path: '/v1/routing', scope: 'read' },
  { method: 'GET', path: '/metrics', scope: 'read' },
  { method: 'GET', path: '/openapi.json', scope: 'read' },
];

async function call(url: string, route: { method: string; path: string }, authorization?: string) {
  const res = await fetch(`${url}${route.path}`, {
    method: route.method,
    headers: {
      ...(authorization ? { authorization } : {}),
      ...(route.method === 'POST' ? { 'content-type': 'application/json' } : {}),
    },
    // An inference body for the inference routes; the others take small JSON bodies (16 KiB at most).
    ...(route.method === 'POST' ? { body: route.path.endsWith('/infer') ? kwsBody() : '{}' } : {}),
  });
  const text = await res.text();
  let body: unknown;
  try {
    body = JSON.parse(text);
  } catch {
    body = text;
  }
  return { status: res.status, body: body as Record<string, unknown>, headers: res.headers };
}

/** The one HTTP error body (docs/errors.md): error, code, optional details, nothing else; the status is the code's. */
function assertRefused(res: Awaited<ReturnType<typeof call>>, code: string, what: string) {
  assert.equal(res.body?.code, code, `${what}: ${JSON.stringify(res.body)}`);
  assert.ok(isMeshErrorCode(code));
  assert.equal(res.status, ERROR_CODES[code].httpStatus, what);
  assert.equal(typeof res.body.error, 'string', what);
  assert.deepEqual(
    Object.keys(res.body).filter((k) => !['error', 'code', 'details'].includes(k)),
    [],
    what,
  );
}

test('without a credential every endpoint but the health probes is refused with 401', { timeout: 120_000 }, async (t) => {
  // Two refusals per route: room for all of them before the per-address limit on failures (tested on its own below).
  const { url } = await meshWithAuth(t, { failureBurst: 4 * ROUTES.length });
  for (const route of [...ROUTES, { method: 'GET', path: '/v2/nope', scope: 'operator' as const }]) {
    const res = await call(url, route);
    if (route.scope === 'open') {
      assert.equal(res.status, 200, `${route.path} stays open: ${JSON.stringify(res.body)}`);
      continue;
    }
    assertRefused(res, 'MESH_UNAUTHORIZED', `${route.method} ${route.path}`);
    assert.match(res.headers.get('www-authenticate') ?? '', /^Bearer/);
    // A malformed header and a made-up token are refused the same way.
    assertRefused(await call(url, route, 'Basic dXNlcjpwYXNz'), 'MESH_UNAUTHORIZED', `${route.path} with Basic`);
  }
});

test('each scope opens its endpoints and no others, for tokens and for API keys', { timeout: 120_000 }, async (t) => {
  const keys = {
    infer: makeApiKey('thin-client', ['infer']),
    read: makeApiKey('dashboard', ['read']),
    operator: makeApiKey('ops', ['operator']),
  };
  const { router, url } = await meshWithAuth(t, { apiKeys: Object.values(keys).map((k) => k.entry) });
  const app = generateIdentity('app');
  const peer = generateIdentity('router');
  const credentials: { name: string; scopes: readonly HttpScope[]; header: string }[] = [
    { name: 'app token (infer)', scopes: ['infer'], header: `Bearer ${tokenFor(app, router.id, ['infer'])}` },
    { name: 'router token (read)', scopes: ['read'], header: `Bearer ${tokenFor(peer, router.id, ['read'])}` },
    { name: 'operator token', scopes: ['operator'], header: `Bearer ${tokenFor(operator, router.id, ['operator'])}` },
    { name: 'API key infer', scopes: ['infer'], header: `Bearer ${keys.infer.key}` },
    { name: 'API key read', scopes: ['read'], header: `Bearer ${keys.read.key}` },
    { name: 'API key operator', scopes: ['operator'], header: `Bearer ${keys.operator.key}` },
  ];
  for (const cred of credentials) {
    for (const route of ROUTES) {
      const res = await call(url, route, cred.header);
      const allowed = route.scope === 'open' || cred.scopes.includes('operator') || cred.scopes.includes(route.scope);
      if (allowed) {
        assert.equal(res.status, 200, `${cred.name} → ${route.method} ${route.path}: ${JSON.stringify(res.body).slice(0, 300)}`);
      } else {
        assertRefused(res, 'MESH_FORBIDDEN', `${cred.name} → ${route.method} ${route.path}`);
        assert.equal((res.body.details as { scope?: string }).scope, route.scope);
      }
    }
  }
  // The inference really ran on the agent.
  const res = await call(url, ROUTES.find((r) => r.method === 'POST')!, credentials[0]!.header);
  assert.ok(Array.isArray(res.body.outputs) && (res.body.outputs as unknown[]).length > 0);
});

test('dishonest credentials are refused', { timeout: 120_000 }, async (t) => {
  const revoked = new Set<string>();
  // Same key id, another secret: what a caller guessing secrets for a known id would send.
  const otherSecret = makeApiKey('thin-client', ['infer']).key;
  const apiKey = makeApiKey('thin-client', ['infer']);
  const { router, url } = await meshWithAuth(t, { apiKeys: [apiKey.entry], isRevoked: (id) => revoked.has(id), failureBurst: 1_000 });
  const models = { method: 'GET', path: '/v2/models/kws' };
  const app = generateIdentity('app');
  const refused = async (header: string, code: string, reason: string, what: string) => {
    const res = await call(url, models, header);
    assertRefused(res, code, what);
    assert.equal((res.body.details as { reason?: string } | undefined)?.reason, reason, what);
  };

  // A token made for another router (a captured token replayed elsewhere).
  await refused(
    `Bearer ${tokenFor(app, generateIdentity('router').id, ['infer'])}`,
    'MESH_UNAUTHORIZED',
    'wrong-audience',
    'other audience',
  );
  // Expired, and one that claims a lifetime longer than the router allows.
  await refused(
    `Bearer ${tokenFor(app, router.id, ['infer'], { nowMs: Date.now() - 600_000 })}`,
    'MESH_UNAUTHORIZED',
    'expired-token',
    'expired',
  );
  await refused(
    `Bearer ${tokenFor(app, router.id, ['infer'], { ttlMs: 86_400_000 })}`,
    'MESH_UNAUTHORIZED',
    'token-lifetime',
    'long-lived',
  );
  // A key whose admission another operator (one this router does not trust) signed.
  const rogue = generateIdentity('operator');
  const unadmitted = makeHttpToken(app, admit(rogue, app), { audience: router.id, scopes: ['infer'] });
  await refused(`Bearer ${unadmitted}`, 'MESH_UNAUTHORIZED', 'not-admitted', 'admitted by an untrusted operator');
  // Someone else's admission carried by a key that is not the admitted one.
  const thief = generateIdentity('app');
  const stolen = makeHttpToken(thief, admit(operator, app), { audience: router.id, scopes: ['infer'] });
  await refused(`Bearer ${stolen}`, 'MESH_UNAUTHORIZED', 'not-admitted', "another key's admission");
  // Claims changed after signing: an app token widened to operator scope.
  const honest = tokenFor(app, router.id, ['infer']);
  const [, body, sig] = honest.split('.');
  const claims = JSON.parse(Buffer.from(body!, 'base64url').toString());
  claims.scp = ['infer', 'read'];
  await refused(
    `Bearer mesh1.${Buffer.from(JSON.stringify(claims)).toString('base64url')}.${sig}`,
    'MESH_UNAUTHORIZED',
    'bad-signature',
    'tampered scopes',
  );
  // A role asking for a scope it may not hold, signed properly: an app may not read operator views.
  claims.scp = ['operator'];
  const { signBytes } = await import('@edge-mesh/protocol');
  const forgedBody = Buffer.from(JSON.stringify(claims));
  const forgedSig = signBytes(app, Buffer.concat([Buffer.from('edge-mesh/http-token/v1\0'), forgedBody]));
  await refused(
    `Bearer mesh1.${forgedBody.toString('base64url')}.${Buffer.from(forgedSig).toString('base64url')}`,
    'MESH_FORBIDDEN',
    'scope-not-of-role',
    'app asking for operator',
  );
  // A wrong secret for a real API key id, and a key this router never issued.
  await refused(`Bearer ${otherSecret}`, 'MESH_UNAUTHORIZED', 'bad-api-key', 'wrong secret');
  await refused(`Bearer meshkey.nobody.${'A'.repeat(43)}`, 'MESH_UNAUTHORIZED', 'bad-api-key', 'unknown key id');
  assert.equal((await call(url, models, `Bearer ${apiKey.key}`)).status, 200);

  // Revocation takes effect on the next request, even for a token already verified and cached.
  assert.equal((await call(url, models, `Bearer ${honest}`)).status, 200);
  revoked.add(app.id);
  await refused(`Bearer ${honest}`, 'MESH_UNAUTHORIZED', 'revoked', 'revoked after use');
});

test('per-client limits: a credential over its rate and an address sending bad tokens get 429', { timeout: 120_000 }, async (t) => {
  const { router, url } = await meshWithAuth(t, { requestsPerSecond: 1, burst: 3, failuresPerSecond: 1, failureBurst: 3 });
  const models = { method: 'GET', path: '/v2/models/kws' };
  const header = `Bearer ${tokenFor(generateIdentity('app'), router.id, ['infer'])}`;
  const statuses: number[] = [];
  for (let i = 0; i < 5; i++) statuses.push((await call(url, models, header)).status);
  assert.deepEqual(statuses.slice(0, 3), [200, 200, 200]);
  assertRefused(await call(url, models, header), 'MESH_RATE_LIMITED', 'over the request rate');
  // Another credential is not held back by the first one's rate.
  assert.equal((await call(url, models, `Bearer ${tokenFor(generateIdentity('app'), router.id, ['infer'])}`)).status, 200);

  for (let i = 0; i < 3; i++) assertRefused(await call(url, models, 'Bearer mesh1.x.y'), 'MESH_UNAUTHORIZED', `bad token ${i}`);
  // Past the failure burst the address is limited before any token is looked at, a good one's too.
  assertRefused(await call(url, models, 'Bearer mesh1.x.y'), 'MESH_RATE_LIMITED', 'failure flood');
  // Health stays open whatever the limits.
  assert.equal((await call(url, { method: 'GET', path: '/v2/health/live' })).status, 200);
});

test('behind a trusted reverse proxy the failure limit falls on the client X-Forwarded-For names; untrusted, the header is ignored', {
  timeout: 120_000,
}, async (t) => {
  const limits = { failuresPerSecond: 1, failureBurst: 3 };
  const models = '/v2/models/kws';
  const get = (url: string, forwardedFor: string, authorization = 'Bearer mesh1.x.y') =>
    fetch(`${url}${models}`, { headers: { authorization, 'x-forwarded-for': forwardedFor } });
  const trusted = await meshWithAuth(t, limits, ['127.0.0.1', '::1']);
  for (let i = 0; i < 3; i++) assert.equal((await get(trusted.url, '203.0.113.1')).status, 401, `bad token ${i}`);
  assert.equal((await get(trusted.url, '203.0.113.1')).status, 429, 'that client is limited');
  // Another client behind the same proxy is still checked, and a good token from it is served.
  assert.equal((await get(trusted.url, '203.0.113.2')).status, 401);
  const good = `Bearer ${tokenFor(generateIdentity('app'), trusted.router.id, ['infer'])}`;
  assert.equal((await get(trusted.url, '203.0.113.2', good)).status, 200);

  // Without trustProxy a client cannot escape the limit by naming a new address in each request.
  const direct = await meshWithAuth(t, limits);
  for (let i = 0; i < 3; i++) assert.equal((await get(direct.url, `198.51.100.${i}`)).status, 401);
  assert.equal((await get(direct.url, '198.51.100.99')).status, 429, 'X-Forwarded-For ignored');

  await assert.rejects(
    startRouter({
      brokerUrl: (await brokerFor(t)).url,
      identity: generateIdentity('router'),
      logger: quiet,
      http: { port: 0, trustProxy: ['not-an-address'] },
    }),
    (err: unknown) => err instanceof Error && /trustProxy/.test(err.message),
  );
});
