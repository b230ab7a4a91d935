"""Triton kernels, each with a PyTorch reference and a dispatcher. Imports only torch and triton."""
