"""Fused kernels for the decode step (Triton). Optional: nothing in neverfade imports them yet, and Triton is not a
dependency; `decode_attention` needs it installed."""
