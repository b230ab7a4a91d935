"""Step caching: TeaCache and TaylorSeer for every ComfyUI model family, calibrated to a target speedup.

``rules`` (the maths: schedule position, TeaCache's rule, fit and threshold search, Taylor
forecast), ``presets`` (published coefficients), ``adapters`` (per-family block facts),
``unet`` (DeepCache-style hook for UNets), ``engine`` (wrappers, block hooks, per-run state,
reports), ``profile`` (calibration). No ComfyUI import at module level.
"""
