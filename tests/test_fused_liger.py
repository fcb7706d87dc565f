"""Fused norms on a model Liger-Kernel patched (``apply_liger_kernel_to_llama``): the two compose.

Liger-Kernel replaces LLaMA's RMSNorm in two ways, both checked: with ``model=`` it binds ``LigerRMSNorm.forward``
on the existing ``LlamaRMSNorm`` instances (the class name stays), and it puts ``LigerRMSNorm`` in transformers'
module, so that models built afterwards hold it. The fused patch recognises both by Liger's own attributes
(``offset`` 0.0 and ``casting_mode`` "llama": LLaMA's arithmetic, which the fused op computes) and replaces the
layers' norm calls with the fused op; a Liger norm with another arithmetic is refused, naming Liger-Kernel.

Liger patches transformers' module globally, so everything runs in one spawned process. Only the RMSNorm patch is
applied (``rope``, ``swiglu`` and the cross-entropy patches off), and the final norm, outside the layers and not
the patch's to fuse, gets LLaMA's eager forward back: Liger's Triton kernels do not run under Triton's CPU
interpreter (its RMSNorm kernel fails there), and on a GPU they would be Liger's to test.
"""
import importlib.util
import os

import pytest
import torch
import torch.multiprocessing as mp

from processes import join_or_fail
from tiny_models import tiny_llama

pytestmark = pytest.mark.skipif(importlib.util.find_spec("liger_kernel") is None,
                                reason="liger-kernel not installed (pip install --no-deps liger-kernel)")
SIGMA, SEED = 0.05, 5


def _step(model):
    """Logits and parameter gradients of one training step."""
    model.train()
    ids = torch.randint(2, 40, (2, 8), generator=torch.Generator().manual_seed(0))
    logits = model(input_ids=ids, use_cache=False).logits
    logits.square().mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return logits.detach(), grads


def _both(model, out, key):
    """The fused steps of ``model``: without noise (``fuse_norms``) and with HyPe (``hype.apply(fused=True)``)."""
    import fusednoise
    from fusednoise import hype

    with fusednoise.fuse_norms(model) as patch:
        out[f"{key}/fused_layers"] = len(patch.layers)
        out[f"{key}/fused"] = _step(model)
    with hype.apply(model, sigma=SIGMA, seed=SEED, fused=True) as handle:
        out[f"{key}/hooked_layers"] = len(handle.hooked_layers)
        out[f"{key}/hype"] = _step(model)


def _worker(rank, out_dir):
    from transformers.models.llama import modeling_llama

    from fusednoise import fuse_norms, fused, hype

    torch.set_num_threads(1)
    llama_norm = modeling_llama.LlamaRMSNorm  # before Liger replaces it in the module
    out = {}
    plain = tiny_llama()
    out["clean"] = _step(plain)
    with hype.apply(plain, sigma=SIGMA, seed=SEED):
        out["hooks"] = _step(plain)

    from liger_kernel.transformers import apply_liger_kernel_to_llama

    liger_only_norms = dict(rope=False, swiglu=False, cross_entropy=False, fused_linear_cross_entropy=False)
    # model=: Liger's forward bound on the LlamaRMSNorm instances
    model = tiny_llama()
    apply_liger_kernel_to_llama(model=model, **liger_only_norms)
    norm = model.model.layers[0].input_layernorm
    out["model=/norm"] = (type(norm).__name__, fused._rebound_by(norm))
    del model.model.norm.forward  # the final norm: LLaMA's eager forward (see the module docs)
    _both(model, out, "model=")

    # built after the module-level patch: LigerRMSNorm modules
    model = tiny_llama()
    norm = model.model.layers[0].input_layernorm
    out["class/norm"] = type(norm).__name__
    final = llama_norm(model.config.hidden_size, eps=model.config.rms_norm_eps)
    final.weight = model.model.norm.weight
    model.model.norm = final
    _both(model, out, "class")

    # a Liger norm computing another arithmetic (no casting to float32 before the reduction) is refused
    norm.casting_mode = "none"
    try:
        fuse_norms(model)
    except ValueError as error:
        out["refused"] = str(error)
    torch.save(out, os.path.join(out_dir, "liger.pt"))


@pytest.fixture(scope="module")
def liger_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("liger")
    context = mp.spawn(_worker, args=(str(out),), nprocs=1, join=False)
    join_or_fail(context, 300, "Liger-Kernel")
    return torch.load(out / "liger.pt", weights_only=False)


def _assert_same_step(a, b):
    (out_a, grads_a), (out_b, grads_b) = a, b
    torch.testing.assert_close(out_b, out_a, rtol=1e-5, atol=1e-6)
    assert grads_a.keys() == grads_b.keys()
    scale = max(g.abs().max() for g in grads_a.values())
    for key in grads_a:  # relative to the largest gradient: some are zero up to float noise
        assert (grads_a[key] - grads_b[key]).abs().max() <= 1e-5 * max(grads_a[key].abs().max(), 1e-3 * scale), key


@pytest.mark.parametrize("how", ["model=", "class"])
def test_fused_norms_compose_with_liger_kernels_rms_norm(liger_run, how):
    if how == "model=":  # the class name stays LlamaRMSNorm; the forward is Liger's
        assert liger_run["model=/norm"][0] == "LlamaRMSNorm"
        assert liger_run["model=/norm"][1].startswith("liger_kernel")
    else:
        assert liger_run["class/norm"] == "LigerRMSNorm"
    assert liger_run[f"{how}/fused_layers"] == 2 and liger_run[f"{how}/hooked_layers"] == 0
    _assert_same_step(liger_run["clean"], liger_run[f"{how}/fused"])  # LLaMA's arithmetic, fused
    _assert_same_step(liger_run["hooks"], liger_run[f"{how}/hype"])  # the hook path's noise
    assert not torch.allclose(liger_run["hooks"][0], liger_run["clean"][0], rtol=1e-3, atol=1e-4)


def test_a_liger_norm_with_another_arithmetic_is_refused_naming_liger(liger_run):
    assert "LigerRMSNorm patched by Liger-Kernel with offset=0.0, casting_mode='none'" in liger_run["refused"]
