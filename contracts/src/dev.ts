/** Development entry: compile the escrow with solc-js, run a local Hardhat 2 chain, deploy. */

export {
  connectRpc,
  DEFAULT_WITHDRAW_WINDOW_SECONDS,
  DEV_MNEMONIC,
  deployArtifact,
  deployMesh,
  type LocalChain,
  type MeshDeployment,
  type StartChainOptions,
  startLocalChain,
} from './chain.ts';
export { type Artifact, type Artifacts, artifact, BUILD_DIR, CONTRACTS_DIR, compileContracts, SOLC_SETTINGS } from './compile.ts';
