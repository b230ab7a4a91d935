"""Shared test setup.

Three layers: ``tests/unit`` (no ComfyUI), ``tests/integration`` (real ComfyUI imported
in-process on the CPU) and ``tests/e2e`` (a real ComfyUI server driven over HTTP).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

# Triton kernels run in Triton's CPU interpreter in tests; this must be set before
# anything imports triton.
os.environ.setdefault("TRITON_INTERPRET", "1")
# Test tensors are small: one thread avoids OpenMP start-up and barrier costs, which grow
# tenfold on a loaded machine. Inherited by the test servers too. Benchmarks do not set it.
os.environ.setdefault("OMP_NUM_THREADS", "1")

ROOT = Path(__file__).resolve().parents[1]
_pkgroot = str(ROOT / ".host" / "pkgroot")
if _pkgroot not in sys.path:  # `make test` sets PYTHONPATH; a bare `pytest` may not
    sys.path.insert(0, _pkgroot)

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def comfy():
    """Real ComfyUI, imported in-process (CPU mode when there is no GPU)."""
    from lab import host
    host.import_comfy()
    import comfy.model_management
    return comfy


@pytest.fixture(scope="session")
def quick_bench(comfy, tmp_path_factory):
    """``quick_bench(module, steps)``: a benchmark's quick path on the trained Flux reference, one
    timing round: (the subject, its output before the run, the records, the output folder)."""
    def run(bench, steps: int):
        from lab import sampling
        out = tmp_path_factory.mktemp(bench.__name__.rpartition(".")[2])
        subject = sampling.reference_subject("ref_flux", steps=steps)
        subject.timing_rounds = 1
        before = subject.sample(subject.model)
        return subject, before, bench.run(quick=True, out=out, subjects_=[subject]), out
    return run


@pytest.fixture(scope="session")
def comfy_server(tmp_path_factory):
    """One real ComfyUI server for the session, in its own base directory.

    Tests write the model files they need into ``comfy_server.models_dir``.
    """
    from lab import host
    server = host.ComfyServer(base_dir=tmp_path_factory.mktemp("comfy-base"))
    server.start()
    yield server
    server.stop()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    # Show the server's log beside any failing test that used the server.
    outcome = yield
    report = outcome.get_result()
    if report.when == "call" and report.failed and "comfy_server" in item.fixturenames:
        server = item.funcargs.get("comfy_server")
        if server is not None:
            report.sections.append(("ComfyUI server log (last lines)", server.log_tail(80)))
