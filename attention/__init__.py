"""Sparse-attention policies and the attention-override installer."""
