// The operator console (docs/console.md): Preact components written with htm templates, uPlot for the plots.
// It polls the router's JSON endpoints with the operator's credential as a bearer header; every string from the
// mesh (agent versions, hardware, model names, join request names) is rendered as a text node, never as markup.
import htm from 'htm';
import { h, render } from 'preact';
import { useEffect, useRef, useState } from 'preact/hooks';
import uPlot from 'uplot';

const html = htm.bind(h);
const CREDENTIAL = 'edge-mesh.console.credential';
const POLL_MS = 1000;
/** Points kept per plot: two minutes at one poll a second. */
const HISTORY = 120;
const COLORS = ['#2563eb', '#dc2626', '#16a34a', '#d97706', '#7c3aed', '#0891b2', '#db2777', '#4b5563'];

class ApiError extends Error {
  constructor(status, body) {
    super(body?.error ?? `HTTP ${status}`);
    this.status = status;
    this.code = body?.code;
  }
}

async function api(credential, path, init = {}) {
  const res = await fetch(path, {
    ...init,
    headers: { authorization: `Bearer ${credential}`, ...(init.body ? { 'content-type': 'application/json' } : {}) },
  });
  const body = await res.json().catch(() => undefined);
  if (!res.ok) throw new ApiError(res.status, body);
  return body;
}

/** The chain endpoints exist only on a router given --rpc and --escrow: a 404 there means "no chain", not a failure. */
async function optional(credential, path) {
  try {
    return await api(credential, path);
  } catch (err) {
    if (err.status === 404) return null;
    throw err;
  }
}

const micros = (n) => (n === null || n === undefined ? '–' : `$${(n / 1e6).toFixed(6)}`);
const ms = (n) => (n === null || n === undefined ? '–' : `${n.toFixed(1)} ms`);
const ago = (t) => (t ? `${Math.max(0, Math.round((Date.now() - t) / 1000))} s ago` : '–');
const short = (id) => (id && id.length > 18 ? `${id.slice(0, 14)}…` : (id ?? ''));

function Login({ onSave, error }) {
  const [value, setValue] = useState('');
  const submit = (event) => {
    event.preventDefault();
    if (value.trim() !== '') onSave(value.trim());
  };
  return html`<section class="login">
    <h1>edge-mesh console</h1>
    <p>Paste an API key (<code>edge-mesh api-key new --scopes read,operator</code>) or a mesh token. It stays in this tab only.</p>
    <form onSubmit=${submit}>
      <input type="password" data-testid="credential" autocomplete="off" placeholder="meshkey.…" value=${value} onInput=${(e) => setValue(e.currentTarget.value)} />
      <button type="submit" data-testid="sign-in">Open</button>
    </form>
    ${error ? html`<p class="error" data-testid="login-error">${error}</p>` : null}
  </section>`;
}

/** A uPlot chart; rebuilt when its series change (an agent joins or leaves), otherwise fed new data. */
function Chart({ title, labels, data, bars = false, xLabels, testid }) {
  const box = useRef(null);
  const plot = useRef(null);
  // A bar plot is rebuilt when its categories change too (its x range is their count).
  const key = [...labels, ...(xLabels ?? [])].join('|');
  useEffect(() => {
    if (!box.current) return undefined;
    const width = Math.max(280, box.current.clientWidth || 480);
    const series = [
      {},
      ...labels.map((label, i) => ({
        label,
        stroke: COLORS[i % COLORS.length],
        width: 2,
        ...(bars ? { fill: `${COLORS[i % COLORS.length]}99`, paths: uPlot.paths.bars({ size: [0.6, 80] }), points: { show: false } } : {}),
      })),
    ];
    const options = {
      title,
      width,
      height: 200,
      series,
      scales: bars ? { x: { time: false, range: () => [-0.5, (xLabels?.length ?? 1) - 0.5] } } : {},
      axes: bars ? [{ values: (_u, splits) => splits.map((i) => xLabels?.[i] ?? ''), space: 60 }, {}] : [{}, {}],
    };
    plot.current = new uPlot(options, data, box.current);
    return () => {
      plot.current?.destroy();
      plot.current = null;
    };
  }, [key, bars]);
  useEffect(() => {
    plot.current?.setData(data);
  }, [data]);
  return html`<div class="chart" data-testid=${testid} ref=${box}></div>`;
}

function Fleet({ agents, routing, history }) {
  const ids = history.ids;
  return html`<section data-testid="fleet">
    <h2>Fleet <small>${agents.filter((a) => a.up).length} live of ${agents.length}</small></h2>
    ${
      routing
        ? html`<p class="counters" data-testid="counters">
          requests ${routing.counters.requests} · ok ${routing.counters.ok} · failed ${routing.counters.failed} · retries ${routing.counters.retries} ·
          hedges ${routing.counters.hedges} · leases ${routing.counters.leases} · policy ${routing.policy}
        </p>`
        : null
    }
    <table>
      <thead><tr><th>agent</th><th>state</th><th>hardware</th><th>models</th><th>in flight</th><th>RTT</th><th>failure rate</th><th>ejected</th><th>seen</th></tr></thead>
      <tbody>
        ${agents.map(
          (a) => html`<tr key=${a.id} data-testid="agent-row" data-agent=${a.id} class=${a.up ? 'up' : 'down'}>
            <td title=${a.id}><code>${short(a.id)}</code><div class="dim">${a.version ?? ''}</div></td>
            <td><span class=${`badge ${a.up ? 'ok' : 'bad'}`}>${a.up ? 'up' : a.state}</span></td>
            <td>${a.hardware ? html`${a.hardware.platform}/${a.hardware.arch} · ${a.hardware.cpus} CPU · ${Math.round(a.hardware.memoryMb / 1024)} GiB<div class="dim">${a.hardware.cpuModel}</div>` : '–'}</td>
            <td>${a.models.map((m) => html`<div key=${`${m.name}@${m.version}`}>${m.name}@${m.version} <span class="dim">${ms(m.latencyMs)} · ${m.priceMicros ?? 0} µ$</span></div>`)}</td>
            <td>${a.load ? `${a.load.reportedInFlight} (${a.load.outstanding} ours)` : '–'}</td>
            <td>${a.load ? ms(a.load.rttMs) : '–'}</td>
            <td>${a.load ? `${(a.load.pFail * 100).toFixed(1)} %` : '–'}</td>
            <td>${a.load?.ejected ? html`<span class="badge bad">ejected</span>` : 'no'}</td>
            <td>${ago(a.load?.lastSeenMs)}</td>
          </tr>`,
        )}
      </tbody>
    </table>
    <div class="charts">
      <${Chart} title="Round trip per agent (ms)" labels=${ids.map(short)} data=${history.rtt} testid="chart-rtt" />
      <${Chart} title="Requests in flight per agent" labels=${ids.map(short)} data=${history.load} testid="chart-load" />
    </div>
  </section>`;
}

function Admissions({ admissions, act, busy }) {
  const canAct = admissions.admin !== null;
  return html`<section data-testid="admissions">
    <h2>Admissions</h2>
    ${
      canAct
        ? html`<p class="dim">Admissions are signed with operator key <code>${admissions.admin.operator}</code>. Check a request's id against the one its device prints (<code>edge-mesh keys show</code>) before admitting: its name is the requester's own words.</p>`
        : html`<p class="dim">Read-only: this router has no operator key for admissions (<code>edge-mesh router --admin-key</code>).</p>`
    }
    <h3>Pending</h3>
    ${
      admissions.pending.length === 0
        ? html`<p class="dim" data-testid="no-pending">No join requests.</p>`
        : html`<table><thead><tr><th>id</th><th>role</th><th>name (unverified)</th><th>asked</th><th></th></tr></thead><tbody>
          ${admissions.pending.map(
            (p) => html`<tr key=${p.id} data-testid="pending-row" data-id=${p.id}>
              <td><code>${p.id}</code></td><td>${p.role}</td><td class="name">${p.name}</td><td>${ago(p.requestedMs)}</td>
              <td><button disabled=${!canAct || busy} data-testid="admit" onClick=${() => act('admit', p.id)}>Admit</button></td>
            </tr>`,
          )}
        </tbody></table>`
    }
    <h3>Admitted here</h3>
    ${
      admissions.admitted.length === 0
        ? html`<p class="dim">None admitted from this router.</p>`
        : html`<table><thead><tr><th>id</th><th>role</th><th>name</th><th>admitted</th><th>expires</th><th></th></tr></thead><tbody>
          ${admissions.admitted.map(
            (e) => html`<tr key=${e.id} data-testid="admitted-row" data-id=${e.id}>
              <td><code>${e.id}</code></td><td>${e.role}</td><td class="name">${e.name}</td><td>${ago(e.atMs)}</td>
              <td>${new Date(e.expiresMs).toISOString().slice(0, 10)}</td>
              <td><button class="danger" disabled=${!canAct || busy} data-testid="revoke" onClick=${() => act('revoke', e.id)}>Revoke</button></td>
            </tr>`,
          )}
        </tbody></table>`
    }
    <h3>Revoked here</h3>
    ${
      admissions.revoked.length === 0
        ? html`<p class="dim">None revoked from this router.</p>`
        : html`<table><thead><tr><th>id</th><th>role</th><th>name</th><th>revoked</th></tr></thead><tbody>
          ${admissions.revoked.map(
            (e) =>
              html`<tr key=${e.id} data-testid="revoked-row" data-id=${e.id}><td><code>${e.id}</code></td><td>${e.role ?? ''}</td><td class="name">${e.name}</td><td>${ago(e.atMs)}</td></tr>`,
          )}
        </tbody></table>`
    }
    <h3>Agents on the mesh</h3>
    <table><thead><tr><th>id</th><th>state</th><th></th></tr></thead><tbody>
      ${admissions.seen.map(
        (a) => html`<tr key=${a.id} data-testid="seen-row" data-id=${a.id}><td><code>${a.id}</code></td><td>${a.up ? 'up' : a.state}</td>
          <td><button class="danger" disabled=${!canAct || busy} data-testid="revoke-seen" onClick=${() => act('revoke', a.id)}>Revoke</button></td></tr>`,
      )}
    </tbody></table>
  </section>`;
}

function Money({ lanes, settlements, earnings }) {
  const owners = earnings?.owners ?? [];
  const labels = owners.map((o) => (o.payout ? short(o.payout) : 'no payout'));
  const bars = [owners.map((_o, i) => i), owners.map((o) => o.quoted_micros)];
  return html`<section data-testid="earnings">
    <h2>Earnings per device owner</h2>
    <p class="dim">Requests served through this router and their value at each agent's quoted price; settled: what the escrow paid the owner's payout address${earnings?.chain ? '' : ' (no chain configured: edge-mesh router --rpc --escrow)'}.</p>
    <table><thead><tr><th>payout address</th><th>agents</th><th>requests</th><th>quoted</th><th>settled</th></tr></thead><tbody>
      ${owners.map(
        (
          o,
        ) => html`<tr key=${o.payout ?? '-'} data-testid="owner-row"><td><code>${o.payout ?? 'no payout (unpaid agents)'}</code></td><td>${o.agents.map((a) => html`<div key=${a}><code>${short(a)}</code></div>`)}</td>
          <td data-testid="owner-requests">${o.requests}</td><td>${micros(o.quoted_micros)}</td><td>${micros(o.settled_micros)}</td></tr>`,
      )}
    </tbody></table>
    ${owners.length > 0 ? html`<${Chart} title="Quoted value served per owner (µ$)" labels=${['quoted µ$']} data=${bars} bars=${true} xLabels=${labels} testid="chart-earnings" />` : null}
    <h2>Lanes</h2>
    ${
      lanes === null
        ? html`<p class="dim" data-testid="no-chain">No chain configured on this router.</p>`
        : html`<table data-testid="lanes"><thead><tr><th>payer</th><th>payout</th><th>agents</th><th>remaining</th><th>settled</th><th>withdrawing</th></tr></thead><tbody>
          ${lanes.lanes.map(
            (
              l,
            ) => html`<tr key=${`${l.payer}:${l.payout}`}><td><code>${short(l.payer)}</code></td><td><code>${short(l.payout)}</code></td><td>${l.agents.map(short).join(', ')}</td>
              <td>${micros(l.remaining_micros)}</td><td>${micros(l.settled_micros)}</td><td>${micros(l.withdraw_micros)}</td></tr>`,
          )}
        </tbody></table>`
    }
    <h2>Settlements</h2>
    ${
      settlements === null
        ? html`<p class="dim">No chain configured on this router.</p>`
        : html`<p>Settled ${micros(settlements.settled_micros)}, relayer fees ${micros(settlements.fees_micros)}.</p>
        <table data-testid="settlements"><thead><tr><th>block</th><th>kind</th><th>payer</th><th>payout</th><th>amount</th><th>tx</th></tr></thead><tbody>
          ${settlements.settlements
            .slice(-50)
            .reverse()
            .map(
              (
                s,
              ) => html`<tr key=${`${s.tx}:${s.payer}:${s.payout}`}><td>${s.block}</td><td>${s.kind}${s.reason ? ` (${s.reason})` : ''}</td><td><code>${short(s.payer)}</code></td>
              <td><code>${short(s.payout)}</code></td><td>${micros(s.delta_micros ?? 0)}</td><td><code>${short(s.tx)}</code></td></tr>`,
            )}
        </tbody></table>`
    }
  </section>`;
}

/** Appends one poll to the plots' history; a plot's series are the agents seen in the window. */
function record(history, agents) {
  const t = Date.now() / 1000;
  const points = [...history.points, { t, by: new Map(agents.map((a) => [a.id, a])) }].slice(-HISTORY);
  const ids = [...new Set(points.flatMap((p) => [...p.by.keys()]))].sort();
  const column = (pick) => ids.map((id) => points.map((p) => (p.by.has(id) ? pick(p.by.get(id)) : null)));
  const xs = points.map((p) => p.t);
  return {
    points,
    ids,
    rtt: [xs, ...column((a) => a.load?.rttMs ?? null)],
    load: [xs, ...column((a) => (a.up ? (a.load?.reportedInFlight ?? 0) : null))],
  };
}

const EMPTY_HISTORY = { points: [], ids: [], rtt: [[]], load: [[]] };

function Console({ credential, signOut }) {
  const [state, setState] = useState(null);
  const [history, setHistory] = useState(EMPTY_HISTORY);
  const [error, setError] = useState(null);
  const [notice, setNotice] = useState(null);
  const [busy, setBusy] = useState(false);
  const [updated, setUpdated] = useState(null);
  const tick = useRef(0);

  const refresh = async () => {
    const n = tick.current++;
    try {
      const [agents, routing, admissions, earnings] = await Promise.all([
        api(credential, '/v1/agents'),
        api(credential, '/v1/routing'),
        api(credential, '/v1/admissions'),
        api(credential, '/v1/earnings'),
      ]);
      // The chain is slower to read and changes by the block: every fifth poll.
      const chain = !earnings.chain
        ? [null, null]
        : n % 5 === 0 || state === null
          ? await Promise.all([optional(credential, '/v1/lanes'), optional(credential, '/v1/settlements')])
          : undefined;
      setState((old) => ({
        agents: agents.agents,
        routing,
        admissions,
        earnings,
        lanes: chain ? chain[0] : (old?.lanes ?? null),
        settlements: chain ? chain[1] : (old?.settlements ?? null),
      }));
      setHistory((h0) => record(h0, agents.agents));
      setError(null);
      setUpdated(new Date());
    } catch (err) {
      if (err.status === 401 || err.status === 403) signOut(`${err.message} (${err.code ?? err.status})`);
      else setError(err.message);
    }
  };

  useEffect(() => {
    refresh();
    const timer = setInterval(refresh, POLL_MS);
    return () => clearInterval(timer);
  }, [credential]);

  const act = async (what, id) => {
    setBusy(true);
    try {
      await api(credential, `/v1/admissions/${what}`, { method: 'POST', body: JSON.stringify({ id }) });
      setNotice(`${what === 'admit' ? 'Admitted' : 'Revoked'} ${id}`);
      await refresh();
    } catch (err) {
      setNotice(`${what} failed: ${err.message}`);
    } finally {
      setBusy(false);
    }
  };

  return html`<div>
    <header>
      <h1>edge-mesh console</h1>
      ${state ? html`<span>router <code>${short(state.routing.router)}</code> · broker ${state.routing.connected ? 'connected' : 'disconnected'}</span>` : null}
      <span class="dim" data-testid="updated">${updated ? `updated ${updated.toLocaleTimeString()}` : 'loading…'}</span>
      <button onClick=${() => signOut()}>Sign out</button>
    </header>
    ${error ? html`<p class="error" data-testid="error">${error}</p>` : null}
    ${notice ? html`<p class="notice" data-testid="notice">${notice}</p>` : null}
    ${
      state
        ? html`<${Fleet} agents=${state.agents} routing=${state.routing} history=${history} />
        <${Admissions} admissions=${state.admissions} act=${act} busy=${busy} />
        <${Money} lanes=${state.lanes} settlements=${state.settlements} earnings=${state.earnings} />`
        : null
    }
  </div>`;
}

function App() {
  const [credential, setCredential] = useState(() => sessionStorage.getItem(CREDENTIAL));
  const [loginError, setLoginError] = useState(null);
  const save = (value) => {
    sessionStorage.setItem(CREDENTIAL, value);
    setLoginError(null);
    setCredential(value);
  };
  const signOut = (why) => {
    sessionStorage.removeItem(CREDENTIAL);
    setLoginError(why ?? null);
    setCredential(null);
  };
  return credential
    ? html`<${Console} credential=${credential} signOut=${signOut} />`
    : html`<${Login} onSave=${save} error=${loginError} />`;
}

const root = document.getElementById('app');
root.textContent = '';
render(html`<${App} />`, root);
