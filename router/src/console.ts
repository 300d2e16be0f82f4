/**
 * The operator console (docs/console.md): a page served by the router, and the endpoints it and `edge-mesh fleet ls`,
 * `admissions ls` and `earnings` read.
 *
 *   GET  /console, /console/*         the page: static files (this package's console/ folder, and Preact, htm and uPlot
 *                                     from their own packages), open like any published code; it holds no data
 *   GET  /v1/admissions               pending join requests, and the admissions and revocations this router made (read)
 *   POST /v1/admissions/requests      a device asks to join (open, bounded: ./console-admissions.ts)
 *   POST /v1/admissions/admit         admit a pending request (operator)
 *   POST /v1/admissions/revoke        revoke an id (operator)
 *   GET  /v1/earnings                 per device owner (payout address): agents, requests served through this router,
 *                                     their value at the agents' quoted prices, and what the escrow settled (read)
 *
 * The page takes its credential from the operator (an API key or mesh token, kept in sessionStorage) and sends it as
 * a bearer header; the router sets no cookie, so no other site can make a browser call these endpoints with it.
 * Every response of the page carries a Content-Security-Policy without inline scripts (the import map is allowed by
 * its hash), so a string an agent managed to get into the page could not run even if it escaped Preact's text nodes.
 */
import { createHash } from 'node:crypto';
import { existsSync } from 'node:fs';
import { readFile } from 'node:fs/promises';
import { createRequire } from 'node:module';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { sendAdminRecord } from '@edge-mesh/client';
import { MeshError, verifyQuote } from '@edge-mesh/protocol';
import type { FastifyInstance, FastifyReply } from 'fastify';
import { ConsoleAdmissions, type JoinRequestBody, type RouterConsoleOptions } from './console-admissions.ts';
import type { RouterHandle } from './handle.ts';
import { ANY_ERROR, errorResponse, SMALL_BODY_LIMIT } from './http-errors.ts';

const require = createRequire(import.meta.url);
/** The folder of an installed package, found from its main file (htm and uplot do not export package.json). */
function packageDir(name: string): string {
  let dir = path.dirname(require.resolve(name));
  while (!existsSync(path.join(dir, 'package.json')) || path.basename(dir) !== name) {
    const up = path.dirname(dir);
    if (up === dir) throw new MeshError('MESH_CONFIG', `cannot find the folder of the installed package ${name}`);
    dir = up;
  }
  return dir;
}
/** The page's own files: console/ beside src/ and dist/. */
const CONSOLE_DIR = fileURLToPath(new URL('../console/', import.meta.url));

/** URL path under /console → file, content type. A fixed list: no path from the request reaches the file system. */
function assetFiles(): Record<string, { file: string; type: string }> {
  const js = 'text/javascript; charset=utf-8';
  return {
    'app.js': { file: path.join(CONSOLE_DIR, 'app.js'), type: js },
    'console.css': { file: path.join(CONSOLE_DIR, 'console.css'), type: 'text/css; charset=utf-8' },
    'vendor/preact.js': { file: path.join(packageDir('preact'), 'dist/preact.module.js'), type: js },
    'vendor/preact-hooks.js': { file: path.join(packageDir('preact'), 'hooks/dist/hooks.module.js'), type: js },
    'vendor/htm.js': { file: path.join(packageDir('htm'), 'dist/htm.module.js'), type: js },
    'vendor/uplot.js': { file: path.join(packageDir('uplot'), 'dist/uPlot.esm.js'), type: js },
    'vendor/uplot.css': { file: path.join(packageDir('uplot'), 'dist/uPlot.min.css'), type: 'text/css; charset=utf-8' },
  };
}

/** preact/hooks imports "preact" by its bare name: the import map resolves it (and the others) to the files above. */
const IMPORT_MAP = JSON.stringify({
  imports: {
    preact: '/console/vendor/preact.js',
    'preact/hooks': '/console/vendor/preact-hooks.js',
    htm: '/console/vendor/htm.js',
    uplot: '/console/vendor/uplot.js',
  },
});

function pageHtml(): { html: string; csp: string } {
  const hash = createHash('sha256').update(IMPORT_MAP).digest('base64');
  const html = `<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>edge-mesh console</title>
<link rel="stylesheet" href="/console/vendor/uplot.css">
<link rel="stylesheet" href="/console/console.css">
<script type="importmap">${IMPORT_MAP}</script>
<script type="module" src="/console/app.js"></script>
</head>
<body><main id="app"><p>Loading the console…</p></main><noscript>The console needs JavaScript.</noscript></body>
</html>
`;
  const csp = [
    "default-src 'none'",
    `script-src 'self' 'sha256-${hash}'`,
    "style-src 'self'",
    "img-src 'self' data:",
    "connect-src 'self'",
    "base-uri 'none'",
    "form-action 'none'",
    "frame-ancestors 'none'",
  ].join('; ');
  return { html, csp };
}

const securityHeaders = (reply: FastifyReply, csp: string) =>
  reply
    .header('content-security-policy', csp)
    .header('x-content-type-options', 'nosniff')
    .header('referrer-policy', 'no-referrer')
    .header('x-frame-options', 'DENY');

export async function registerConsoleRoutes(app: FastifyInstance, router: RouterHandle, options: RouterConsoleOptions = {}): Promise<void> {
  const { html, csp } = pageHtml();
  const assets = new Map<string, { body: Buffer; type: string }>();
  for (const [name, { file, type }] of Object.entries(assetFiles())) {
    try {
      assets.set(name, { body: await readFile(file), type });
    } catch (cause) {
      throw new MeshError('MESH_CONFIG', `the console's file ${file} is missing: reinstall @edge-mesh/router`, { cause });
    }
  }
  const hidden = { schema: { hide: true } };
  app.get('/console', hidden, async (_request, reply) => securityHeaders(reply, csp).type('text/html; charset=utf-8').send(html));
  for (const [name, asset] of assets) {
    app.get(`/console/${name}`, hidden, async (_request, reply) =>
      securityHeaders(reply, csp).header('cache-control', 'no-cache').type(asset.type).send(asset.body),
    );
  }

  const admin = options.admin ? new ConsoleAdmissions(options.admin, sendAdminRecord) : undefined;
  const needAdmin = () => {
    if (!admin)
      throw new MeshError(
        'MESH_NOT_FOUND',
        'this router takes no join requests and admits no one: it has no operator key (edge-mesh router --admin-key)',
        {
          details: { reason: 'no-admin-key' },
        },
      );
    return admin;
  };
  const idBody = { type: 'object', required: ['id'], properties: { id: { type: 'string', maxLength: 128 } } } as const;

  app.get(
    '/v1/admissions',
    {
      schema: {
        tags: ['operator'],
        summary: 'Join requests waiting for the operator, and the admissions and revocations this router made',
        response: ANY_ERROR,
      },
    },
    async () => {
      const { pending, ledger } = admin?.list() ?? { pending: [], ledger: [] };
      const seen = router.agents().map((a) => ({ id: a.id, up: a.up, state: a.status.state }));
      return {
        admin: admin ? { operator: admin.operatorId } : null,
        pending: pending.map(({ address: _address, ...p }) => p),
        admitted: ledger.filter((e) => e.state === 'admitted'),
        revoked: ledger.filter((e) => e.state === 'revoked'),
        seen,
      };
    },
  );
  app.post<{ Body: JoinRequestBody }>(
    '/v1/admissions/requests',
    {
      // Open to callers without a credential: a body over the small limit is refused (413) before it is read whole.
      bodyLimit: SMALL_BODY_LIMIT,
      schema: {
        tags: ['operator'],
        summary: 'A device or app asks to be admitted: { role, public_key (base64url), name }; open, bounded, admits nothing by itself',
        body: {
          type: 'object',
          required: ['role', 'public_key'],
          properties: {
            role: { type: 'string', maxLength: 16 },
            public_key: { type: 'string', maxLength: 64 },
            name: { type: 'string', maxLength: 64 },
          },
        },
        response: {
          413: errorResponse('MESH_TOO_LARGE: the body is over the limit (details.limitBytes)'),
          429: errorResponse('MESH_RATE_LIMITED: too many requests are waiting'),
          ...ANY_ERROR,
        },
      },
    },
    async (request, reply) => {
      const entry = needAdmin().request(request.body, request.ip);
      return reply.code(202).send({ id: entry.id, role: entry.role, state: 'pending' });
    },
  );
  app.post<{ Body: { id: string } }>(
    '/v1/admissions/admit',
    {
      bodyLimit: SMALL_BODY_LIMIT,
      schema: { tags: ['operator'], summary: 'Admit a pending join request through the broker', body: idBody, response: ANY_ERROR },
    },
    async (request) => ({ admitted: await needAdmin().admit(request.body.id) }),
  );
  app.post<{ Body: { id: string } }>(
    '/v1/admissions/revoke',
    {
      bodyLimit: SMALL_BODY_LIMIT,
      schema: {
        tags: ['operator'],
        summary: 'Revoke an id through the broker: disconnected at once, refused from then on',
        body: idBody,
        response: ANY_ERROR,
      },
    },
    async (request) => ({ revoked: await needAdmin().revoke(request.body.id) }),
  );

  // Requests each agent answered for this router (forwarded, ok), and their value at the price it quoted then.
  const served = new Map<string, { requests: number; quotedMicros: number }>();
  const unsubscribe = router.onRouted((r) => {
    if (r.via !== 'forward' || !r.ok || r.agentId === undefined) return;
    const status = router.agents().find((a) => a.id === r.agentId)?.status;
    const price = status?.models?.find((m) => m.name === r.model)?.priceMicros ?? 0;
    let s = served.get(r.agentId);
    if (s === undefined) {
      // Bounded by the agents that answered; an id appears here only after a reply the engine accepted.
      if (served.size >= 100_000) served.clear();
      s = { requests: 0, quotedMicros: 0 };
      served.set(r.agentId, s);
    }
    s.requests++;
    s.quotedMicros += Number.isFinite(price) && price > 0 ? price : 0;
  });
  app.addHook('onClose', async () => unsubscribe());

  app.get(
    '/v1/earnings',
    {
      schema: {
        tags: ['operator'],
        summary:
          'Earnings per device owner (payout address from the agents’ signed quotes): requests served through this router, their quoted value, and what the escrow settled',
        response: ANY_ERROR,
      },
    },
    async (request) => {
      const payoutOf = new Map<string, string>();
      for (const { id, status } of router.agents()) {
        if (!status.quote) continue;
        try {
          payoutOf.set(id, verifyQuote(status.quote, { agentId: id }).payout.toLowerCase());
        } catch {
          // An unsigned or forged quote names no owner.
        }
      }
      // Settled amounts come from the chain routes (settlements.ts), called with the caller's own credential.
      let settledByPayout: Map<string, number> | undefined;
      let chainError: string | undefined;
      if (app.hasRoute({ method: 'GET', url: '/v1/settlements' })) {
        const res = await app.inject({
          method: 'GET',
          url: '/v1/settlements',
          headers: request.headers.authorization ? { authorization: request.headers.authorization } : {},
        });
        if (res.statusCode === 200) {
          settledByPayout = new Map();
          for (const s of (res.json() as { settlements: { payout: string; delta_micros?: number }[] }).settlements)
            settledByPayout.set(s.payout, (settledByPayout.get(s.payout) ?? 0) + (s.delta_micros ?? 0));
        } else chainError = (res.json() as { error?: string }).error ?? `HTTP ${res.statusCode}`;
      }
      const owners = new Map<
        string,
        { payout: string | null; agents: string[]; requests: number; quoted_micros: number; settled_micros: number | null }
      >();
      const ids = new Set([...router.agents().map((a) => a.id), ...served.keys()]);
      for (const id of ids) {
        const payout = payoutOf.get(id) ?? null;
        const key = payout ?? '';
        let o = owners.get(key);
        if (o === undefined) {
          o = {
            payout,
            agents: [],
            requests: 0,
            quoted_micros: 0,
            settled_micros: payout && settledByPayout ? (settledByPayout.get(payout) ?? 0) : null,
          };
          owners.set(key, o);
        }
        const s = served.get(id);
        o.agents.push(id);
        o.requests += s?.requests ?? 0;
        o.quoted_micros += s?.quotedMicros ?? 0;
      }
      // Owners paid on chain whose agents this router does not see now still earned.
      for (const [payout, settled] of settledByPayout ?? []) {
        if (!owners.has(payout)) owners.set(payout, { payout, agents: [], requests: 0, quoted_micros: 0, settled_micros: settled });
      }
      return {
        chain: settledByPayout !== undefined,
        ...(chainError !== undefined ? { chain_error: chainError } : {}),
        owners: [...owners.values()].sort((a, b) => b.quoted_micros - a.quoted_micros || b.requests - a.requests),
        agents: [...ids].map((id) => ({
          id,
          payout: payoutOf.get(id) ?? null,
          requests: served.get(id)?.requests ?? 0,
          quoted_micros: served.get(id)?.quotedMicros ?? 0,
        })),
      };
    },
  );
}
