"""Spawned worker processes for the distributed tests (DDP, FSDP2, DeepSpeed): a free port for their rendezvous, and
waiting for them with a deadline."""
import socket
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


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now, for a process group's rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
