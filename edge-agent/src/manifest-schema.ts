/**
 * The schema of a models folder's `manifest.json` (manifest.ts), as TypeBox: the single source of its
 * shape and type. Nothing on the running path imports this file (only the generator, tests and
 * `import type`): the build compiles it into manifest.generated.ts (protocol/scripts/generate-validators.ts),
 * so the agent checks manifests without loading TypeBox.
 */
import { type Static, Type } from '@sinclair/typebox';

const WarmupInput = Type.Object(
  {
    shape: Type.Optional(Type.Array(Type.Integer({ minimum: 0 }), { maxItems: 8 })),
    fill: Type.Optional(Type.Number()),
  },
  { additionalProperties: false },
);

export const ManifestEntrySchema = Type.Object(
  {
    name: Type.String({ pattern: '^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$' }),
    version: Type.String({ minLength: 1, maxLength: 64 }),
    file: Type.String({ minLength: 1, maxLength: 255 }),
    sha256: Type.String({ pattern: '^[0-9a-f]{64}$' }),
    priceMicros: Type.Integer({ minimum: 0 }),
    notes: Type.Optional(Type.String({ maxLength: 1024 })),
    warmup: Type.Optional(Type.Record(Type.String(), WarmupInput)),
    /**
     * The model runs in units (docs/agent.md, "Models that run in units"): a request's inputs carry N
     * units along their leading dimension (1 ≤ N ≤ maxUnits), each unit one run of the model, and
     * `priceMicros` is the price of one unit. A progress message (and on a paid request a `partial`
     * receipt) goes out after every `progressEvery` units (default 1).
     */
    units: Type.Optional(
      Type.Object(
        {
          maxUnits: Type.Integer({ minimum: 2, maximum: 65_536 }),
          progressEvery: Type.Optional(Type.Integer({ minimum: 1, maximum: 65_536 })),
        },
        { additionalProperties: false },
      ),
    ),
  },
  { additionalProperties: false },
);
export type ManifestEntry = Static<typeof ManifestEntrySchema>;

export const ManifestSchema = Type.Object(
  { models: Type.Array(ManifestEntrySchema, { minItems: 1, maxItems: 256 }) },
  { additionalProperties: true },
);
export type Manifest = Static<typeof ManifestSchema>;
