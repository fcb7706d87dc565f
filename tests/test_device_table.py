"""benchmarks/device_table.py: a GPU run's measured fractions beside the static model's, and the measured issue
efficiency (issue 23) from made-up records whose expected values are worked out here."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import device_table  # noqa: E402


def _records():
    # two kernels run one after the other (NoisyTune's statistics and noise passes), fp32 on an H200's constants
    return {
        "noisytune.stats[fp32]": dict(bytes_per_element=4.0, predicted_fraction=1.0, calibrated_fraction=1.0,
                                      issue_seconds_per_element=10.0 / 33.45e12, binding_limit="memory",
                                      device="h200"),
        "noisytune.noise[fp32]": dict(bytes_per_element=8.0, predicted_fraction=0.8, calibrated_fraction=0.68,
                                      issue_seconds_per_element=40.0 / 33.45e12, binding_limit="issue",
                                      device="h200"),
    }


def test_issue_efficiency_is_the_models_issue_time_over_the_measured_time():
    records = _records()
    copy = 4.0e12
    measured_fraction = 0.6
    names = list(records)
    # 12 bytes per element at 0.6 of 4e12 B/s; the model issues 50 slots per element at 33.45e12/s
    measured_seconds = 12.0 / (measured_fraction * copy)
    expected = (50.0 / 33.45e12) / measured_seconds
    got = device_table.issue_efficiency(records, names, measured_fraction, copy)
    assert got == pytest.approx(expected)
    # a kernel measured slower than the model's issue time sustains less than the model's issue rate
    assert device_table.issue_efficiency(records, names[1:], 0.5, copy) == pytest.approx(
        (40.0 / 33.45e12) / (8.0 / (0.5 * copy)))
    assert device_table.issue_efficiency(records, ["missing"], 0.6, copy) is None


def test_table_has_the_calibrated_prediction_and_the_issue_efficiency():
    records = _records()
    bench = dict(name="test_noisytune_gpu[noisytune-fused]",
                 extra_info=dict(fraction_of_copy=0.6, copy_GBps=4000.0, dtype="fp32"))
    text = device_table.table([bench], records, "NVIDIA H200")
    row = next(line for line in text.splitlines() if line.startswith("| test_noisytune_gpu"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    # combined: 12 bytes / (4 / 1.0 + 8 / 0.8) = 0.857 raw; 12 / (4 + 8 / 0.68) = 0.761 calibrated
    assert cells[2:6] == ["0.600", f"{12 / (4 + 8 / 0.8):.3f}", f"{12 / (4 + 8 / 0.68):.3f}", "issue, memory"]
    assert cells[6] == f"{0.6 / (12 / (4 + 8 / 0.8)):.2f}"
    assert cells[7] == f"{(50.0 / 33.45e12) / (12.0 / (0.6 * 4.0e12)):.2f}"
    assert "h200 model constants" in text
