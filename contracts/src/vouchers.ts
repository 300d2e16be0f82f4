/** Voucher checks that need secp256k1 (ethers): recovering the voucher key from its signature. */
import {
  type EscrowDomain,
  type LaneGrantTerms,
  laneGrantDigest,
  splitVoucherSignature,
  type Voucher,
  voucherDigest,
} from '@edge-mesh/protocol';
import { ethers } from 'ethers';

/** The voucher key's address (the lane's signer), or throws MESH_VOUCHER_INVALID if the signature is malformed or high-s. */
export function recoverVoucherSigner(domain: EscrowDomain, v: Voucher, sig: string): string {
  const { r, s, v: recovery } = splitVoucherSignature(sig);
  return ethers.recoverAddress(voucherDigest(domain, v), { r, s, v: recovery });
}

/** The payer that signed a lane grant (lower-case), or throws MESH_VOUCHER_INVALID when the signature is malformed or high-s. */
export function recoverLaneGrantSigner(domain: EscrowDomain, grant: LaneGrantTerms, sig: string): string {
  const { r, s, v } = splitVoucherSignature(sig);
  return ethers.recoverAddress(laneGrantDigest(domain, grant), { r, s, v }).toLowerCase();
}
