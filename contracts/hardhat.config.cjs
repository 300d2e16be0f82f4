// Minimal Hardhat 2 config for the local dev chain started by contracts/chain.ts (`hardhat node`).
// Contracts are compiled by contracts/compile.ts (solc-js), never by Hardhat.
const count = Number(process.env.MESH_CHAIN_ACCOUNTS || 20);
module.exports = {
  solidity: '0.8.28',
  paths: { root: __dirname, sources: './.hardhat/none', cache: './.hardhat/cache', artifacts: './.hardhat/artifacts' },
  networks: {
    hardhat: {
      chainId: Number(process.env.MESH_CHAIN_ID || 31337),
      hardfork: 'cancun',
      accounts: {
        mnemonic: 'test test test test test test test test test test test junk',
        count,
        accountsBalance: '10000000000000000000000',
      },
      mining: { auto: true, interval: 0 },
      blockGasLimit: 30_000_000,
      loggingEnabled: false,
    },
  },
};
