/**
 * The validators the build generates from schemas.ts (validators.generated.ts, see
 * scripts/generate-validators.ts): a standalone check function per schema, compiled ahead of time
 * with TypeBox's `TypeCompiler.Code`, and the schema as a plain object. Checking loads no TypeBox.
 *
 * Only describing a value that failed its check does: `Errors` loads TypeBox's error walker on first
 * use (synchronously, from its CommonJS build, so sync decoders can still throw a precise message) and
 * runs it over the plain schema, which carries TypeBox's Kind markers (global symbols). The messages are
 * the ones `TypeCompiler.Compile(schema).Errors(value)` gives.
 */
import { createRequire } from 'node:module';
import type { TSchema } from '@sinclair/typebox';
import type { ValueErrorIterator } from '@sinclair/typebox/errors';

export interface Validator<T> {
  /** The schema, a plain copy of the TypeBox one (global-symbol Kind markers included). */
  readonly schema: TSchema;
  /** True when the value matches the schema: the generated code, no TypeBox. */
  Check(value: unknown): value is T;
  /** What is wrong with a value, in TypeBox's words; loads TypeBox on first use (the error path only). */
  Errors(value: unknown): ValueErrorIterator;
}

type ErrorsModule = typeof import('@sinclair/typebox/errors');
let errorsModule: ErrorsModule | undefined;

/** TypeBox's error walker, loaded when a value first fails a check. */
function typeboxErrors(): ErrorsModule {
  errorsModule ??= createRequire(import.meta.url)('@sinclair/typebox/errors') as ErrorsModule;
  return errorsModule;
}

/** A validator from a generated check function and its schema (used by the generated modules). */
export function validator<T>(schema: TSchema, check: (value: unknown) => boolean): Validator<T> {
  return {
    schema,
    Check: check as (value: unknown) => value is T,
    Errors: (value) => typeboxErrors().Errors(schema, [], value),
  };
}

/** The first problem of a value a validator refused, as `path: message` ('/' for the root). */
export function firstError(validator: Validator<unknown>, value: unknown): string {
  const first = validator.Errors(value).First();
  return first ? `${first.path || '/'}: ${first.message}` : 'schema mismatch';
}
