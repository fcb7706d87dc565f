"""benchmarks/layer_bytes.py: the README's bytes-per-layer table and docs/fused.md's hidden-dropout table are what
the model computes, and the dropout model is the formula written here."""
from pathlib import Path

import pytest

from scripts import load_script

REPO = Path(__file__).resolve().parents[1]


def test_the_readme_table_is_the_models():
    assert load_script("layer_bytes").markdown_table() in (REPO / "README.md").read_text(encoding="utf-8")


def test_the_dropout_table_in_the_docs_is_the_models():
    assert load_script("layer_bytes").dropout_table() in (REPO / "docs" / "fused.md").read_text(encoding="utf-8")


@pytest.mark.parametrize("h", [2, 4])
def test_hidden_dropout_bytes(h):
    script = load_script("layer_bytes")
    # torch on CUDA, per dropout: read x, write y and a bool mask; backward read dy and the mask, write dx. Two per
    # post-LN layer.
    assert script.dropout_bytes_per_element("torch", h, 0.1) == {"forward": 2 * (h + h + 1),
                                                                 "backward": 2 * (h + 1 + h)}
    # fused: the mask is regenerated from philox; the backward writes dx beside ds
    assert script.dropout_bytes_per_element("fused", h, 0.1) == {"forward": 0, "backward": 2 * h}
    for variant in ("torch", "fused"):  # p = 0 returns its input (HyPe's disable_dropout): nothing moves
        assert script.dropout_bytes_per_element(variant, h, 0.0) == {"forward": 0, "backward": 0}
    with pytest.raises(ValueError, match="p must be in"):
        script.dropout_bytes_per_element("torch", h, 1.0)
    with pytest.raises(ValueError, match="variant"):
        script.dropout_bytes_per_element("inductor", h, 0.1)
