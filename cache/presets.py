"""Published TeaCache rescale coefficients, per model, and the settings they were published with.

From the official TeaCache repository (ali-vilab/TeaCache) and the ComfyUI-TeaCache pack
(shared/research/caching.md §1.2–1.4), highest power first (``numpy.polyval`` order).
``signal``: what the polynomial was fitted on (``modulated``: the first block's modulated image
input; ``vec``: the modulation/time vector it receives, Wan's "ret-steps" ``e0`` sets).
``threshold``: the published setting for about 2x; ``warmup_steps``: the steps the published
mode always computes.
"""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Preset:
    name: str
    family: str
    signal: str
    coefficients: tuple[float, ...]
    threshold: float
    warmup_steps: int = 1
    note: str = ""


PRESETS: dict[str, Preset] = {p.name: p for p in (
    Preset("flux", "flux", "modulated",
           (4.98651651e+02, -2.83781631e+02, 5.58554382e+01, -3.82021401e+00, 2.64230861e-01), 0.4,
           note="FLUX.1 dev/schnell; 0.25 ~1.5x, 0.4 ~1.8-2x, 0.6 ~2x (28 steps)"),
    Preset("flux_kontext", "flux", "modulated",
           (-1.04655119e+03, 3.12563399e+02, -1.69500694e+01, 4.10995971e-01, 3.74537863e-02), 0.22,
           note="FLUX.1 Kontext (ComfyUI-TeaCache); recommended with start 0.2, end 0.9"),
    Preset("hunyuan_video", "hunyuan_video", "modulated",
           (7.33226126e+02, -4.01131952e+02, 6.75869174e+01, -3.14987800e+00, 9.61237896e-02), 0.15,
           note="HunyuanVideo (1.0); 0.1 ~1.6x, 0.15 ~2.1x"),
    Preset("ltxv", "ltxv", "modulated",
           (2.14700694e+01, -1.28016453e+01, 2.31279151e+00, 7.92487521e-01, 9.69274326e-03), 0.05,
           note="LTX-Video 0.9.1 (2B); 0.03 ~1.6x, 0.05 ~2.1x"),
    Preset("mochi", "mochi", "modulated",
           (-3.51241319e+03, 8.11675948e+02, -6.09400215e+01, 2.42429681e+00, 3.05291719e-03), 0.09,
           note="Mochi; 0.06 ~1.5x, 0.09 ~2.1x"),
    Preset("wan21_t2v_1.3b", "wan", "vec",
           (-5.21862437e+04, 9.23041404e+03, -5.28275948e+02, 1.36987616e+01, -4.99875664e-02), 0.15,
           warmup_steps=5, note="Wan 2.1 T2V 1.3B, ret-steps (e0) set; official 0.05 ~1.6x, "
                                "0.10 ~2.4x; ComfyUI-TeaCache recommends 0.15 (~2.2x)"),
    Preset("wan21_t2v_14b", "wan", "vec",
           (-3.03318725e+05, 4.90537029e+04, -2.65530556e+03, 5.87365115e+01, -3.15583525e-01), 0.2,
           warmup_steps=5, note="Wan 2.1 T2V 14B, ret-steps (e0) set; also the usual stand-in for "
                                "Wan 2.2 A14B, which has no published set (calibrate for best results)"),
    Preset("wan21_i2v_480p_14b", "wan", "vec",
           (2.57151496e+05, -3.54229917e+04, 1.40286849e+03, -1.35890334e+01, 1.32517977e-01), 0.3,
           warmup_steps=5, note="Wan 2.1 I2V 480p 14B, ret-steps (e0) set"),
    Preset("wan21_i2v_720p_14b", "wan", "vec",
           (8.10705460e+03, 2.13393892e+03, -3.72934672e+02, 1.66203073e+01, -4.17769401e-02), 0.3,
           warmup_steps=5, note="Wan 2.1 I2V 720p 14B, ret-steps (e0) set"),
)}
