"""Quantization: weight formats, calibration, SVDQuant low-rank branches, QuantLinear, checkpoint I/O.

Modules import only those before them in: format_base, vq_format, formats, policy, qweight, lowrank,
linear, core, model, calibrate, auto, pipeline, svdquant, checkpoint. No ComfyUI import at module level.
"""
