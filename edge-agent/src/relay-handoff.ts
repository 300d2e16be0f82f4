/**
 * Handing vouchers to a relay (docs/settlement.md, "The relay"): the agent POSTs its due lanes' best
 * vouchers to `<relay>/v1/relay/vouchers` and needs no gas of its own. The relay's answer is only a hint
 * (which vouchers it says it took, and why it refused the others); whether a lane was settled is read from
 * the chain, as for the agent's own settlements, and a relay that does not settle in time is replaced by the
 * next one (settler.ts).
 */

import { MeshError } from '@edge-mesh/protocol';

/** One voucher as the relay takes it. */
export interface RelayedVoucher {
  payer: string;
  agent: string;
  cumulative: string;
  feeCumulative: string;
  receiptsRoot: string;
  sig: string;
}

export interface RelayAnswer {
  payer: string;
  accepted: boolean;
  reason: string | undefined;
}

/**
 * Posts vouchers to one relay; resolves with its answer per voucher, or throws when it cannot be reached or answers
 * badly (MESH_INTERNAL). `credential` goes as `Authorization: Bearer` (a router with HTTP auth on wants one with the
 * `relay` scope: an API key, `meshkey.<id>.<secret>`).
 */
export async function postToRelay(
  relayUrl: string,
  vouchers: readonly RelayedVoucher[],
  timeoutMs = 10_000,
  credential?: string,
): Promise<RelayAnswer[]> {
  const res = await fetch(new URL('/v1/relay/vouchers', relayUrl), {
    method: 'POST',
    headers: { 'content-type': 'application/json', ...(credential ? { authorization: `Bearer ${credential}` } : {}) },
    body: JSON.stringify({ vouchers }),
    signal: AbortSignal.timeout(timeoutMs),
  });
  const text = await res.text();
  const bad: (why: string) => never = (why) => {
    throw new MeshError('MESH_INTERNAL', `relay ${relayUrl} ${why}`, { details: { relay: relayUrl } });
  };
  if (!res.ok) bad(`answered ${res.status}: ${text.slice(0, 200)}`);
  let body: unknown;
  try {
    body = JSON.parse(text);
  } catch {
    bad('answered something that is not JSON');
  }
  const results = (body as { results?: unknown }).results;
  if (!Array.isArray(results) || results.length !== vouchers.length) bad('answered without one result per voucher');
  return results.map((r, i) => {
    const o = (typeof r === 'object' && r !== null ? r : {}) as { accepted?: unknown; reason?: unknown };
    return {
      payer: vouchers[i]!.payer,
      accepted: o.accepted === true,
      reason: typeof o.reason === 'string' ? o.reason.slice(0, 64) : undefined,
    };
  });
}
