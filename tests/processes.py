"""Spawned worker processes for the distributed tests (DDP, FSDP2): wait for them with a deadline."""
import time

import pytest


def join_or_fail(context, seconds: float, what: str) -> None:
    """Wait for the processes of an ``mp.spawn(..., join=False)`` context; a worker's exception is re-raised by
    ``join``, and past ``seconds`` the workers are killed and the test fails naming ``what``."""
    deadline = time.monotonic() + seconds
    while not context.join(timeout=2):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"the {what} workers did not finish within {seconds:.0f} s")
