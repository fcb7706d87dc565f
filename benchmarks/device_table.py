"""One GPU run's Markdown table: each fused kernel's measured fraction of the measured copy bandwidth (from
``pytest benchmarks --benchmark-json``) beside the static model's prediction (``sass_roofline.py --json``).

    python benchmarks/device_table.py BENCHMARK_JSON STATIC_JSON [--out TABLE.md]

A benchmark that launches several kernels (PATS: sensitivity + update; NoisyTune: statistics + noise; the LNSR diff
norm: forward + backward) is compared with their combined prediction, the bytes-weighted harmonic mean of the
cases' predicted fractions (their times add up). Benchmarks of the eager and compiled variants, and fused ones
with no static case, are listed without a prediction. ``benchmarks/device_run.sh`` calls this.

The measured issue efficiency (issue 23) is the model's issue time for the kernels (their issue slots per element
at the static JSON's device constants, ``sass_roofline.py --device``) / the measured time per element (the bytes
the kernels must move / (measured fraction x measured copy bandwidth)). For a kernel the model calls issue-bound it
is the sustained issue rate as a fraction of the model's: the figure ``sass_roofline.py --efficiency`` stands in
for (0.85 until measured). For a memory-bound kernel it is only a lower bound (the issue units wait on DRAM).
"""
from __future__ import annotations

import argparse
import json
import re
from typing import Dict, List, Optional


def static_cases(name: str, info: dict) -> Optional[List[str]]:
    """The static-model cases whose kernels the fused variant of benchmark ``name`` launches (None: none)."""
    dtype = info.get("dtype", "fp32")
    if name.startswith("test_hype_noise") and info.get("variant") == "fused":
        return [f"hype[{dtype},normal,nearest]"]  # add_noise_(x, sigma): normal noise, rounded to nearest
    if name.startswith("test_diff_norm_forward_backward") and info.get("variant") == "fused":
        # a mask gives the kernels per-row weights: the static cases with them
        return [f"lnsr.diff_norm.forward[{dtype},row_weight]", f"lnsr.diff_norm.backward[{dtype},row_weight]"]
    if name.startswith("test_optimizer_step_gpu") and "pats-fused" in name:
        return ["pats.sensitivity[fp32]", "pats.update[fp32]"]
    if name.startswith("test_noisytune_gpu") and "noisytune-fused" in name:
        return ["noisytune.stats[fp32]", "noisytune.noise[fp32]"]
    return None


def combined_fraction(records: Dict[str, dict], names: List[str], key: str = "predicted_fraction") -> Optional[float]:
    """Predicted (``key``) fraction of the roofline of kernels run one after the other: total bytes / total
    time."""
    found = [records.get(n) for n in names]
    if any(r is None or r.get(key) is None for r in found):
        return None
    total_bytes = sum(r["bytes_per_element"] for r in found)
    return total_bytes / sum(r["bytes_per_element"] / r[key] for r in found)


def issue_efficiency(records: Dict[str, dict], names: List[str], measured_fraction: float,
                     copy_bytes_per_s: float) -> Optional[float]:
    """The model's issue time of kernels run one after the other / their measured time (see the docstring)."""
    found = [records.get(n) for n in names]
    if any(r is None or r.get("issue_seconds_per_element") is None for r in found) or not copy_bytes_per_s:
        return None
    measured_seconds = sum(r["bytes_per_element"] for r in found) / (measured_fraction * copy_bytes_per_s)
    return sum(r["issue_seconds_per_element"] for r in found) / measured_seconds


def table(benchmarks: List[dict], records: Dict[str, dict], gpu: str) -> str:
    copy = next((b["extra_info"].get("copy_GBps") for b in benchmarks if b["extra_info"].get("copy_GBps")), None)
    device = next((r.get("device") for r in records.values() if r.get("device")), "h100")
    lines = [f"# Measured vs static roofline on {gpu}", "",
             f"Measured copy bandwidth: {copy} GB/s (the roofline). Measured: bytes the operation must move / median "
             "time, as a fraction of that copy. Static: `benchmarks/sass_roofline.py`'s raw and calibrated "
             f"predictions for the kernels the fused variant launches ({device} model constants; a model, not a "
             "measurement). Issue efficiency: the model's issue time for those kernels / the measured time, the "
             "sustained issue rate as a fraction of the model's where the static model calls the kernels "
             "issue-bound, a lower bound where it calls them memory-bound.", "",
             "| benchmark | kernels (static cases) | measured fraction of copy | static raw | static calibrated "
             "| static bound by | measured / raw | issue efficiency |",
             "|---|---|---|---|---|---|---|---|"]
    rows = []
    for bench in benchmarks:
        info = bench.get("extra_info", {})
        measured = info.get("fraction_of_copy")
        if measured is None:
            continue  # a whole training step: no bytes model
        names = static_cases(bench["name"], info)
        predicted = combined_fraction(records, names) if names else None
        calibrated = combined_fraction(records, names, "calibrated_fraction") if names else None
        bound = ", ".join(sorted({records[n].get("binding_limit", "?") for n in names})) if predicted else "-"
        efficiency = issue_efficiency(records, names, measured, (copy or 0) * 1e9) if predicted else None
        ratio = f"{measured / predicted:.2f}" if predicted else "-"
        rows.append((bench["name"], " + ".join(names) if names else "-", f"{measured:.3f}",
                     f"{predicted:.3f}" if predicted else "-", f"{calibrated:.3f}" if calibrated else "-", bound,
                     ratio, f"{efficiency:.2f}" if efficiency else "-"))
    rows.sort(key=lambda r: (r[3] == "-", r[0]))
    lines += [f"| {' | '.join(r)} |" for r in rows]
    return "\n".join(lines) + "\n"


def gpu_slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "gpu"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("benchmark_json")
    parser.add_argument("static_json")
    parser.add_argument("--out", help="write the table here (default: stdout)")
    args = parser.parse_args(argv)
    with open(args.benchmark_json) as f:
        run = json.load(f)
    with open(args.static_json) as f:
        records = {r["name"]: r for r in json.load(f)}
    gpu = run.get("machine_info", {}).get("gpu") or next(
        (b["extra_info"].get("device") for b in run["benchmarks"] if b.get("extra_info", {}).get("device")), "GPU")
    text = table(run["benchmarks"], records, gpu)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    else:
        print(text, end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
