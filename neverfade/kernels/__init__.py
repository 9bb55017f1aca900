"""Fused kernels for the decode step (Triton). Optional: Triton is not a dependency of neverfade (torch's CUDA wheels
bring it). The engine imports `decode_attention` only where it runs it (`neverfade.engine.attention.fused_row`)."""
