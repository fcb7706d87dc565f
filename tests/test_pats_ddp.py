"""Data parallel: two DistributedDataParallel replicas (gloo, two processes) that see different batches but
all-reduce their gradients end bitwise identical after 20 PATS steps, on both backends, because the noise is a
function of (seed, step, tensor, element) and the mean sensitivity is a fixed-order reduction. The control run
(different seeds on the two ranks) shows the comparison does detect replicas that drift apart.
"""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from processes import join_or_fail

STEPS = 20
WORLD_SIZE = 2
# (name, backend, rank seeds)
CONFIGS = [
    ("reference-same-seed", "reference", (1234, 1234)),
    ("triton-same-seed", "triton", (1234, 1234)),
    ("reference-different-seeds", "reference", (1234, 4321)),
]


def _worker(rank, init_file, out_dir, device):
    import fusednoise
    from torch.nn.parallel import DistributedDataParallel
    from fusednoise.optim import PATSAdamax

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD_SIZE)
    try:
        for name, backend, seeds in CONFIGS:
            run_device = device if backend == "triton" else "cpu"
            torch.manual_seed(0)  # identical initial weights on both ranks
            model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
            model = model.to(run_device)
            ddp = DistributedDataParallel(model)
            opt = PATSAdamax(model.parameters(), lr=1e-2, noise_lambda=1e-4, noise_prob=0.5, seed=seeds[rank])
            gen = torch.Generator().manual_seed(100 + rank)  # each rank its own batches
            with fusednoise.backend(backend):
                for _ in range(STEPS):
                    x = torch.randn(16, 8, generator=gen).to(run_device)
                    y = torch.randn(16, 4, generator=gen).to(run_device)
                    opt.zero_grad(set_to_none=True)
                    torch.nn.functional.mse_loss(ddp(x), y).backward()
                    opt.step()
            state = {f"param{i}": p.detach().cpu() for i, p in enumerate(model.parameters())}
            for i, p in enumerate(model.parameters()):
                state[f"sensitivity{i}"] = opt.state[p]["sensitivity"].cpu()
            torch.save(state, os.path.join(out_dir, f"{name}-rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    if not dist.is_available():
        pytest.fail("torch.distributed is not available in this build")
    out = tmp_path_factory.mktemp("ddp")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    context = mp.spawn(_worker, args=(str(out / "init"), str(out), device), nprocs=WORLD_SIZE, join=False)
    join_or_fail(context, 300, "DDP")
    return {name: [torch.load(out / f"{name}-rank{r}.pt", weights_only=True) for r in range(WORLD_SIZE)]
            for name, _, _ in CONFIGS}


@pytest.mark.parametrize("name", ["reference-same-seed", "triton-same-seed"])
def test_replicas_bitwise_identical(ddp_results, name):
    rank0, rank1 = ddp_results[name]
    assert rank0.keys() == rank1.keys()
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), key
    # the sensitivities and the noise were really there
    assert all(rank0[k].abs().sum() > 0 for k in rank0 if k.startswith("sensitivity"))


def test_kernel_and_reference_replicas_agree(ddp_results):
    ref, tri = ddp_results["reference-same-seed"][0], ddp_results["triton-same-seed"][0]
    for key in ref:
        if key.startswith("param"):
            assert torch.allclose(ref[key], tri[key], atol=1e-5), key


def test_control_different_seeds_diverge(ddp_results):
    rank0, rank1 = ddp_results["reference-different-seeds"]
    assert any(not torch.equal(rank0[k], rank1[k]) for k in rank0 if k.startswith("param"))
