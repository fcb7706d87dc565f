"""Benchmark setup: Triton's interpreter on CPU-only machines, and the session-wide copy-bandwidth roofline."""
import pytest

from benchutil import measure_copy_bandwidth_gbps


@pytest.fixture(scope="session")
def copy_bandwidth_gbps():
    """Measured device-to-device copy bandwidth in GB/s (read + write bytes / time): the roofline."""
    return measure_copy_bandwidth_gbps()
