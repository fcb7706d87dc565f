"""Fused norm patches (``fuse_norms``, ``hype.apply(fused=True)``) on FSDP2-wrapped models: two gloo ranks on a
``"cpu"`` mesh, every layer and the root ``fully_shard``-ed, a tiny LLaMA (pre-LN) and a tiny BERT (post-LN).

FSDP2 keeps DTensor shards between forwards and swaps in the all-gathered plain parameters in its pre-forward
hook, which runs in ``Module.__call__`` before the instance ``forward`` the patch rebinds: the fused ops must see
those plain tensors, and the patch must work whether it is applied before ``fully_shard`` (which swaps the
layer's class for an ``FSDP<Layer>`` subclass) or after. Per rank and backend:

* sigma = 0: the patched sharded model's logits and (full) gradients equal the unpatched sharded model's;
* sigma > 0 with ``seed=``: ``hype.apply(fused=True)`` equals the hook path on the sharded model (same noise).
"""
import os
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fusednoise
from fusednoise import hype
from processes import free_port, join_or_fail
from tiny_models import tiny_bert, tiny_llama

WORLD_SIZE = 2
MODELS = {"llama": tiny_llama, "bert": tiny_bert}
BACKENDS = ("reference", "triton")
SIGMA, SEED = 0.05, 3
# How each variant wraps the model: "unpatched" and "hooks" (run on the reference backend) are what the fused
# variants of both backends must equal.
BASELINES = ("unpatched", "hooks")
FUSED = ("fuse-before", "fuse-after", "hype-fused-before", "hype-fused-after")


def _batch(name, rank):
    gen = torch.Generator().manual_seed(300 + rank)
    batch = dict(input_ids=torch.randint(2, 40, (2, 8), generator=gen))
    if name == "llama":
        batch["use_cache"] = False
    return batch


def _layers(model):
    return list(model.model.layers if hasattr(model, "model") else model.bert.encoder.layer)


def _shard(model, mesh):
    from torch.distributed.fsdp import fully_shard

    for layer in _layers(model):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)


def _patch(model, variant):
    """The patch of ``variant`` (None for the unpatched model)."""
    if variant.startswith("fuse"):
        return fusednoise.fuse_norms(model)
    if variant == "hooks":
        return hype.apply(model, sigma=SIGMA, seed=SEED)
    if variant.startswith("hype-fused"):
        return hype.apply(model, sigma=SIGMA, seed=SEED, fused=True)
    return None


def _counting(calls, op):
    """``op`` recording, per call, whether its weight was a plain tensor (FSDP2's unsharded parameter)."""
    from torch.distributed.tensor import DTensor

    def counted(x, residual, weight, *args, **kwargs):
        calls.append(not isinstance(weight, DTensor) and not isinstance(x, DTensor))
        return op(x, residual, weight, *args, **kwargs)

    return counted


def _run(name, variant, mesh, rank):
    """Logits, full gradients and what the patch reports for one training step of a sharded model."""
    from torch.distributed.fsdp import FSDPModule

    from fusednoise import fused as fused_module, ops_norms

    calls = []
    for op in ("add_rms_norm", "add_layer_norm"):  # the patches' ops, counted (in this worker process only)
        setattr(fused_module, op, _counting(calls, getattr(ops_norms, op)))
    model = MODELS[name]().train()
    patch = _patch(model, variant) if variant.endswith("before") else None
    _shard(model, mesh)
    if not variant.endswith("before"):
        patch = _patch(model, variant)
    logits = model(**_batch(name, rank)).logits
    logits.float().square().mean().backward()
    fused = getattr(patch, "layers", None) or getattr(patch, "fused_layers", [])
    # 2 layers x 2 fused norms, each on plain tensors; the hook path and the unpatched model call none
    report = dict(fused=len(fused), sharded_layers=all(isinstance(layer, FSDPModule) for layer in fused),
                  fused_calls=len(calls), plain_tensors=all(calls))
    if patch is not None:
        patch.remove()
        report["restored"] = all("forward" not in m.__dict__ and not any(
            isinstance(hook, hype._NoiseHook) for hook in m._forward_pre_hooks.values()) for m in model.modules())
    grads = [p.grad.full_tensor().detach().clone() for p in model.parameters()]
    return logits.detach(), grads, report


def _worker(rank, port, out_dir):
    from torch.distributed.device_mesh import init_device_mesh

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD_SIZE)
    try:
        mesh = init_device_mesh("cpu", (WORLD_SIZE,))
        out = {}
        started = time.monotonic()
        for backend in BACKENDS:
            with fusednoise.backend(backend):
                for name in MODELS:
                    for variant in (BASELINES if backend == "reference" else ()) + FUSED:
                        out[(backend, name, variant)] = _run(name, variant, mesh, rank)
            out[("seconds", backend)] = time.monotonic() - started
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.fail("torch.distributed with gloo is not available in this build")
    out = tmp_path_factory.mktemp("fused_fsdp")
    started = time.monotonic()
    context = mp.spawn(_worker, args=(free_port(), str(out)), nprocs=WORLD_SIZE, join=False)
    join_or_fail(context, 300, "fused FSDP2")
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD_SIZE)]
    print(f"\nfused FSDP2 run: {time.monotonic() - started:.1f} s; rank 0 after each backend: "
          + ", ".join(f"{b} {ranks[0][('seconds', b)]:.1f} s" for b in BACKENDS))
    return ranks


def _assert_same_step(a, b):
    (logits_a, grads_a, _), (logits_b, grads_b, _) = a, b
    torch.testing.assert_close(logits_b, logits_a, rtol=1e-5, atol=1e-6)
    scale = max(g.abs().max() for g in grads_a)
    for g_a, g_b in zip(grads_a, grads_b):  # relative to the largest gradient: some are zero up to float noise
        assert (g_a - g_b).abs().max() <= 1e-5 * max(g_a.abs().max(), 1e-3 * scale)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("when", ["before", "after"])
def test_fuse_norms_on_a_sharded_model_equals_the_unpatched_sharded_model(ranks, name, backend, when):
    for out in ranks:
        patched = out[(backend, name, f"fuse-{when}")]
        assert patched[2] == dict(fused=2, sharded_layers=True, fused_calls=4, plain_tensors=True, restored=True)
        _assert_same_step(out[("reference", name, "unpatched")], patched)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("when", ["before", "after"])
def test_fused_hype_on_a_sharded_model_adds_the_hook_paths_noise(ranks, name, backend, when):
    for out in ranks:
        hooks, unpatched = out[("reference", name, "hooks")], out[("reference", name, "unpatched")]
        assert hooks[2]["fused_calls"] == 0 and unpatched[2]["fused_calls"] == 0
        fused = out[(backend, name, f"hype-fused-{when}")]
        assert fused[2] == dict(fused=2, sharded_layers=True, fused_calls=4, plain_tensors=True, restored=True)
        _assert_same_step(hooks, fused)
        assert not torch.allclose(hooks[0], unpatched[0], rtol=1e-3, atol=1e-4)  # the noise is there
