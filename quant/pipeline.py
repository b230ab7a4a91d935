"""The whole Quantize Model run: optional calibration, optional ``auto`` allocation, then the
layer-by-layer quantization of a clone (what the node calls after validating its inputs)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from . import auto, calibrate, formats, policy
from . import model as qmodel


@dataclass
class Calibration:
    """A short sampling run on the user's own conditioning and latent."""
    positive: list
    negative: list | None
    latent: dict
    steps: int
    seed: int
    cfg: float

    def run(self, patcher, layers: list[str], progress: Callable[[int], Callable[[int], None]]) -> dict:
        """``calibrate.LayerStats`` of ``layers``; the negative defaults to the positive."""
        negative = self.negative if self.negative is not None else self.positive
        return calibrate.calibrate(patcher, layers, self.positive, negative, self.latent, self.steps, self.seed,
                                   self.cfg, progress=progress(self.steps))


SMOOTHING_SKIPPED = "smoothing skipped: it needs the calibration inputs (positive, latent)"


@dataclass
class AutoOptions:
    candidates: list[str]
    budget_fraction: float | None
    min_sqnr_db: float | None


def uses_act_quant(plans: list[policy.LayerPlan], candidates: list[str]) -> bool:
    if candidates:
        return any(formats.get(c).act_bits is not None for c in candidates)
    return any(p.spec is not None and formats.get(p.spec.format).quantizes_activations(p.spec) for p in plans)


def run(patcher, plans: list[policy.LayerPlan], dtype: torch.dtype, group_size: int, smooth_alpha: float = 0.0,
        calibration: Calibration | None = None, auto_options: AutoOptions | None = None,
        progress: Callable[[int], Callable[[int], None]] = lambda total: None) -> qmodel.Result:
    """``progress(total)`` makes a step callback for each phase. Raises ``auto.BudgetError``
    when ``auto`` cannot meet its constraints. The result's summary carries the notices."""
    notices = []
    stats = None
    if calibration is not None:
        stats = calibration.run(patcher, [p.path for p in plans if p.spec is not None or p.auto], progress)
    elif smooth_alpha > 0 and uses_act_quant(plans, auto_options.candidates if auto_options else []):
        notices.append(SMOOTHING_SKIPPED)
    if auto_options is not None:
        if stats is None:
            notices.append("auto without calibration: sensitivity is the weight SQNR, not the output's")
        table = auto.measure(patcher, plans, auto_options.candidates, group_size, dtype, stats, smooth_alpha,
                             progress=progress(sum(p.auto for p in plans)))
        plans = auto.assign(plans, table, auto_options.budget_fraction, auto_options.min_sqnr_db)
    result = qmodel.quantize_model(patcher, plans, dtype=dtype, stats=stats, smooth_alpha=smooth_alpha,
                                   progress=progress(len(plans)))
    if stats:
        first = next(iter(stats.values()))
        result.summary["calibration"] = (f"{calibration.steps} steps, {first.calls} model calls, "
                                         f"{first.tokens} tokens")
    used = {r.format for r in result.rows} - {"keep"}
    notices += [n for n in (hardware_notice(f, patcher.load_device) for f in sorted(used)) if n]
    if notices:
        result.summary["notice"] = "; ".join(notices)
    return result


def hardware_notice(fmt: str, device: torch.device) -> str | None:
    if fmt == "fp8_e4m3" and not formats.fp8_matmul_available(device):
        return ("this device has no fp8 matmul (needs CUDA compute capability 8.9+): fp8 layers run "
                "weight-only, dequantized to the compute dtype")
    if fmt == "mxfp8" and not (device.type == "cuda" and torch.cuda.get_device_capability(device) >= (10, 0)):
        return "mxfp8 activations need an MXFP8 matmul (Blackwell GPUs): mxfp8 layers run weight-only here"
    if fmt in ("nvfp4", "mxfp4"):
        return "fp4 weights are dequantized for the matmul (no FP4 units are used)"
    if fmt == "nvfp4_w4a4":
        return ("fp4 weights and activations are decoded for the matmul (the fidelity of an FP4 GEMM; "
                "no FP4 units are used)")
    return None
