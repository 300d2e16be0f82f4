#!/bin/sh
# Builds the Debian package of the agent role, edge-mesh-agent_VERSION_ARCH.deb (docs/operations.md,
# "Installing an agent from the Debian package"). Run after `npm run build`:
#
#   ARCH=amd64 packaging/deb/build-agent.sh [OUT_DIR]      # ARCH amd64 (default) or arm64
#
# OUT_DIR defaults to packaging/deb/out (ignored by git). The package holds the compiled CLI, the packages
# the `edge-mesh agent` command loads and their dependencies, installed from `npm pack` tarballs with
# `npm install --omit=dev --omit=peer`, and only ARCH's native binaries. DEB_COMPRESS picks dpkg-deb's
# compressor (default xz, which every dpkg reads). Layout follows the Debian policy manual (chapter 10,
# "Files"; 10.7.3, "Behavior" of conffiles) and systemd.exec(5)/systemd.service(5) for the unit.
set -eu
umask 022

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
arch=${ARCH:-amd64}
case "$arch" in
  amd64) ort=x64 ;;
  arm64) ort=arm64 ;;
  *) echo "build-agent.sh: ARCH must be amd64 or arm64, not $arch" >&2; exit 64 ;;
esac
out=${1:-$here/out}
compress=${DEB_COMPRESS:-xz}
command -v dpkg-deb >/dev/null 2>&1 || { echo "build-agent.sh: dpkg-deb not found (Debian package dpkg)" >&2; exit 69; }
[ -f "$repo/cli/dist/main.js" ] || { echo "build-agent.sh: the CLI is not built; run npm run build first" >&2; exit 70; }

version=$(node -p "require('$repo/package.json').version")
work=$(mktemp -d "${TMPDIR:-/tmp}/edge-mesh-deb.XXXXXX")
trap 'rm -rf "$work"' EXIT
root="$work/root"
lib="$root/usr/lib/edge-mesh"
mkdir -p "$work/tarballs" "$work/stage" "$lib" "$out"

# 1. The workspace packages as npm publishes them.
(cd "$repo" && npm pack -w protocol -w client -w contracts -w edge-agent -w cli --pack-destination "$work/tarballs" --silent >/dev/null)

# 2. The agent's runtime: protocol, client, contracts and agent from their tarballs with their registry
# dependencies, plus the CLI's own dependencies. The CLI itself is unpacked beside them rather than
# installed, so its dependencies on the other roles (broker, router, sdk, bridge, demo and the bundled
# models) stay out; the commands that need them report a missing module.
node - "$repo" "$work" <<'JS'
const fs = require('node:fs');
const path = require('node:path');
const [repo, work] = process.argv.slice(2);
const tarballs = fs.readdirSync(path.join(work, 'tarballs'));
const tarball = (prefix) => `file:${path.join(work, 'tarballs', tarballs.find((f) => f.startsWith(prefix)))}`;
const cli = require(path.join(repo, 'cli/package.json'));
const dependencies = {
  '@edge-mesh/protocol': tarball('edge-mesh-protocol-'),
  '@edge-mesh/client': tarball('edge-mesh-client-'),
  '@edge-mesh/contracts': tarball('edge-mesh-contracts-'),
  '@edge-mesh/agent': tarball('edge-mesh-agent-'),
};
for (const [name, range] of Object.entries(cli.dependencies)) if (!name.startsWith('@edge-mesh/')) dependencies[name] = range;
fs.writeFileSync(path.join(work, 'stage/package.json'), JSON.stringify({ name: 'edge-mesh-agent-stage', private: true, dependencies }, null, 2));
JS
# onnxruntime-node's postinstall would download CUDA libraries; the CPU binaries ship in the package.
(cd "$work/stage" && ONNXRUNTIME_NODE_INSTALL=skip npm install --omit=dev --omit=peer --prefer-offline --no-audit --no-fund --silent >/dev/null)
mv "$work/stage/node_modules" "$lib/node_modules"
rm -rf "$lib/node_modules/.bin" "$lib/node_modules/.package-lock.json"
mkdir -p "$lib/node_modules/@edge-mesh/cli"
tar -xzf "$work/tarballs"/edge-mesh-cli-*.tgz -C "$lib/node_modules/@edge-mesh/cli" --strip-components=1
printf '{ "name": "edge-mesh-agent", "version": "%s", "private": true, "type": "module" }\n' "$version" >"$lib/package.json"

# 3. Only ARCH's native binaries: onnxruntime-node's per-platform folders, and any other prebuilt addon
# (classic-level, under `level`) whose ELF machine is not ARCH's.
ortbin="$lib/node_modules/onnxruntime-node/bin/napi-v6"
for dir in "$ortbin"/*/*; do
  [ "$dir" = "$ortbin/linux/$ort" ] || rm -rf "$dir"
done
find "$ortbin" -mindepth 1 -type d -empty -delete
find "$lib/node_modules" -type d -name prebuilds | while read -r prebuilds; do
  for dir in "$prebuilds"/*; do
    [ "$(basename "$dir")" = "linux-$ort" ] || rm -rf "$dir"
  done
done
# classic-level's C++ sources, for building the addon where no prebuild fits; the prebuild above does.
rm -rf "$lib/node_modules/classic-level/deps"
# ELF header: magic at 0, e_machine (little-endian) at 18: 3e 00 for x86-64, b7 00 for aarch64.
machine=$([ "$arch" = amd64 ] && echo "7f454c463e00" || echo "7f454c46b700")
find "$lib/node_modules" -type f \( -name '*.node' -o -name '*.so' -o -name '*.so.*' -o -name '*.dylib' -o -name '*.dll' -o -name '*.exe' \) | while read -r bin; do
  head=$(od -An -tx1 -N20 "$bin" | tr -d ' \n')
  # classic-level ships a musl build beside the glibc one; Debian is glibc.
  case "$bin" in */prebuilds/*musl*) head= ;; esac
  if [ "$(printf %s "$head" | cut -c1-8)$(printf %s "$head" | cut -c37-40)" != "$machine" ]; then
    echo "build-agent.sh: leaving out $bin (not a linux $arch glibc binary)" >&2
    rm -f "$bin"
  fi
done

# 4. The commands, the unit, the configuration and the maintainer scripts.
install -D -m 0755 "$here/agent/edge-mesh-agent" "$root/usr/bin/edge-mesh-agent"
install -D -m 0755 "$here/agent/edge-mesh" "$root/usr/bin/edge-mesh"
install -D -m 0644 "$here/agent/edge-mesh-agent.service" "$root/lib/systemd/system/edge-mesh-agent.service"
install -D -m 0644 "$here/agent/agent.json" "$root/etc/edge-mesh/agent.json"
install -D -m 0644 "$here/agent/sysusers.conf" "$root/usr/lib/sysusers.d/edge-mesh-agent.conf"
mkdir -p "$root/DEBIAN" "$root/usr/share/doc/edge-mesh-agent"
cp "$repo/docs/operations.md" "$root/usr/share/doc/edge-mesh-agent/operations.md"
for script in postinst prerm postrm; do install -m 0755 "$here/agent/$script" "$root/DEBIAN/$script"; done
echo /etc/edge-mesh/agent.json >"$root/DEBIAN/conffiles"
size=$(du -sk --exclude=DEBIAN "$root" | cut -f1)
sed -e "s/@VERSION@/$version/" -e "s/@ARCH@/$arch/" -e "s/@SIZE@/$size/" "$here/agent/control" >"$root/DEBIAN/control"

deb="$out/edge-mesh-agent_${version}_${arch}.deb"
dpkg-deb --root-owner-group -Z"$compress" --build "$root" "$deb" >/dev/null
echo "$deb"
