#!/usr/bin/env bash
# Makes sure headless OpenGL works for moderngl (EGL + Mesa's llvmpipe on a CPU machine).
# Installs Debian's libegl1 and libgl1-mesa-dri when missing and we are root; else says what to do.
set -u
PY=${1:-python3}
probe() { "$PY" -c "import moderngl; moderngl.create_standalone_context(backend='egl').release()" 2>/dev/null; }
probe && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "Installing libegl1 and libgl1-mesa-dri for headless rendering..."
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libegl1 libgl1-mesa-dri) >/dev/null
  probe && exit 0
fi
cat >&2 <<MSG
error: headless OpenGL (EGL) is not available, so the renderer cannot run.
  Debian/Ubuntu: sudo apt-get install -y libegl1 libgl1-mesa-dri
  Other systems: install your distribution's EGL loader and Mesa (llvmpipe) or a GPU driver with EGL.
MSG
exit 1
