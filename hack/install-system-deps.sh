#!/usr/bin/env bash
# Installs the Debian packages the test suite's real servers need, only when missing.
set -euo pipefail
need=()
# command -> Debian package
declare -A packages=(
  [ip]=iproute2
  [/usr/sbin/sshd]=openssh-server
  [ssh-keygen]=openssh-client
  [dockerd]=docker.io
  [debootstrap]=debootstrap
  [mvn]=maven
  [javac]=openjdk-17-jdk-headless
  # The test node: containerd and runc run its pods; the CNI plugins give them a network.
  [containerd]=containerd
  [runc]=runc
  [/usr/lib/cni/bridge]=containernetworking-plugins
  # JupyterLab in a real browser: Debian's headless Chromium and its WebDriver.
  [chromium]=chromium
  [chromedriver]=chromium-driver
)
for cmd in "${!packages[@]}"; do
  command -v "$cmd" >/dev/null 2>&1 || [[ -x "$cmd" ]] || need+=("${packages[$cmd]}")
done
# The ssh test hosts' shared environment is a venv of Debian's own python3.
/usr/bin/python3 -c 'import ensurepip, venv' >/dev/null 2>&1 || need+=(python3 python3-venv)
# R kernels: R and IRkernel, for the ssh hosts (they share this machine's files).
Rscript -e 'library(IRkernel)' >/dev/null 2>&1 || need+=(r-base-core r-cran-irkernel)
if ((${#need[@]})); then
  echo "Installing Debian packages: ${need[*]}"
  sudo_cmd=""; [[ $(id -u) -eq 0 ]] || sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq --no-install-recommends "${need[@]}"
fi
