"""Codebooks, k-means, VQ encode/decode, token files."""
