/**
 * The escrow's bindings: its ABI, a typed ethers client and the voucher checks that need secp256k1.
 * Compiling the Solidity and running a local chain live under `@edge-mesh/contracts/dev`, which a
 * device never loads.
 */
export { ERC20_ABI, ESCROW_ABI } from './abi.ts';
export * from './escrow.ts';
export * from './follow.ts';
export { recoverLaneGrantSigner, recoverVoucherSigner } from './vouchers.ts';
