"""Benchmarks: speed, memory and fidelity, measured side by side in one run."""
