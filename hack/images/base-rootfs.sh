#!/usr/bin/env bash
# A minimal Debian bookworm root filesystem with python3 3.11, made once with debootstrap from
# Debian's mirror (no image registry is reachable) and cached under .cache/images. The kernel
# and operator images start from it. Prints its path on the last line; progress on stderr.
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
mirror="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
base="$root/.cache/images/bookworm-minbase"
mkdir -p "$root/.cache/images"
if [[ ! -f "$base/.complete" ]]; then
  echo "debootstrap: a minimal Debian bookworm with python3 (a few minutes, once)..." >&2
  rm -rf "$base"
  debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
    bookworm "$base" "$mirror" >&2
  touch "$base/.complete"
fi
echo "$base"
