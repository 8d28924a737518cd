"""pgolf: Triton kernels, model, training, quantization and exact evaluation for parameter golf."""
import time as _time

__version__ = "0.1.0"

LAUNCH_TIME = _time.time()
"""When the process imported pgolf (its start, for the launch-to-first-step measurement)."""

LAUNCH_COMMAND: str | None = None
"""The `pgolf ...` command line this process runs (set by pgolf.cli.main), recorded in each run's config.json."""

BOS_ID = 1
"""Every document starts with BOS (id 1); there is no EOS (CHALLENGE.md)."""
