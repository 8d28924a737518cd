"""Hessians, GPTQ, clipping, low-bit packing, compression and the artifact."""
