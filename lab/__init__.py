"""The lab: everything that proves and measures the pack but is not the pack.

The ComfyUI host harness, model fixtures and the trained reference models, the benchmarks,
the demo and the example-workflow generator. It imports the pack as ``comfyui_accel``; the pack
never imports it (tests/unit/test_layering.py), and the Registry package leaves it out
(.comfyignore, .gitattributes).
"""
