#!/usr/bin/env bash
# Installs the compilers of `make port-check` (and, with --qemu, the emulator of `make test-aarch64`)
# from Debian's packages when they are missing: aarch64-linux-gnu-g++ (g++-aarch64-linux-gnu),
# clang++ (clang) and qemu-aarch64-static (qemu-user-static). Needs root and apt-get; otherwise, or
# with FASTREG_NO_APT=1, it says what is missing and exits 0 (the checks then skip those tools).
set -euo pipefail
declare -A PKG=([aarch64-linux-gnu-g++]=g++-aarch64-linux-gnu [clang++]=clang)
if [ "${1:-}" = "--qemu" ]; then PKG[qemu-aarch64-static]=qemu-user-static; fi
missing=()
for tool in "${!PKG[@]}"; do
  command -v "$tool" >/dev/null 2>&1 || missing+=("${PKG[$tool]}")
done
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "${FASTREG_NO_APT:-0}" = "1" ] || [ "$(id -u)" != "0" ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "[port-tools] missing: ${missing[*]} (install them with apt-get as root); the checks that need them are skipped"
  exit 0
fi
echo "[port-tools] installing ${missing[*]} (apt-get)"
export DEBIAN_FRONTEND=noninteractive
if ! { apt-get update -qq && apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null; }; then
  echo "[port-tools] apt-get failed; the checks that need ${missing[*]} are skipped"
fi
exit 0
