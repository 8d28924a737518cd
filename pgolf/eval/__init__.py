"""Exact val_bpb, sliding windows, test-time training, leak checks."""
