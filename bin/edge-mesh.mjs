#!/usr/bin/env node
// The package is TypeScript run with tsx: register its loader, then hand over to the CLI.
import { register } from 'tsx/esm/api';

register();
const { main } = await import('../cli/main.ts');
process.exitCode = await main(process.argv);
