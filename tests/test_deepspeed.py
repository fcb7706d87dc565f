"""DeepSpeed ZeRO on CPU (gloo; SPEC section 4c): PATSAdamax on ZeRO-1/2's flat partitions, NoisyTune on ZeRO-3's
partitioned parameters, HyPe, LNSR and NEFTune on an engine's module, and FusedNoiseTrainer with
``TrainingArguments(deepspeed=...)``.

Two spawned runs (DeepSpeed initialises torch.distributed, which must not leak into this pytest process): two gloo
ranks for the engines, one rank for the Trainer (Hugging Face's Trainer under DeepSpeed in one process). Their
counterparts without DeepSpeed run in this process meanwhile. A tiny BERT (hidden 32, 2 layers; intermediate 37, so
the flat buffers hold odd-sized tensors) with two param groups (noise / no noise), as ``pats_param_groups`` gives.
"""
import os
import sys
import time

import pytest
import torch
import torch.multiprocessing as mp

deepspeed = pytest.importorskip("deepspeed", reason="the DeepSpeed tests need deepspeed: pip install -e '.[test]'")

from fusednoise import hype, lnsr, neftune, noisytune  # noqa: E402
from fusednoise.optim import PATSAdamax, pats_param_groups  # noqa: E402
from processes import free_port, join_or_fail  # noqa: E402
from tiny_models import tiny_bert  # noqa: E402

WORLD_SIZE = 2
STEPS = 3
BATCH = 4  # per rank
# The tiny BERT's encoder sensitivities |theta * g| are ~2e-8, near the default noise_eps (1e-8): no margin, so that
# the noise moves the parameters by ~1e-2, far beyond the tolerance. (A noise_eps far below them would make the
# noise of near-zero sensitivities hang on their last bits, which the gradients' rounding changes.)
PATS_ARGS = dict(lr=1e-2, gamma=0.0, seed=1234)
NOISE = dict(noise_lambda=1e-4, noise_prob=0.5)
PATS_CASES = {  # name: (ZeRO stage, backend, noise arguments)
    "zero1-reference": (1, "reference", NOISE),
    "zero2-reference": (2, "reference", NOISE),
    "zero2-triton": (2, "triton", NOISE),
}
NO_NOISE = dict(noise_lambda=0.0)  # run without DeepSpeed only: the noise's size
HYPE_SEED, LNSR_SEED, NEFTUNE_SEED, NOISYTUNE_SEED = 7, 11, 13, 5


def _deepspeed_env(rank: int, world_size: int, port: int) -> None:
    """The environment DeepSpeed and accelerate read for a rank, and no compiled shared-memory op."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                      DS_ACCELERATOR="cpu")
    torch.set_num_threads(1)
    import deepspeed.comm  # noqa: F401  (loads deepspeed.comm.torch)

    # DeepSpeed's CPU backend compiles a C++ shared-memory all-reduce on first use (3.5 minutes on this CPU, cached
    # afterwards); it serves only its inference all-reduce, and None is its own fallback (an incompatible op).
    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None


def _bert(seed=0):
    return tiny_bert(seed, hidden_size=32, intermediate_size=37)


def _batches(rank):
    gen = torch.Generator().manual_seed(100 + rank)
    return [dict(input_ids=torch.randint(2, 40, (BATCH, 8), generator=gen),
                 labels=torch.randint(0, 2, (BATCH,), generator=gen)) for _ in range(STEPS)]


def _config(stage, **extra):
    return {"train_micro_batch_size_per_gpu": BATCH, "zero_optimization": {"stage": stage},
            "zero_allow_untested_optimizer": True, **extra}


def _engine(model, optimizer, stage):
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=_config(stage))
    return engine


def _full(engine):
    """The engine's parameters, whole (ZeRO-3 gathers them), as plain tensors."""
    params = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        return [p.detach().clone() for p in params]


def _hooked_forward(model, call, method, rank):
    """Training-mode logits (and LNSR's penalty) of ``call`` (the model, or its engine) with ``method`` on ``model``."""
    model.train()
    batch = _batches(rank)[0]
    penalty = torch.zeros(())
    with torch.no_grad():
        if method == "hype":
            with hype.apply(model, sigma=0.1, seed=HYPE_SEED):
                logits = call(**batch).logits
        elif method == "neftune":
            with neftune.apply(model, alpha=15.0, seed=NEFTUNE_SEED):
                logits = call(**batch).logits
        else:
            torch.manual_seed(LNSR_SEED + rank)  # LNSR draws its noise seed from the CPU generator
            outputs, penalty = lnsr.LNSR(model, scale=0.5)(**batch)
            logits = outputs.logits
    return logits.clone(), penalty.clone()


# --------------------------------------------------------------------------------------------- the two ranks
def _pats_runs(rank, out):
    import fusednoise
    from fusednoise.integrations import deepspeed as fds

    for name, (stage, backend, noise) in PATS_CASES.items():
        model = _bert()
        opt = PATSAdamax(pats_param_groups(model), **PATS_ARGS, **noise)
        engine = _engine(model, opt, stage)
        fds.bind(engine)
        with fusednoise.backend(backend):
            for batch in _batches(rank):
                engine.backward(engine(**batch).loss)
                engine.step()
        out[f"pats/{name}"] = _full(engine)
        out[f"cut/{name}"] = [p.shared for layout in opt._flat_layouts.values() for p in layout.pieces]


def _refusals(out):
    """ZeRO-3 with PATSAdamax: bind refuses it, and so does the first step of an unbound engine (any stage)."""
    from fusednoise.integrations import deepspeed as fds

    for stage in (3, 2):
        model = _bert()
        engine = _engine(model, PATSAdamax(pats_param_groups(model), **PATS_ARGS, **NOISE), stage)
        before = _full(engine)
        if stage == 3:
            with pytest.raises(NotImplementedError) as bound:
                fds.bind(engine)
            out["refused/bind-zero3"] = str(bound.value)
        with pytest.raises(TypeError) as stepped:
            engine.backward(engine(**_batches(0)[0]).loss)
            engine.step()
        out[f"refused/step-zero{stage}"] = str(stepped.value)
        out[f"refused/unchanged-zero{stage}"] = all(torch.equal(a, b) for a, b in zip(before, _full(engine)))


def _zero3_runs(rank, out):
    from fusednoise.integrations import deepspeed as fds

    model = _bert()
    engine = _engine(model, torch.optim.Adamax(model.parameters(), lr=0.0), 3)
    out["zero3/partitioned"] = all(p.numel() == 0 for p in model.parameters())  # the module holds placeholders
    for method in ("hype", "lnsr", "neftune"):  # first: NoisyTune changes the weights
        out[method] = _hooked_forward(engine.module, engine, method, rank)
    report = noisytune.perturb_(engine.module, 0.15, seed=NOISYTUNE_SEED)
    # DeepSpeed's float32 master partitions take the perturbation, or the first step (lr 0 here) would undo it
    out["refreshed"] = fds.refresh_master_weights(engine.optimizer)
    engine.backward(engine(**_batches(rank)[0]).loss)
    engine.step()
    out["noisytune"] = (_full(engine), report.std, report.skipped)


def _engines_worker(rank, port, out_dir):
    _deepspeed_env(rank, WORLD_SIZE, port)
    deepspeed.init_distributed(dist_backend="gloo")
    out = {}
    try:
        started = time.monotonic()
        _pats_runs(rank, out)
        print(f"pats runs: {time.monotonic() - started:.1f} s", flush=True)
        _refusals(out)
        print(f"refusals: {time.monotonic() - started:.1f} s", flush=True)
        _zero3_runs(rank, out)
        print(f"zero3: {time.monotonic() - started:.1f} s", flush=True)
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        import torch.distributed as dist

        dist.destroy_process_group()


# --------------------------------------------------------------------------------------------- the Trainer
TRAINER_METHODS = dict(hype=dict(sigma=0.1, seed=4), lnsr=dict(scale=0.5), noisytune=dict(seed=5),
                       neftune=dict(alpha=15.0, seed=6), pats=dict(noise_lambda=1e-4, noise_prob=0.5, gamma=0.0, seed=7))


def _train(deepspeed_config, methods, out_dir):
    import datasets
    import transformers

    from fusednoise.integrations.trainer import FusedNoiseTrainer

    gen = torch.Generator().manual_seed(5)
    rows = [dict(input_ids=torch.randint(2, 40, (8,), generator=gen).tolist(), attention_mask=[1] * 6 + [0] * 2,
                 labels=i % 2) for i in range(8)]
    model = _bert()
    args = transformers.TrainingArguments(output_dir=os.path.join(out_dir, "trainer"), per_device_train_batch_size=4, max_steps=2,
                                          learning_rate=1e-2, report_to=[], save_strategy="no", logging_steps=1,
                                          use_cpu=True, deepspeed=deepspeed_config, seed=3,
                                          disable_tqdm=True)
    trainer = FusedNoiseTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(rows), **methods)
    trainer.train()
    penalties = [log["lnsr_penalty"] for log in trainer.state.log_history if "lnsr_penalty" in log]
    return dict(params=[p.detach().clone() for p in model.parameters()], penalties=penalties,
                perturbed=trainer.noisytune_report.n_perturbed if trainer.noisytune_report else 0,
                hype_counters=trainer.hype_callback.noise_state if trainer.hype_callback else None)


def _trainer_worker(rank, port, out_dir):
    _deepspeed_env(rank, 1, port)
    auto = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto"}
    started = time.monotonic()
    out = {"plain": _train(None, TRAINER_METHODS, out_dir),
           "zero2": _train({**auto, "zero_optimization": {"stage": 2}}, TRAINER_METHODS, out_dir)}
    without_pats = {k: v for k, v in TRAINER_METHODS.items() if k != "pats"}
    out["plain-without-pats"] = _train(None, without_pats, out_dir)
    out["zero3-without-pats"] = _train({**auto, "zero_optimization": {"stage": 3}}, without_pats, out_dir)
    print(f"trainer runs: {time.monotonic() - started:.1f} s", flush=True)
    try:
        _train({**auto, "zero_optimization": {"stage": 3}}, {"pats": TRAINER_METHODS["pats"]}, out_dir)
    except NotImplementedError as error:
        out["zero3-pats"] = str(error)
    torch.save(out, os.path.join(out_dir, "trainer.pt"))


# --------------------------------------------------------------------------------------------- one process
def _one_process():
    """The counterparts without DeepSpeed: one process, the two ranks' batches concatenated."""
    import fusednoise

    batches = [{key: torch.cat([a[key], b[key]]) for key in a} for a, b in zip(_batches(0), _batches(1))]
    expected = {}
    for name, (_, backend, noise) in PATS_CASES.items():
        model = _bert()
        opt = PATSAdamax(pats_param_groups(model), **PATS_ARGS, **noise)
        with fusednoise.backend(backend):
            for batch in batches:
                opt.zero_grad(set_to_none=True)
                model(**batch).loss.backward()
                opt.step()
        expected[f"pats/{name}"] = [p.detach().clone() for p in model.parameters()]
        if name == "zero2-reference":
            model = _bert()
            opt = PATSAdamax(pats_param_groups(model), **PATS_ARGS, **NO_NOISE)
            for batch in batches:
                opt.zero_grad(set_to_none=True)
                model(**batch).loss.backward()
                opt.step()
            expected["pats/no-noise"] = [p.detach().clone() for p in model.parameters()]
    model = _bert()
    expected["noisytune"] = (noisytune.perturb_(model, 0.15, seed=NOISYTUNE_SEED),
                             [p.detach().clone() for p in model.parameters()])
    for method in ("hype", "lnsr", "neftune"):
        expected[method] = [_hooked_forward(model, model, method, rank)
                            for rank, model in ((r, _bert()) for r in range(WORLD_SIZE))]
        expected[f"{method}/clean"] = [_bert().eval()(**_batches(r)[0]).logits.detach() for r in range(WORLD_SIZE)]
    return expected


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("deepspeed")
    started = time.monotonic()
    engines = mp.spawn(_engines_worker, args=(free_port(), str(out)), nprocs=WORLD_SIZE, join=False)
    trainer = mp.spawn(_trainer_worker, args=(free_port(), str(out)), nprocs=1, join=False)
    expected = _one_process()  # meanwhile
    join_or_fail(engines, 400, "DeepSpeed engines")
    join_or_fail(trainer, 400, "DeepSpeed Trainer")
    print(f"\nDeepSpeed runs: {time.monotonic() - started:.1f} s")
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD_SIZE)]
    return ranks, torch.load(out / "trainer.pt", weights_only=False), expected


def _max_diff(a, b):
    return max((x.double() - y.double()).abs().max().item() for x, y in zip(a, b))


# --------------------------------------------------------------------------------------------- PATS
@pytest.mark.parametrize("name", list(PATS_CASES))
def test_pats_under_zero_two_ranks_equals_one_process_without_deepspeed(runs, name):
    ranks, _, expected = runs
    zero = ranks[0][f"pats/{name}"]
    assert all(torch.equal(a, b) for a, b in zip(zero, ranks[1][f"pats/{name}"]))  # the ranks agree
    difference = _max_diff(zero, expected[f"pats/{name}"])
    print(f"PATS {name}, two ranks against one process: max |difference| {difference:.2e}")
    assert difference < 1e-5


def test_the_partitions_cut_noise_tensors_and_the_noise_is_large_against_the_tolerance(runs):
    """A parameter cut between the two ranks' partitions (its mean from both), and noise that moves the
    parameters far more than the 1e-5 tolerance: a per-partition mean or a draw keyed by the partition's index
    would fail the test above."""
    ranks, _, expected = runs
    assert all(any(rank[f"cut/{name}"]) for rank in ranks for name in PATS_CASES)
    assert _max_diff(expected["pats/zero2-reference"], expected["pats/no-noise"]) > 1e-2
    assert _max_diff(expected["pats/zero2-reference"], expected["pats/zero2-triton"]) < 1e-5


def test_pats_refuses_zero3_and_unbound_partitions_before_any_change(runs):
    ranks, _, _ = runs
    for rank in ranks:
        assert "ZeRO-3 is not supported" in rank["refused/bind-zero3"] or "under ZeRO-3" in rank["refused/bind-zero3"]
        assert "ZeRO-1 or ZeRO-2" in rank["refused/bind-zero3"] and "FSDP2" in rank["refused/bind-zero3"]
        for stage in (2, 3):
            assert "fusednoise.integrations.deepspeed.bind(engine)" in rank[f"refused/step-zero{stage}"]
            assert rank[f"refused/unchanged-zero{stage}"]


# --------------------------------------------------------------------------------------------- the other methods
def test_noisytune_under_zero3_perturbs_the_whole_matrices(runs):
    ranks, _, expected = runs
    report, params = expected["noisytune"]
    for rank in ranks:
        assert rank["zero3/partitioned"] and rank["refreshed"]
        zero3, std, skipped = rank["noisytune"]
        assert _max_diff(zero3, params) < 1e-6
        assert std.keys() == report.std.keys() and skipped == report.skipped
        assert all(abs(std[name] - report.std[name]) <= 1e-6 * report.std[name] for name in std)
    assert _max_diff(params, _bert().parameters()) > 1e-3  # and the noise was there


@pytest.mark.parametrize("method", ["hype", "lnsr", "neftune"])
def test_hooks_on_a_zero3_engines_module_act_as_on_the_model(runs, method):
    ranks, _, expected = runs
    for rank, (logits, penalty), clean in zip(ranks, expected[method], expected[f"{method}/clean"]):
        torch.testing.assert_close(rank[method][0], logits, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(rank[method][1], penalty, rtol=1e-5, atol=1e-7)
        if method == "lnsr":
            assert penalty > 0
        else:
            assert (logits - clean).abs().max() > 1e-3  # the noise changed the logits


# --------------------------------------------------------------------------------------------- the Trainer
def test_trainer_with_deepspeed_zero2_equals_the_trainer_without(runs):
    _, trainer, _ = runs
    plain, zero2 = trainer["plain"], trainer["zero2"]
    difference = _max_diff(plain["params"], zero2["params"])
    print(f"Trainer, all five methods, ZeRO-2 against no DeepSpeed: max |difference| {difference:.2e}")
    assert difference < 1e-5
    assert zero2["perturbed"] > 0 and zero2["penalties"] and min(zero2["penalties"]) > 0
    assert zero2["hype_counters"] == plain["hype_counters"] and zero2["hype_counters"]
    assert _max_diff(plain["params"], trainer["plain-without-pats"]["params"]) > 1e-3  # PATS's noise counted


def test_trainer_with_deepspeed_zero3_equals_the_trainer_without_and_refuses_pats(runs):
    _, trainer, _ = runs
    # ZeRO-3 reduces the gradients in its own buckets: last-bit differences, which Adamax's lr * m / u turns into up
    # to ~1e-5 for gradients near 0 after two steps at lr 1e-2
    assert _max_diff(trainer["plain-without-pats"]["params"], trainer["zero3-without-pats"]["params"]) < 5e-5
    assert trainer["zero3-without-pats"]["perturbed"] > 0
    assert "ZeRO-3" in trainer["zero3-pats"] and "ZeRO-1 or ZeRO-2" in trainer["zero3-pats"]
