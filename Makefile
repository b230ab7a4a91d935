# ComfyUI-Accel developer commands. Each target sets up what it needs first.
# One environment per host ComfyUI, because hosts pin different frontend and kernel packages:
# .venv for the bundled 0.3.75, .venv-comfyui-<version> for a COMFYUI_PATH tree.
HOST_VERSION := $(if $(COMFYUI_PATH),$(shell sed -n 's/^__version__ = "\(.*\)"/\1/p' "$(COMFYUI_PATH)/comfyui_version.py" 2>/dev/null))
VENV ?= $(if $(COMFYUI_PATH),.venv-comfyui-$(or $(HOST_VERSION),unknown),.venv)
PY := $(VENV)/bin/python
export PYTHONPATH := $(CURDIR)/.host/pkgroot
export PYTHONUNBUFFERED := 1
# Timed runs: idle OpenMP threads sleep instead of spinning, so a busy machine does not turn every
# small op into a stall (int8 measured 5x slower than its real speed without it). Set it yourself to
# override.
demo bench bench-quick: export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: setup test demo bench bench-quick serve clean

setup:
	@VENV=$(VENV) scripts/setup.sh

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

demo: setup
	$(PY) -m lab.demo

bench: setup
	$(PY) -m lab.bench.run $(BENCH_ARGS)

bench-quick: setup
	$(PY) -m lab.bench.run --quick $(BENCH_ARGS)

serve: setup
	$(PY) -m lab.serve

clean:
	rm -rf out .pytest_cache
