"""pgolf: Triton kernels, model, training, quantization and exact evaluation for parameter golf."""
__version__ = "0.1.0"

BOS_ID = 1
"""Every document starts with BOS (id 1); there is no EOS (CHALLENGE.md)."""
