#!/usr/bin/env bash
# Builds a kernel image locally (no registry is reachable): a Debian bookworm rootfs made with
# debootstrap from Debian's mirror, a venv with ipykernel and our launcher, imported into the
# Docker engine named by DOCKER_HOST. With argument "r", also Debian's R and IRkernel (the R
# kernel image); with "scala", Debian's Java 17 and, from PyPI, pyspark (Spark 3.5.3, Scala 2.12)
# and toree (Apache Toree's assembly jar), which the launcher finds beside it; with
# "gp-bootstrap", an image as gateway_provisioners' `jupyter-image-bootstrap` makes one (its
# launchers and bootstrap-kernel.sh as the entry point), plus the one line that lets our operator
# use it: `pip install` of this project's wheel. Cached: the rootfs under .cache/images, the image tag keyed by the hash of
# this script and the launcher's sources, so it is rebuilt only when those change. Prints the
# image reference on its last line.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
language="${1:-python}"
case "$language" in
  python) extra_packages="" ;;
  r) extra_packages="r-base-core r-cran-irkernel" ;;
  scala) extra_packages="openjdk-17-jre-headless" ;;
  gp-bootstrap) extra_packages="" ;;
  *) echo "usage: $0 [python|r|scala|gp-bootstrap]" >&2; exit 2 ;;
esac
key="$(cat "$0" "$here/base-rootfs.sh" "$root/pyproject.toml" $(find "$root/launchers" -name '*.py' | sort) | sha256sum | cut -c1-12)"
image="rko-kernel-$language:$key"
if docker image inspect "$image" >/dev/null 2>&1; then
  echo "The kernel image $image is already built." >&2
  echo "$image"
  exit 0
fi
cache="$root/.cache/images"
base="$(bash "$here/base-rootfs.sh" | tail -n 1)"
work="$cache/build-$key"
rm -rf "$work"
echo "Copying the base rootfs..." >&2
cp -a "$base" "$work"
# Wheels are fetched by this machine's pip (its index and certificates are set up here) and
# installed offline in the chroot; bookworm's python3 is 3.11, as the wheels must match.
echo "Fetching wheels (ipykernel, pyzmq, cryptography) and building the project's..." >&2
wheels="$work/tmp/wheels"
mkdir -p "$wheels"
python3 -m pip download -q --only-binary=:all: --python-version 3.11 --platform manylinux2014_x86_64 \
  --implementation cp -d "$wheels" ipykernel pyzmq cryptography >&2
python3 -m pip wheel -q --no-deps -w "$wheels" "$root" >&2
if [[ "$language" == gp-bootstrap ]]; then
  python3 -m pip download -q --only-binary=:all: --python-version 3.11 --platform manylinux2014_x86_64 \
    --implementation cp -d "$wheels" gateway_provisioners==0.5.0 >&2
fi
if [[ "$language" == scala ]]; then
  # sdists on PyPI: built into wheels here (pip caches them), installed without their Python
  # dependencies (the kernel is Toree's JVM; the launcher needs only Spark's files and the jar).
  python3 -m pip wheel -q --no-deps -w "$wheels" pyspark==3.5.3 toree==0.5.0 >&2
fi
echo "Installing ipykernel and the launcher into /opt/kernel..." >&2
chroot "$work" python3 -m venv /opt/kernel
chroot "$work" /bin/sh -c '/opt/kernel/bin/pip install -q --no-index --find-links /tmp/wheels ipykernel pyzmq cryptography' >&2
if [[ "$language" == gp-bootstrap ]]; then
  # As an image built for gateway_provisioners: its launchers and its bootstrap script...
  chroot "$work" /bin/sh -c '/opt/kernel/bin/pip install -q --no-index --find-links /tmp/wheels gateway_provisioners' >&2
  chroot "$work" /opt/kernel/bin/jupyter-image-bootstrap install --languages=Python >&2
  test -f "$work/usr/local/bin/bootstrap-kernel.sh"  # (0.5.0 copies it without its execute bit)
fi
# ...and the one line such an image needs for this operator: our wheel (the launcher).
chroot "$work" /bin/sh -c '/opt/kernel/bin/pip install -q --no-index --no-deps /tmp/wheels/remote_kernel_operator-*.whl' >&2
if [[ "$language" == scala ]]; then
  chroot "$work" /bin/sh -c '/opt/kernel/bin/pip install -q --no-index --no-deps --find-links /tmp/wheels pyspark toree' >&2
fi
rm -rf "$wheels"
# A fixed path for the launcher as a Spark application's main file (SparkApplication kernels).
chroot "$work" /bin/sh -c 'mkdir -p /usr/local/lib/rko && ln -s "$(/opt/kernel/bin/python -c "import kernel_launchers, os; print(os.path.dirname(kernel_launchers.__file__))")/spark_driver.py" /usr/local/lib/rko/spark_driver.py' >&2
if [[ -n "$extra_packages" ]]; then
  echo "Installing $extra_packages from Debian into the image (a minute or two)..." >&2
  cp /etc/resolv.conf "$work/etc/resolv.conf"
  # Java's package scripts run java, which needs /proc.
  mount -t proc proc "$work/proc"
  trap 'umount "$work/proc" 2>/dev/null || true' EXIT
  chroot "$work" apt-get update -qq >&2
  chroot "$work" /bin/sh -c "DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $extra_packages" >&2
  chroot "$work" apt-get clean
  umount "$work/proc"
  rm -rf "$work/var/lib/apt/lists"/* "$work/etc/resolv.conf"
fi
chroot "$work" /usr/sbin/useradd --create-home --uid 1000 jovyan >&2
echo "Importing $image into the Docker engine..." >&2
cmd='["/opt/kernel/bin/python", "-m", "kernel_launchers.python_launcher", "--help"]'
[[ "$language" == gp-bootstrap ]] && cmd='["/usr/local/bin/bootstrap-kernel.sh"]'  # as GP's images have
tar -C "$work" --numeric-owner -c . | docker import \
  --change 'ENV PATH=/opt/kernel/bin:/usr/local/bin:/usr/bin:/bin' \
  --change 'WORKDIR /home/jovyan' \
  --change "CMD $cmd" \
  - "$image" >&2
rm -rf "$work"
# One kernel image per engine: drop the ones built from older sources.
for old in $(docker images --format '{{.Repository}}:{{.Tag}}' "rko-kernel-$language" | grep -vx "$image"); do
  docker rmi "$old" >/dev/null 2>&1 || true
done
echo "$image"
