#!/usr/bin/env bash
# Run a Python command on an emulated x86-64 processor (QEMU's user mode), to check what adaedge
# computes where ONNX Runtime, NumPy and torch choose other kernels than on this machine.
#
#   tests/emulated_cpu.sh [--cpu Haswell|Nehalem] -- python -m pytest -q tests/test_portability.py
#
# Haswell: AVX2 + FMA, no AVX-512, no VNNI (adaedge's class x86-avx2); Nehalem: SSE4.2 only
# (x86-sse). About 15x slower than native: run small checks. .ci/run runs the portability check
# with it after the suite.
#
# It fails (exit 2, one line saying why) rather than skip when it cannot emulate: qemu-user
# missing and not installable (it installs Debian's qemu-user with apt-get when it runs as root),
# a command that is not Python, or an emulated processor that does not read as the class asked
# for (a check that silently ran natively would pass for the wrong reason). The command runs
# with ADAEDGE_EXPECT_PROCESSOR set to that class; tests/test_portability.py asserts it.
#
# QEMU runs one binary: a launcher script (a pyenv shim, a venv's bash wrapper) would exec the
# real interpreter natively, so the interpreter is resolved first (sys.executable).
set -euo pipefail
cpu=Haswell
while [ $# -gt 0 ]; do
  case "$1" in
    --cpu) cpu=${2:?--cpu needs a model}; shift 2 ;;
    --) shift; break ;;
    -h|--help) sed -n '2,19p' "$0"; exit 0 ;;
    *) break ;;
  esac
done
fail() { echo "emulated_cpu: $*: the emulated check did NOT run" >&2; exit 2; }
[ $# -gt 0 ] || fail "give a command after --"
case "$cpu" in
  Haswell) class=x86-avx2 ;;
  Nehalem) class=x86-sse ;;
  *) fail "--cpu must be Haswell or Nehalem, not $cpu" ;;
esac
[ "$(uname -m)" = x86_64 ] || fail "this emulates x86-64 processors on an x86-64 host, not $(uname -m)"
if ! command -v qemu-x86_64 >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "emulated_cpu: installing qemu-user (apt-get)" >&2
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq qemu-user) \
      >/dev/null 2>&1 || fail "apt-get install qemu-user failed"
  fi
  command -v qemu-x86_64 >/dev/null 2>&1 || fail "qemu-x86_64 is not installed (apt-get install qemu-user)"
fi
case "$(basename "$1")" in
  python*) ;;
  *) fail "the command must be a Python interpreter (python -m ...), not $1" ;;
esac
python=$("$1" -c 'import sys; print(sys.executable)') || fail "cannot run $1"
shift
head -c 4 "$python" | grep -q ELF || fail "$python is not an executable QEMU can run"
emulate() { qemu-x86_64 -cpu "$cpu" "$python" "$@" 2> >(grep -v "TCG doesn't support requested feature" >&2); }
seen=$(emulate -c 'from adaedge.runtime.processor import detected_class; print(detected_class())') \
  || fail "adaedge does not import under emulation"
[ "$seen" = "$class" ] || fail "the emulated $cpu reads as $seen, not $class"
echo "emulated_cpu: running on an emulated $cpu ($class): $python $*" >&2
unset ADAEDGE_PROCESSOR        # the detected class, never an override
export ADAEDGE_EXPECT_PROCESSOR=$class
emulate "$@"
