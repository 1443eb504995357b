#!/usr/bin/env bash
# An AArch64 userland that runs llmc's cpu runtime under qemu user-mode emulation, on an x86-64
# Debian/Ubuntu host (root, for apt-get). Idempotent: every step is skipped once its result exists.
#
#   LLMC_AARCH64_ROOT=~/.cache/llmc-aarch64 scripts/aarch64_qemu.sh
#
# Result, under $LLMC_AARCH64_ROOT (default ~/.cache/llmc-aarch64):
#   sysroot/   a Debian bookworm arm64 tree (python3.11, libstdc++), unpacked, not configured
#   site/      the aarch64 wheels the runtime imports (apache-tvm, numpy, tokenizers, jinja2)
#   python     a wrapper: `$LLMC_AARCH64_ROOT/python script.py` runs the arm64 python3 under
#              qemu-aarch64-static with site/ and the llmc checkout on its path
# binfmt_misc is not needed (containers rarely have it): qemu is invoked explicitly with -L.
set -euo pipefail

ROOT="${LLMC_AARCH64_ROOT:-$HOME/.cache/llmc-aarch64}"
SUITE="${LLMC_AARCH64_SUITE:-bookworm}"           # its python3 must match --python-version below
PYVER="${LLMC_AARCH64_PYVER:-3.11}"
MIRROR="${LLMC_AARCH64_MIRROR:-http://deb.debian.org/debian}"
REPO="$(cd "$(dirname "$0")/.." && pwd)"
# the runtime's imports (runtime/*.py) and TVM's own requirements, pinned like pyproject.toml
WHEELS=(apache-tvm==0.27.0.post1 apache-tvm-ffi ml_dtypes typing_extensions numpy tokenizers jinja2 markupsafe)

mkdir -p "$ROOT"

need=()
command -v qemu-aarch64-static >/dev/null || need+=(qemu-user-static)
command -v debootstrap >/dev/null || need+=(debootstrap)
if ((${#need[@]})); then
  echo "installing ${need[*]}" >&2
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi

# 1. the arm64 tree: debootstrap's first stage only downloads and unpacks (the second stage
#    would run arm64 maintainer scripts, which needs binfmt_misc); the packages it left in the
#    apt cache are unpacked too, which is all python needs.
if [ ! -e "$ROOT/sysroot/.unpacked" ]; then
  rm -rf "$ROOT/sysroot"
  debootstrap --arch arm64 --foreign --variant=minbase --include=python3,libstdc++6,libgomp1,ca-certificates \
    "$SUITE" "$ROOT/sysroot" "$MIRROR" >&2
  for deb in "$ROOT"/sysroot/var/cache/apt/archives/*.deb; do
    dpkg-deb -x "$deb" "$ROOT/sysroot"
  done
  touch "$ROOT/sysroot/.unpacked"
fi

# 2. the wheels, built for manylinux aarch64 and this python, into one target directory
if [ ! -e "$ROOT/site/.installed" ]; then
  rm -rf "$ROOT/site"
  python3 -m pip install -q --no-deps --only-binary=:all: --platform manylinux_2_28_aarch64 \
    --platform manylinux2014_aarch64 --platform manylinux_2_17_aarch64 --platform linux_aarch64 \
    --python-version "$PYVER" --implementation cp --target "$ROOT/site" "${WHEELS[@]}" >&2
  touch "$ROOT/site/.installed"
fi

# 3. the wrapper
cat > "$ROOT/python" <<WRAP
#!/usr/bin/env bash
# arm64 python3 under qemu (written by scripts/aarch64_qemu.sh)
export PYTHONPATH="$ROOT/site:\${LLMC_AARCH64_PYTHONPATH:-$REPO}"
export PYTHONNOUSERSITE=1 PYTHONDONTWRITEBYTECODE=1
exec qemu-aarch64-static \${LLMC_QEMU_CPU:+-cpu \$LLMC_QEMU_CPU} -L "$ROOT/sysroot" "$ROOT/sysroot/usr/bin/python$PYVER" "\$@"
WRAP
chmod +x "$ROOT/python"

"$ROOT/python" -c "import platform, numpy, tvm; print(platform.machine(), 'numpy', numpy.__version__, 'tvm', tvm.__version__)"
echo "$ROOT/python"
