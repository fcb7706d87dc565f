"""FSDP2 (``torch.distributed.fsdp.fully_shard``) on CPU: two gloo ranks on a ``"cpu"`` device mesh, started here on
a free local port, against one process on the concatenated batches (SPEC section 4c).

One spawned run does every sharded check (process start-up costs seconds); the one-process counterparts run in
this process meanwhile. The MLP's shards are uneven and some are empty on rank 1 (``Shard(0)`` of 7 rows on 2
ranks is 4 + 3, of 1 row 1 + 0), so the offsets, the mean reduction and the empty-shard paths all count:

* PATSAdamax, both backends, noise on and off: 2 ranks x 10 steps, each rank its own batches, end within 1e-5 of
  one process on the concatenated batches (same seed), and both ranks hold the same unsharded parameters;
* a sharded ``state_dict`` saved with ``torch.distributed.checkpoint`` and loaded into a fresh model resumes
  bitwise, and an unsharded one-process checkpoint loads into the sharded optimizer (cut to the shards);
* ``noisytune.perturb_`` on the wrapped model, both backends: the unwrapped model's result;
* HyPe and LNSR hooks on a wrapped tiny BERT: the unwrapped model's outputs, penalty and (rank-averaged)
  gradients;
* HSDP (``fully_shard`` on a 2-D ``(replicate, shard)`` mesh, parameters placed ``(Replicate(), Shard(0))``):
  PATSAdamax and NoisyTune on a 2 x 1 mesh (two replicas of unsharded tensors) and a 1 x 2 mesh (one replica in
  two shards) equal one process, which holds only when the statistics are added over the *shard* dimension's
  group: over the replicate dimension's, the 2 x 1 run would count each replica's sum twice and the 1 x 2 run
  would use each shard's own mean.
"""
import os
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fusednoise
from fusednoise import hype, lnsr, noisytune
from fusednoise.optim import PATSAdamax
from processes import free_port, join_or_fail
from tiny_models import tiny_bert

WORLD_SIZE = 2
STEPS = 10
BATCH = 8  # per rank
PATS_CASES = {  # name: (backend, PATSAdamax keyword arguments)
    "reference-noise": ("reference", dict(noise_lambda=1e-3, noise_prob=0.5)),
    "triton-noise": ("triton", dict(noise_lambda=1e-3, noise_prob=0.5)),
    "reference-no-noise": ("reference", dict(noise_lambda=0.0)),
}
PATS_ARGS = dict(lr=1e-2, noise_eps=1e-3, seed=1234)  # noise_eps bounds the noise where |theta * g| is ~0
HYPE_SEED, LNSR_SEED = 7, 11


# --------------------------------------------------------------------------------------------- shared builders
def _mlp(seed=0):
    torch.manual_seed(seed)
    # weights (7, 6), (3, 7), (1, 3) and biases: 4 + 3, 2 + 1 and 1 + 0 rows on two ranks
    return torch.nn.Sequential(torch.nn.Linear(6, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3), torch.nn.Tanh(),
                               torch.nn.Linear(3, 1))


def _batches(rank):
    gen = torch.Generator().manual_seed(100 + rank)
    return [(torch.randn(BATCH, 6, generator=gen), torch.randn(BATCH, 1, generator=gen)) for _ in range(STEPS)]


def _train(model, opt, batches):
    for x, y in batches:
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()


def _bert(seed=0):
    return tiny_bert(seed, hidden_size=16, intermediate_size=24)


def _bert_batch(rank):
    gen = torch.Generator().manual_seed(200 + rank)
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[0, -2:] = 0
    return dict(input_ids=torch.randint(2, 40, (2, 8), generator=gen), attention_mask=mask,
                labels=torch.tensor([0, 1]))


def _hooked_step(model, method, rank):
    """One training forward and backward with HyPe or LNSR on ``model``: (logits, penalty, loss)."""
    model.train()
    batch = _bert_batch(rank)
    if method == "hype":
        with hype.apply(model, sigma=0.1, seed=HYPE_SEED):
            outputs = model(**batch)
        penalty = torch.zeros(())
    else:
        torch.manual_seed(LNSR_SEED + rank)  # LNSR draws its noise seed from the CPU generator
        outputs, penalty = lnsr.LNSR(model, scale=0.5)(**batch)
    (outputs.loss + penalty).backward()
    return outputs.logits.detach(), penalty.detach(), outputs.loss.detach()


# --------------------------------------------------------------------------------------------- the ranks
def _shard(model, mesh, blocks=()):
    """``fully_shard`` each of ``blocks``, then ``model``: every parameter becomes a DTensor placed Shard(0)."""
    from torch.distributed.fsdp import fully_shard

    for block in blocks:
        fully_shard(block, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def _full(tensors):
    return [t.full_tensor().detach().clone() for t in tensors]


def _pats_runs(mesh, rank, out):
    from torch.distributed.tensor import DTensor

    for name, (backend, kwargs) in PATS_CASES.items():
        model = _mlp()
        _shard(model, mesh)
        opt = PATSAdamax(model.parameters(), **PATS_ARGS, **kwargs)
        with fusednoise.backend(backend):
            _train(model, opt, _batches(rank))
        out[f"pats/{name}"] = _full(model.parameters())
        if name == "reference-noise":
            out["local_shapes"] = [tuple(p.to_local().shape) for p in model.parameters()]
            out["dtensor_state"] = all(isinstance(opt.state[p][key], DTensor) for p in model.parameters()
                                       for key in ("exp_avg", "exp_inf", "sensitivity"))


def _resume_run(mesh, rank, out, checkpoint):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    batches = _batches(rank)
    model = _mlp()
    _shard(model, mesh)
    opt = PATSAdamax(model.parameters(), **PATS_ARGS, noise_lambda=1e-3, noise_prob=0.5)
    _train(model, opt, batches[:5])
    model_sd, optim_sd = get_state_dict(model, opt)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=checkpoint)
    _train(model, opt, batches[5:])
    out["resume/continued"] = _full(model.parameters())

    fresh = _mlp(seed=99)  # other weights: everything must come from the checkpoint
    _shard(fresh, mesh)
    fresh_opt = PATSAdamax(fresh.parameters(), **PATS_ARGS, noise_lambda=1e-3, noise_prob=0.5)
    model_sd, optim_sd = get_state_dict(fresh, fresh_opt)
    dcp.load({"model": model_sd, "optim": optim_sd}, checkpoint_id=checkpoint)
    set_state_dict(fresh, fresh_opt, model_state_dict=model_sd, optim_state_dict=optim_sd)
    _train(fresh, fresh_opt, batches[5:])
    out["resume/resumed"] = _full(fresh.parameters())


def _unsharded_checkpoint_run(mesh, rank, out):
    """5 steps in one process on the concatenated batches, its plain state_dict loaded into a sharded model and
    optimizer, 5 sharded steps: the 10-step one-process run."""
    kwargs = PATS_CASES["reference-noise"][1]
    model = _mlp()
    opt = PATSAdamax(model.parameters(), **PATS_ARGS, **kwargs)
    _train(model, opt, _concatenated()[:5])
    sharded = _mlp(seed=99)
    sharded.load_state_dict(model.state_dict())
    _shard(sharded, mesh)
    sharded_opt = PATSAdamax(sharded.parameters(), **PATS_ARGS, **kwargs)
    sharded_opt.load_state_dict(opt.state_dict())
    _train(sharded, sharded_opt, _batches(rank)[5:])
    out["unsharded-checkpoint"] = _full(sharded.parameters())


def _refused_placements(mesh):
    """The errors for placements whose local shard is not one range of the unsharded tensor."""
    from torch.distributed.tensor import Shard, distribute_tensor

    errors = []
    for placement, shape in ((Shard(1), (4, 6)), (Shard(1), (1, 3, 4))):
        weight = torch.nn.Parameter(distribute_tensor(torch.randn(shape), mesh, [placement]))
        try:
            PATSAdamax([weight], seed=0)
        except TypeError as error:
            errors.append(str(error))
    return errors


HSDP_MESHES = {"2x1": (2, 1), "1x2": (1, 2)}  # (replicate, shard)


def _hsdp_runs(rank, out):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard

    for name, shape in HSDP_MESHES.items():
        mesh = init_device_mesh("cpu", shape, mesh_dim_names=("replicate", "shard"))
        backend, kwargs = PATS_CASES["reference-noise"]
        model = _mlp()
        _shard(model, mesh)
        out[f"hsdp/{name}/placements"] = tuple(model[0].weight.placements) == (Replicate(), Shard(0))
        opt = PATSAdamax(model.parameters(), **PATS_ARGS, **kwargs)
        with fusednoise.backend(backend):
            _train(model, opt, _batches(rank))
        out[f"hsdp/{name}/pats"] = _full(model.parameters())
        model = _mlp()
        _shard(model, mesh)
        noisytune.perturb_(model, 0.15, seed=5)
        out[f"hsdp/{name}/noisytune"] = _full(model.parameters())


def _worker(rank, port, out_dir):
    from torch.distributed.device_mesh import init_device_mesh

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD_SIZE)
    try:
        mesh = init_device_mesh("cpu", (WORLD_SIZE,))
        out = {}
        _pats_runs(mesh, rank, out)
        _resume_run(mesh, rank, out, os.path.join(out_dir, "checkpoint"))
        _unsharded_checkpoint_run(mesh, rank, out)
        out["refused"] = _refused_placements(mesh)
        _hsdp_runs(rank, out)
        for backend in ("reference", "triton"):
            model = _mlp()
            _shard(model, mesh)
            with fusednoise.backend(backend):
                report = noisytune.perturb_(model, 0.15, seed=5)
            out[f"noisytune/{backend}"] = (_full(model.parameters()), report.std, report.skipped)
        for method in ("hype", "lnsr"):
            model = _bert()
            _shard(model, mesh, list(model.bert.encoder.layer))
            logits, penalty, loss = _hooked_step(model, method, rank)
            out[method] = (logits, penalty, loss, _full(p.grad for p in model.parameters()))
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


# --------------------------------------------------------------------------------------------- one process
def _concatenated():
    return [(torch.cat([a[0], b[0]]), torch.cat([a[1], b[1]])) for a, b in zip(_batches(0), _batches(1))]


def _one_process():
    """The unsharded counterparts: one process, the two ranks' batches concatenated."""
    batches = _concatenated()
    expected = {}
    for name, (backend, kwargs) in PATS_CASES.items():
        model = _mlp()
        opt = PATSAdamax(model.parameters(), **PATS_ARGS, **kwargs)
        with fusednoise.backend(backend):
            _train(model, opt, batches)
        expected[f"pats/{name}"] = [p.detach().clone() for p in model.parameters()]
    model = _mlp()
    expected["noisytune"] = (noisytune.perturb_(model, 0.15, seed=5), [p.detach().clone() for p in model.parameters()])
    for method in ("hype", "lnsr"):
        per_rank, grads = [], None
        for rank in range(WORLD_SIZE):
            model = _bert()
            per_rank.append(_hooked_step(model, method, rank))
            rank_grads = [p.grad / WORLD_SIZE for p in model.parameters()]  # FSDP2 averages over the ranks
            grads = rank_grads if grads is None else [g + h for g, h in zip(grads, rank_grads)]
        expected[method] = (per_rank, grads)
    return expected


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.fail("torch.distributed with gloo is not available in this build")
    out = tmp_path_factory.mktemp("fsdp")
    started = time.monotonic()
    context = mp.spawn(_worker, args=(free_port(), str(out)), nprocs=WORLD_SIZE, join=False)
    expected = _one_process()  # meanwhile
    join_or_fail(context, 300, "FSDP2")
    print(f"\nFSDP2 run: {time.monotonic() - started:.1f} s for the two ranks and the one-process runs")
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD_SIZE)]
    return ranks, expected


def _max_diff(a, b):
    return max((x.double() - y.double()).abs().max().item() for x, y in zip(a, b))


def test_shards_that_are_not_one_range_of_the_tensor_are_refused(runs):
    ranks, _ = runs
    # Shard(1) of a (4, 6) matrix (tensor parallelism) is refused, of a (1, 3, 4) tensor it is one range: accepted
    assert len(ranks[0]["refused"]) == 1 and "not one contiguous range" in ranks[0]["refused"][0]


def test_shards_are_uneven_and_some_are_empty(runs):
    ranks, _ = runs
    assert ranks[0]["local_shapes"] == [(4, 6), (4,), (2, 7), (2,), (1, 3), (1,)]
    assert ranks[1]["local_shapes"] == [(3, 6), (3,), (1, 7), (1,), (0, 3), (0,)]
    assert ranks[0]["dtensor_state"] and ranks[1]["dtensor_state"]  # so torch.distributed.checkpoint shards them


@pytest.mark.parametrize("name", list(PATS_CASES))
def test_pats_two_ranks_equal_one_process_on_the_concatenated_batches(runs, name):
    ranks, expected = runs
    sharded = ranks[0][f"pats/{name}"]
    assert all(torch.equal(a, b) for a, b in zip(sharded, ranks[1][f"pats/{name}"]))  # the ranks agree
    assert _max_diff(sharded, expected[f"pats/{name}"]) < 1e-5


def test_pats_noise_is_large_against_the_tolerance(runs):
    """The noise the sharded runs must reproduce moves the parameters by far more than the 1e-5 tolerance, so a
    wrong offset, a per-shard mean or a draw keyed by the local index would fail the test above."""
    _, expected = runs
    assert _max_diff(expected["pats/reference-noise"], expected["pats/reference-no-noise"]) > 1e-2
    assert _max_diff(expected["pats/reference-noise"], expected["pats/triton-noise"]) < 1e-5


def test_pats_resumes_bitwise_from_a_distributed_checkpoint(runs):
    ranks, _ = runs
    for rank in ranks:
        assert all(torch.equal(a, b) for a, b in zip(rank["resume/continued"], rank["resume/resumed"]))


def test_an_unsharded_checkpoint_loads_into_the_sharded_optimizer(runs):
    ranks, expected = runs
    for rank in ranks:
        assert _max_diff(rank["unsharded-checkpoint"], expected["pats/reference-noise"]) < 1e-5


@pytest.mark.parametrize("mesh", list(HSDP_MESHES))
def test_hsdp_replicate_then_shard_mesh_equals_one_process(runs, mesh):
    """PATS's mean sensitivity and NoisyTune's std are added over the shard dimension's group of a 2-D mesh."""
    ranks, expected = runs
    for rank in ranks:
        assert rank[f"hsdp/{mesh}/placements"]
        assert _max_diff(rank[f"hsdp/{mesh}/pats"], expected["pats/reference-noise"]) < 1e-5
        assert _max_diff(rank[f"hsdp/{mesh}/noisytune"], expected["noisytune"][1]) < 1e-6


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_noisytune_on_the_wrapped_model_equals_the_unwrapped(runs, backend):
    ranks, expected = runs
    report, params = expected["noisytune"]
    for rank in ranks:
        sharded, std, skipped = rank[f"noisytune/{backend}"]
        assert _max_diff(sharded, params) < 1e-6
        assert std.keys() == report.std.keys() and skipped == report.skipped
        assert all(abs(std[name] - report.std[name]) <= 1e-6 * report.std[name] for name in std)
    assert _max_diff(params, _mlp().parameters()) > 1e-3  # and the noise was there


@pytest.mark.parametrize("method", ["hype", "lnsr"])
def test_hooks_act_on_the_wrapped_model_as_on_the_unwrapped(runs, method):
    ranks, expected = runs
    per_rank, grads = expected[method]
    for rank, (logits, penalty, loss) in zip(ranks, per_rank):
        torch.testing.assert_close(rank[method][0], logits, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(rank[method][1], penalty, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(rank[method][2], loss, rtol=1e-5, atol=1e-6)
    for rank in ranks:  # float32 rounding of gradients up to ~30 (LNSR's penalty at scale 0.5): relative
        assert all((a - b).abs().max() <= 1e-5 * max(1.0, b.abs().max()) for a, b in zip(rank[method][3], grads))
    if method == "lnsr":
        assert per_rank[0][1] > 0
