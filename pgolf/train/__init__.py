"""Optimizers, schedules, averaging, the trainer and its logs."""
