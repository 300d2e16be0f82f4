/**
 * The paid side of an agent, opened only when it takes payment: the receipt journal, lane grants and
 * the credit rule (payments.ts) over the escrow's view of the lanes (lane-funds.ts) and, when asked,
 * the settlement relayer (settler.ts). Both load here, on
 * demand: with ethers, level and the escrow bindings they are most of the agent's JavaScript, and an
 * unpaid agent on a small device should not hold them (docs/agent.md).
 */
import type { Identity } from '@edge-mesh/protocol';
import type { Logger } from 'pino';
import type { ManifestEntry } from './manifest.ts';
import type { AgentPaymentOptions, AgentPayments } from './payments.ts';
import type { Settler } from './settler.ts';
import type { AgentHandle } from './types.ts';

export interface PaidSide {
  payments: AgentPayments;
  settler: Settler | undefined;
}

/** Opens the journal, then the relayer if `payment.settle` is set; on failure closes what it opened. */
export async function openPaidSide(
  identity: Identity,
  payment: AgentPaymentOptions,
  entries: ManifestEntry[],
  logger: Logger,
): Promise<PaidSide> {
  const { AgentPayments } = await import('./payments.ts');
  const payments = await AgentPayments.open(identity, payment, entries, logger);
  if (!payment.settle) {
    // Credit is given against money on the lane, but only a settlement moves it to the payout: a payer can withdraw
    // whatever nobody settled once its thaw ends. Without a settler here, settling is someone else's job.
    logger.warn(
      { payout: payments.payout },
      'taking payment with no settlement (--settle or --relay): vouchers this agent holds are paid only if something else settles them before the payer withdraws',
    );
    return { payments, settler: undefined };
  }
  try {
    const { Settler } = await import('./settler.ts');
    const settler = await Settler.start(
      {
        payout: payments.payout,
        domain: payments.domain,
        dataDir: payment.dataDir,
        lanes: () => payments.durableVoucherLanes(),
        logger,
        ...(payment.provider ? { provider: payment.provider } : {}),
      },
      payment.settle,
    );
    return { payments, settler };
  } catch (err) {
    await payments.close();
    throw err;
  }
}

/** The handle's `payments` view of the paid side. */
export function paymentsView({ payments, settler }: PaidSide): NonNullable<AgentHandle['payments']> {
  return {
    lanes: () => payments.lanesSummary(),
    catchUpFunds: () => payments.funds.catchUp(),
    funds: () => ({ checkpoint: payments.funds.checkpoint(), counters: { ...payments.funds.counters } }),
    receipts: (payer: string) => payments.receipts(payer),
    counters: payments.counters,
    get voucherSignaturesChecked() {
      return payments.voucherSignaturesChecked;
    },
    get grantSignaturesChecked() {
      return payments.grantSignaturesChecked;
    },
    ...(settler
      ? {
          settler: {
            counters: settler.counters,
            settlements: () => settler.settlements(),
            settledByLane: () => settler.settledByLane(),
            settleNow: () => settler.settleNow(),
          },
        }
      : {}),
  };
}

/** Closes the relayer, then the journal. */
export async function closePaidSide({ payments, settler }: PaidSide): Promise<void> {
  await settler?.close();
  await payments.close();
}
