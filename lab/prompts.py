"""API-format prompts for the fixture models: loader -> [our nodes] -> KSampler -> SaveLatent.

Used by the end-to-end tests, the demo and the benchmarks, so every caller builds the
same graph. ``chain`` is a list of ``(class_type, inputs)`` applied in order on the
MODEL path; each node's MODEL output (index 0) feeds the next one's ``model`` input.
"""
from __future__ import annotations

from lab.fixtures import FixtureInfo


def sampling_prompt(info: FixtureInfo, *, seed: int = 0, steps: int = 10, cfg: float = 2.0,
                    sampler: str = "euler", scheduler: str = "simple", chain=(),
                    prefix: str = "accel", cond_seed: int = 0, batch: int = 1,
                    model_info: bool = False) -> dict:
    """The prompt and its node ids: model "1", chain "10".., sampler "5", save "6",
    and with ``model_info`` an ``AccelTestModelInfo`` "7" showing the final model's weight bytes."""
    prompt: dict[str, dict] = {
        "1": {"class_type": info.loader_node, "inputs": dict(info.loader_inputs)},
        "2": {"class_type": "AccelTestConditioning",
              "inputs": {"family": info.family, "size": info.size, "seed": cond_seed, "batch": 1, "tokens": 0}},
        "3": {"class_type": "AccelTestConditioning",
              "inputs": {"family": info.family, "size": info.size, "seed": cond_seed + 1, "batch": 1, "tokens": 0}},
        "4": {"class_type": info.empty_latent_node, "inputs": {**info.empty_latent_inputs, "batch_size": batch}},
    }
    model = ["1", 0]
    for i, (class_type, inputs) in enumerate(chain):
        node_id = str(10 + i)
        prompt[node_id] = {"class_type": class_type, "inputs": {**inputs, "model": model}}
        model = [node_id, 0]
    prompt["5"] = {"class_type": "KSampler", "inputs": {
        "model": model, "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0],
        "seed": seed, "steps": steps, "cfg": cfg, "sampler_name": sampler, "scheduler": scheduler,
        "denoise": 1.0}}
    prompt["6"] = {"class_type": "SaveLatent", "inputs": {"samples": ["5", 0], "filename_prefix": prefix}}
    if model_info:
        prompt["7"] = {"class_type": "AccelTestModelInfo", "inputs": {"model": model}}
    return prompt


def read_latent(path) -> "torch.Tensor":  # noqa: F821
    """The tensor SaveLatent wrote (a .latent file is safetensors with ``latent_tensor``)."""
    from safetensors.torch import load_file
    return load_file(str(path))["latent_tensor"]


# Widget inputs of AccelQuantizeModel at their schema defaults (tests check they match).
QUANTIZE_DEFAULTS = {"format": "int8", "group_size": 64, "compute_dtype": "auto", "smooth_alpha": 0.5,
                     "calibration_steps": 8, "seed": 0, "cfg": 5.0, "auto_formats": "int8, w4a8, int4",
                     "auto_budget": 0.35, "auto_min_sqnr_db": 0.0, "layer_overrides": ""}


def quantize_step(**inputs) -> tuple[str, dict]:
    """An AccelQuantizeModel step for ``sampling_prompt``'s chain; ``inputs`` override the defaults
    (e.g. ``format="int4"``, or ``positive=["2", 0], negative=["3", 0], latent=["4", 0]`` to
    calibrate on the prompt's own conditioning and latent)."""
    return ("AccelQuantizeModel", {**QUANTIZE_DEFAULTS, **inputs})


# Widget inputs of AccelSVDLowRankBranch at their schema defaults (tests check they match).
SVD_DEFAULTS = {"rank": 32, "smooth_alpha": 0.5, "search_alpha": False, "svd": "randomized", "report_format": "w4a4", "group_size": 64,
                "calibration_steps": 8, "seed": 0, "cfg": 5.0, "layer_overrides": ""}


def svd_step(**inputs) -> tuple[str, dict]:
    """An AccelSVDLowRankBranch step for ``sampling_prompt``'s chain (``positive=["2", 0],
    negative=["3", 0], latent=["4", 0]`` calibrates on the prompt's own conditioning and latent)."""
    return ("AccelSVDLowRankBranch", {**SVD_DEFAULTS, **inputs})
