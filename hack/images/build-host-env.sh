#!/usr/bin/env bash
# Builds the Python environment the suite's ssh test hosts share, as a cluster's hosts share
# a /opt/conda: Debian's python3 (readable by every account, unlike a Python under /root),
# ipykernel and our launcher. Cached under .cache/hosts, keyed by the hash of this script, the
# project's metadata and the launcher's sources. Prints the environment's path on its last line.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
python="${HOST_PYTHON:-/usr/bin/python3}"
key="$(cat "$0" "$root/pyproject.toml" $(find "$root/launchers" -name '*.py' | sort) | sha256sum | cut -c1-12)"
cache="$root/.cache/hosts"
env="$cache/env-$key"
if [[ -f "$env/.complete" ]]; then
  echo "The hosts' Python environment $env is already built." >&2
  echo "$env"
  exit 0
fi
mkdir -p "$cache"
rm -rf "$env"
echo "Building the ssh test hosts' Python environment (ipykernel + launcher) in $env..." >&2
"$python" -m venv "$env"
"$env/bin/pip" install -q ipykernel pyzmq cryptography >&2
"$env/bin/pip" install -q --no-deps "$root" >&2
chmod -R a+rX "$env"
touch "$env/.complete"
# One environment at a time: drop the ones built from older sources.
for old in "$cache"/env-*; do
  [[ "$old" == "$env" ]] || rm -rf "$old"
done
echo "$env"
