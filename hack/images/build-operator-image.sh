#!/usr/bin/env bash
# Builds the operator image from the Dockerfile at the repository root, locally: a base image
# imported from the cached Debian bookworm rootfs (no registry is reachable), and wheels fetched
# by this machine's pip into build/operator-image/wheels. Tagged remote-kernel-operator:<version>
# and remote-kernel-operator:<key>, the key hashing the Dockerfile, this script and the
# project's sources, so it is rebuilt only when those change. Prints the image reference on its
# last line; progress on stderr. Uses the Docker engine named by DOCKER_HOST.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
version="$(sed -n 's/^version = "\(.*\)"$/\1/p' "$root/pyproject.toml")"
key="$(cat "$0" "$root/Dockerfile" "$root/pyproject.toml" \
  $(find "$root/operator" "$root/launchers" -name '*.py' | sort) | sha256sum | cut -c1-12)"
image="remote-kernel-operator:$key"
if docker image inspect "$image" >/dev/null 2>&1; then
  echo "The operator image $image is already built." >&2
  docker tag "$image" "remote-kernel-operator:$version"
  echo "$image"
  exit 0
fi
base_rootfs="$(bash "$here/base-rootfs.sh" | tail -n 1)"
base="rko-base:bookworm"
if ! docker image inspect "$base" >/dev/null 2>&1; then
  echo "Importing the Debian bookworm rootfs as $base..." >&2
  tar -C "$base_rootfs" --numeric-owner --exclude=./.complete -c . | docker import - "$base" >&2
fi
wheels="$root/build/operator-image/wheels"
rm -rf "$wheels" && mkdir -p "$wheels"
echo "Fetching the operator's wheels (CPython 3.11, manylinux x86_64)..." >&2
python3 -m pip wheel -q --no-deps -w "$wheels" "$root" >&2
python3 -m pip download -q --only-binary=:all: --python-version 3.11 --implementation cp \
  --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 --platform any \
  --find-links "$wheels" -d "$wheels" "remote-kernel-operator[operator]==$version" >&2
echo "Building $image..." >&2
docker build -q --force-rm --build-arg BASE_IMAGE="$base" -t "$image" -t "remote-kernel-operator:$version" "$root" >&2
rm -rf "$root/build/operator-image"
# One operator image per engine: drop the ones built from older sources.
for old in $(docker images --format '{{.Repository}}:{{.Tag}}' remote-kernel-operator |
             grep -vx "$image" | grep -vx "remote-kernel-operator:$version"); do
  docker rmi "$old" >/dev/null 2>&1 || true
done
echo "$image"
