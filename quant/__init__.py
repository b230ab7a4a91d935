"""Quantization formats, calibration, SVD low-rank branches, QuantLinear, checkpoint I/O.

No ComfyUI import at module level."""
