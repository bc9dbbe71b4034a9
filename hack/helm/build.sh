#!/usr/bin/env bash
# Builds the helm CLI from its Go module (no release download is reachable) and caches it
# under .cache/helm/<version>/helm, so a warm machine skips the build. Prints the binary's path
# on its last line; progress goes to stderr.
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
version="${HELM_VERSION:-v3.22.0}"
out="$root/.cache/helm/$version"
bin="$out/helm"
if [[ -x "$bin" ]]; then
  echo "helm $version is cached at $bin" >&2
  echo "$bin"
  exit 0
fi
command -v go >/dev/null || { echo "helm/build.sh: Go is not installed; install Go 1.24 or newer." >&2; exit 1; }
echo "Building helm $version from helm.sh/helm/v3 (a few minutes on 2 cores, once)..." >&2
start=$(date +%s)
mkdir -p "$out"
# The version string helm prints comes from ldflags, as in helm's own Makefile.
GOBIN="$out/.bin" go install -trimpath \
  -ldflags "-s -w -X helm.sh/helm/v3/internal/version.version=$version" \
  "helm.sh/helm/v3/cmd/helm@$version" >&2
mv "$out/.bin/helm" "$bin"
rmdir "$out/.bin"
# Keep one build per machine.
find "$root/.cache/helm" -mindepth 1 -maxdepth 1 -type d ! -path "$out" -exec rm -rf {} +
echo "Built $bin in $(( $(date +%s) - start )) s." >&2
echo "$bin"
