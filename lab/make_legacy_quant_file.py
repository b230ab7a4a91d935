"""Writes tests/data/accel_v1_wan_tiny.safetensors: a Save Quantized Model file in format version 1 (every
format of ours, SmoothQuant factors, a low-rank branch), kept so that Load Quantized Model is tested on a file
the pack wrote before ComfyUI layouts were added. Run once with the pack as of that version; never rewrite it."""
import logging
import os

import torch

PATH = os.path.abspath("tests/data/accel_v1_wan_tiny.safetensors")


def main() -> None:
    # Only by hand, and never over the committed file: importing this module writes nothing.
    if os.path.exists(PATH):
        raise SystemExit(f"{PATH} exists; it is the file the old pack wrote, kept as it is")
    from lab import host, fixtures
    host.import_comfy()
    from lab.quant_checks import plans_for
    from comfyui_accel.quant import model as qmodel, checkpoint, calibrate, svdquant
    model = fixtures.load_model("wan21", "tiny")
    ov = ("^(text_embedding|time_embedding|time_projection)\\. = int4 weight_only\n"
          "blocks\\.0\\.self_attn = int8\nblocks\\.0\\.cross_attn\\.[qk]$ = fp8_e4m3\nblocks\\.0\\.cross_attn = nvfp4\n"
          "blocks\\.0\\.ffn = mxfp4\nblocks\\.1\\.self_attn = w4a8\nblocks\\.1\\.cross_attn = int8 weight_only\n"
          "blocks\\.1\\.ffn = int4\nblocks\\.2\\. = w4a4\nblocks\\.3\\. = nvfp4_w4a4")
    plans = plans_for(model, "int8", 64, ov)
    layers = [p.path for p in plans if p.spec is not None]
    stats = calibrate.calibrate(model, layers, fixtures.make_conditioning("wan21","tiny",seed=1),
                                fixtures.make_conditioning("wan21","tiny",seed=2), fixtures.empty_latent("wan21","tiny"), 2, 0, 3.0)
    branch_layers = [p for p in layers if p.startswith("blocks.2.")]
    branched = svdquant.branch_model(model, branch_layers, 16, 0.5, stats).model
    plans = plans_for(branched, "int8", 64, ov)
    res = qmodel.quantize_model(branched, plans, dtype=torch.bfloat16, stats=stats, smooth_alpha=0.5)
    info = checkpoint.save_model(res.model, PATH, overwrite=False, other_dtype=torch.bfloat16)
    logging.basicConfig(level=logging.INFO)
    logging.getLogger(__name__).info("%s; formats %s; %d smoothed layers", info, sorted({r.format for r in res.rows}),
                                     sum("smoothed" in r.reason for r in res.rows))


if __name__ == "__main__":
    main()
