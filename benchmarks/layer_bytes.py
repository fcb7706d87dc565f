"""Bytes per layer moved by the residual adds, norms and HyPe noise of a transformer layer, per variant: a model
computed from the ops each variant runs (not a measurement).

Only the parts the variants differ in are counted: the residual adds, the norms, the noise and, in backward,
their gradients and the accumulation of the residual stream's two gradients. The linear layers, attention, the
MLP's activation and dropout are the same in every variant and left out. Each op reads each input once and writes
its output once (a row reduction counts one read; per-row statistics and (N,) weights are negligible).

Per element of the ``(tokens, hidden)`` activation, with ``h`` bytes per element of the model's dtype:

pre-LN (LLaMA, Mistral, Qwen2), two RMSNorms and two residual adds per layer:

* Hugging Face eager, ``LlamaRMSNorm`` forward: ``to(float32)`` (h + 4, half precision only), ``pow(2)`` (8),
  ``mean`` (4), ``* rsqrt`` (8), ``to(dtype)`` (4 + h, half only), ``weight *`` (2h); each residual add 3h.
  Backward as autograd runs those ops' formulas: ``weight *`` (dx 2h, dW 3h), ``to(dtype)`` (h + 4, half),
  ``* rsqrt`` (dx 8, the row dot 8), ``mean`` (expand 4), ``pow`` (12), the sum of the two float32 gradients
  (12), ``to(float32)`` (4 + h, half); the residual stream's two gradients summed once per add (3h).
* fused (``fuse_norms``): input norm ``add_rms_norm(x)`` (read x, write y: 2h; ``s`` is x), post-attention
  ``add_rms_norm(attn, residual)`` (read 2, write s and y: 4h), the last add (3h). Backward: post-attention norm
  (read dy, ds, s; write dx: 4h), input norm (read dy, x; write dx: 3h), one gradient sum (3h).
* fused + HyPe: the same; the noise rides in the last add, which produces the next layer's input (0 extra).
* hook HyPe: Hugging Face eager plus ``add_noise`` on the layer's input (read, write: 2h; its gradient is the
  identity, no pass).

post-LN (BERT, RoBERTa), two ``LayerNorm(hidden + input_tensor)`` per layer:

* Hugging Face eager: the add (3h) and ``layer_norm`` (2h) twice; backward ``layer_norm`` (read dy and the saved
  sum, write dx: 3h) and the residual gradient sum (3h) twice.
* fused: ``add_layer_norm`` (read 2, write 1: 3h) twice; backward (read dy, x, residual, write ds: 4h; the sum
  is recomputed rather than stored) and the gradient sum (3h) twice.
* fused + HyPe: the same (the second LayerNorm's output carries the next layer's noise); hook HyPe: eager + 2h.

Hidden dropout (post-LN: ``dropout(dense(x))`` before each of the two add + LayerNorm; left out above, the same in
every variant) with probability ``p``, :func:`dropout_bytes_per_element`:

* torch: ``p = 0`` (HyPe's paper setting, ``disable_dropout=True``) or eval returns its input: 0. Otherwise, on
  CUDA, ``native_dropout`` reads x and writes y and a one-byte bool mask (2h + 1), and its backward reads the
  gradient and the mask and writes dx (2h + 1), per dropout. (On CPU torch's dropout draws a mask of x's dtype and
  multiplies in further passes: more bytes; not modelled.)
* fused into ``add_layer_norm`` (not built: what it would save): the kernel would apply a philox mask to x as it
  reads it (forward 0, no mask stored: the backward regenerates it), and its backward would write dx =
  ds * mask / (1 - p) beside ds, the two no longer being equal (h per dropout).
"""
from __future__ import annotations

from typing import Dict

VARIANTS = ("hf-eager", "fused", "fused-hype", "hook-hype")


def _rms_eager(h: int):
    half = h < 4
    forward = (h + 4 if half else 0) + 8 + 4 + 8 + (4 + h if half else 0) + 2 * h
    backward = 2 * h + 3 * h + (h + 4 if half else 0) + 8 + 8 + 4 + 12 + 12 + (4 + h if half else 0)
    return forward, backward


def bytes_per_element(family: str, variant: str, h: int) -> Dict[str, int]:
    """``{"forward": .., "backward": ..}`` bytes per activation element for one layer."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    if family == "pre_ln":
        if variant in ("fused", "fused-hype"):
            return {"forward": 2 * h + 4 * h + 3 * h, "backward": 4 * h + 3 * h + 3 * h}
        norm_forward, norm_backward = _rms_eager(h)
        forward = 2 * norm_forward + 2 * 3 * h + (2 * h if variant == "hook-hype" else 0)
        return {"forward": forward, "backward": 2 * norm_backward + 2 * 3 * h}
    if family == "post_ln":
        if variant in ("fused", "fused-hype"):
            return {"forward": 2 * 3 * h, "backward": 2 * (4 * h + 3 * h)}
        forward = 2 * (3 * h + 2 * h) + (2 * h if variant == "hook-hype" else 0)
        return {"forward": forward, "backward": 2 * (3 * h + 3 * h)}
    raise ValueError(f"family must be 'pre_ln' or 'post_ln', got {family!r}")


DROPOUT_VARIANTS = ("torch", "fused")
HIDDEN_DROPOUTS = 2  # per post-LN layer: attention output and feed-forward output


def dropout_bytes_per_element(variant: str, h: int, p: float) -> Dict[str, int]:
    """``{"forward": .., "backward": ..}`` bytes per activation element of a post-LN layer's hidden dropouts."""
    if variant not in DROPOUT_VARIANTS:
        raise ValueError(f"variant must be one of {DROPOUT_VARIANTS}, got {variant!r}")
    if not 0 <= p < 1:
        raise ValueError(f"p must be in [0, 1), got {p}")
    if p == 0:
        return {"forward": 0, "backward": 0}
    if variant == "torch":
        return {"forward": HIDDEN_DROPOUTS * (2 * h + 1), "backward": HIDDEN_DROPOUTS * (2 * h + 1)}
    return {"forward": 0, "backward": HIDDEN_DROPOUTS * h}


def dropout_table() -> str:
    """docs/fused.md's table: a BERT-base layer (32 x 128 tokens, hidden 768, bf16), forward + backward, in MB:
    fused norms with torch's hidden dropout, with it fused, and with it off (HyPe's paper setting)."""
    tokens, hidden, h = 32 * 128, 768, 2
    norms = bytes_per_layer("post_ln", "fused", tokens, hidden, h)
    eager = bytes_per_layer("post_ln", "hf-eager", tokens, hidden, h)
    rows = (("Hugging Face eager, torch dropout p = 0.1", eager, "torch", 0.1),
            ("fused norms, torch dropout p = 0.1", norms, "torch", 0.1),
            ("fused norms, dropout fused into add_layer_norm, p = 0.1", norms, "fused", 0.1),
            ("fused norms, dropout off (HyPe, disable_dropout=True)", norms, "torch", 0.0))
    lines = ["| BERT-base layer, 32 x 128 x 768, bf16 | norms + adds | hidden dropout | total |",
             "|---|---:|---:|---:|"]
    for label, counted, variant, p in rows:
        dropout = dropout_bytes_per_element(variant, h, p)
        dropout_bytes = (dropout["forward"] + dropout["backward"]) * tokens * hidden
        norm_bytes = counted["forward"] + counted["backward"]
        lines.append(f"| {label} | {norm_bytes / 1e6:,.0f} | {dropout_bytes / 1e6:,.0f} | "
                     f"{(norm_bytes + dropout_bytes) / 1e6:,.0f} |")
    return "\n".join(lines)


def bytes_per_layer(family: str, variant: str, tokens: int, hidden: int, h: int) -> Dict[str, int]:
    per_element = bytes_per_element(family, variant, h)
    return {key: value * tokens * hidden for key, value in per_element.items()}


def markdown_table() -> str:
    """The README's table: a LLaMA-7B-width layer (8 x 2048 tokens, hidden 4096) and a BERT-base layer
    (32 x 128 tokens, hidden 768), bfloat16, forward + backward, in MB (1e6 bytes)."""
    shapes = (("LLaMA-7B layer, 8 x 2048 x 4096, bf16", "pre_ln", 8 * 2048, 4096),
              ("BERT-base layer, 32 x 128 x 768, bf16", "post_ln", 32 * 128, 768))
    lines = ["| layer | " + " | ".join(VARIANTS) + " |", "|---|" + "---:|" * len(VARIANTS)]
    for label, family, tokens, hidden in shapes:
        cells = []
        for variant in VARIANTS:
            moved = bytes_per_layer(family, variant, tokens, hidden, 2)
            cells.append(f"{(moved['forward'] + moved['backward']) / 1e6:,.0f}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown_table())
    print()
    print(dropout_table())
