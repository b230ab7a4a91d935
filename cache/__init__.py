"""Step caching: TeaCache, TaylorSeer and Forecast Cache for every ComfyUI model family.

``rules`` (the maths: schedule position, TeaCache's rule, fit and threshold search, Taylor
forecast), ``presets`` (published coefficients), ``adapters`` (per-family block facts, the UNet's
DeepCache containers), ``engine`` (wrappers, block hooks, per-run state, reports), ``profile``
(calibration). No ComfyUI import at module level.
"""
