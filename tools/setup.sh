#!/usr/bin/env bash
# Installs what regsync needs on a fresh Debian machine of this kind, idempotently:
# Debian packages (gdb for the gdb tests, binutils/gcc for the guest and layout
# checks, linux-libc-dev for <linux/kvm.h>) and a venv with regsync + test deps.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v gdb >/dev/null || need+=(gdb)
command -v as >/dev/null && command -v ld >/dev/null || need+=(binutils)
command -v gcc >/dev/null || need+=(gcc)
[ -f /usr/include/linux/kvm.h ] || need+=(linux-libc-dev)
# QEMU for the conformance tests (regsync.board: the same kernels under both), with
# its firmware: qboot.rom (qemu-system-data) and SeaBIOS (seabios, a dependency).
command -v qemu-system-x86_64 >/dev/null && [ -f /usr/share/qemu/qboot.rom ] || need+=(qemu-system-x86)
if [ ${#need[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[test]"
