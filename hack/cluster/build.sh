#!/usr/bin/env bash
# Builds the local control plane binary (kcluster) from the Kubernetes Go modules and caches
# it under .cache/cluster/<version>/, keyed by the hash of this folder's sources, so a warm
# machine skips the build. Prints progress; a cold build takes several minutes on 2 cores.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
version="$(sed -n 's/^\tk8s.io\/kubernetes \(v[0-9.]*\)$/\1/p' "$here/go.mod")"
key="$(cat "$here/go.mod" "$here/go.sum" "$here/main.go" "$here/build.sh" | sha256sum | cut -c1-12)"
out="$root/.cache/cluster/$version-$key"
bin="$out/kcluster"
if [[ -x "$bin" ]]; then
  echo "kcluster $version is cached at $bin"
  ln -sfn "$out" "$root/.cache/cluster/current"
  exit 0
fi
command -v go >/dev/null || { echo "build.sh: Go is not installed; install Go 1.26 or newer." >&2; exit 1; }
echo "Building kcluster (kube-apiserver, kube-controller-manager, kube-scheduler, etcd) $version."
echo "Downloading modules through the Go module proxy..."
start=$(date +%s)
(cd "$here" && go mod download)
echo "Compiling (the first build takes several minutes; the Go build cache makes later ones fast)..."
mkdir -p "$out"
minor="${version#v1.}"; minor="${minor%%.*}"
ldflags="-s -w"
for kv in "gitVersion=$version" "gitMajor=1" "gitMinor=$minor" "gitTreeState=clean" \
          "buildDate=$(date -u +%Y-%m-%dT%H:%M:%SZ)"; do
  ldflags+=" -X k8s.io/component-base/version.$kv -X k8s.io/client-go/pkg/version.$kv"
done
# Progress: go build -v names each package as it is compiled; print a count every 100.
(cd "$here" && go build -v -trimpath -ldflags "$ldflags" -o "$bin.tmp" . 2>&1) |
  awk '/^# |\.go:[0-9]+|^go: / {print; fflush(); next}
       {n++; if (n % 200 == 0) {printf "  ... %d packages compiled\n", n; fflush()}}'
[[ -x "$bin.tmp" ]] || { echo "build.sh: the build failed; see the messages above." >&2; exit 1; }
mv "$bin.tmp" "$bin"
# Keep one build per machine: drop binaries of older sources or versions.
find "$root/.cache/cluster" -maxdepth 1 -type d -name 'v*' ! -path "$out" -exec rm -rf {} +
ln -sfn "$out" "$root/.cache/cluster/current"
echo "Built $bin in $(( $(date +%s) - start )) s."
