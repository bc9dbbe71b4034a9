#!/usr/bin/env bash
# Builds the kubelet for the test node from the Kubernetes Go modules and caches it under
# .cache/node/<version>-<key>/, keyed by the hash of this folder's sources, as
# hack/cluster/build.sh does for the control plane (whose Go build cache makes this one fast:
# about 30 s warm, several minutes cold on 2 cores). Also builds Kubernetes' pause program
# (build/pause/linux/pause.c from the same module) statically, for the pods' sandbox image.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
version="$(sed -n 's/^\tk8s.io\/kubernetes \(v[0-9.]*\)$/\1/p' "$here/go.mod")"
key="$(cat "$here/go.mod" "$here/go.sum" "$here/main.go" "$here/build.sh" | sha256sum | cut -c1-12)"
out="$root/.cache/node/$version-$key"
if [[ -x "$out/kubelet" && -x "$out/pause" ]]; then
  echo "kubelet $version is cached at $out/kubelet"
  ln -sfn "$out" "$root/.cache/node/current"
  exit 0
fi
command -v go >/dev/null || { echo "build.sh: Go is not installed; install Go 1.26 or newer." >&2; exit 1; }
command -v gcc >/dev/null || { echo "build.sh: gcc is needed for the pause program." >&2; exit 1; }
echo "Building the kubelet $version."
start=$(date +%s)
(cd "$here" && go mod download)
mkdir -p "$out"
minor="${version#v1.}"; minor="${minor%%.*}"
ldflags="-s -w"
for kv in "gitVersion=$version" "gitMajor=1" "gitMinor=$minor" "gitTreeState=clean" \
          "buildDate=$(date -u +%Y-%m-%dT%H:%M:%SZ)"; do
  ldflags+=" -X k8s.io/component-base/version.$kv -X k8s.io/client-go/pkg/version.$kv"
done
(cd "$here" && go build -v -trimpath -ldflags "$ldflags" -o "$out/kubelet.tmp" . 2>&1) |
  awk '/^# |\.go:[0-9]+|^go: / {print; fflush(); next}
       {n++; if (n % 200 == 0) {printf "  ... %d packages compiled\n", n; fflush()}}'
[[ -x "$out/kubelet.tmp" ]] || { echo "build.sh: the kubelet build failed; see above." >&2; exit 1; }
mv "$out/kubelet.tmp" "$out/kubelet"
module="$(cd "$here" && go list -m -f '{{.Dir}}' k8s.io/kubernetes)"
gcc -Os -static -DVERSION="$version" -o "$out/pause" "$module/build/pause/linux/pause.c"
strip "$out/pause"
find "$root/.cache/node" -maxdepth 1 -type d -name 'v*' ! -path "$out" -exec rm -rf {} +
ln -sfn "$out" "$root/.cache/node/current"
echo "Built $out/kubelet and $out/pause in $(( $(date +%s) - start )) s."
