/** Development entry: compile the escrow with solc-js, run a local Hardhat 2 chain, deploy. */
export { compileContracts, artifact, BUILD_DIR, CONTRACTS_DIR, SOLC_SETTINGS, type Artifact, type Artifacts } from './compile.ts';
export { startLocalChain, connectRpc, deployMesh, deployArtifact, DEV_MNEMONIC, type LocalChain, type StartChainOptions, type MeshDeployment } from './chain.ts';
