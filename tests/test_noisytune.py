"""NoisyTune: the bounds and variance of the perturbation, constant / excluded / tiny tensors, the report,
determinism, and the fused kernels against the eager reference with the same seed."""
import math

import pytest
import torch
import transformers

import fusednoise
from fusednoise.kernels import noisytune as kernels
from fusednoise.noisytune import PerturbReport, perturb_
from fusednoise.reference import noisytune as reference

# Where the kernel cases run: CUDA when there is a GPU, else CPU tensors under Triton's interpreter
# (tests/conftest.py sets TRITON_INTERPRET=1). Not imported from conftest: benchmarks/ has a conftest too.
KERNEL_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

BACKENDS = ["reference", "triton"]


def _device(backend):
    return KERNEL_DEVICE if backend == "triton" else "cpu"


def _tensors(device, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(64, 48), (3000,), (40000,), (5, 7, 3)]  # 40000: two statistics chunks, ten noise programs
    out = [(0.3 + 0.05 * torch.randn(s, generator=gen)).to(device=device, dtype=dtype) for s in shapes]
    out.append((0.02 * torch.randn(9, 6, generator=gen)).to(device=device, dtype=dtype).t())  # non-contiguous
    return out


@pytest.mark.parametrize("backend", BACKENDS)
def test_bounds_and_untouched_when_lambda_zero(backend):
    tensors = _tensors(_device(backend))
    originals = [t.clone() for t in tensors]
    lam = 0.15
    with fusednoise.backend(backend):
        report = perturb_(tensors, noise_lambda=lam, seed=3)
    assert report.n_perturbed == len(tensors) and report.n_skipped == 0
    for i, (t, o) in enumerate(zip(tensors, originals)):
        std = o.double().std().item()
        delta = (t.double() - o.double()).abs()
        assert delta.max().item() <= lam / 2 * std * (1 + 1e-5) + 1e-7
        assert delta.max().item() > 0.8 * lam / 2 * std  # the range is used, not a smaller one
        assert report.std[str(i)] == pytest.approx(std, rel=1e-5)
    again = [o.clone() for o in originals]
    with fusednoise.backend(backend):
        perturb_(again, noise_lambda=0.0, seed=3)
    assert all(torch.equal(a, o) for a, o in zip(again, originals))


@pytest.mark.parametrize("backend", BACKENDS)
def test_variance_and_mean(backend):
    """U(-lambda/2, lambda/2) * std has mean 0 and variance (lambda * std)^2 / 12."""
    n = 2**18 if backend == "reference" else 2**16
    x = (1.5 * torch.randn(n, generator=torch.Generator().manual_seed(1))).to(_device(backend))
    original = x.clone()
    lam = 0.1
    with fusednoise.backend(backend):
        perturb_([x], noise_lambda=lam, seed=11)
    delta = (x.double() - original.double()).cpu()
    half = lam / 2 * original.double().std().item()
    var = half**2 / 3
    assert abs(delta.mean().item()) < 5 * math.sqrt(var / n)
    # Var of the sample variance of a uniform: (E[d^4] - var^2) / n with E[d^4] = half^4 / 5
    assert abs(delta.var().item() - var) < 5 * math.sqrt((half**4 / 5 - var**2) / n)
    # and it is uniform: each quarter of the range holds a quarter of the draws
    counts = torch.histc(delta.float(), bins=4, min=-half, max=half)
    assert torch.all((counts / n - 0.25).abs() < 5 * math.sqrt(0.25 * 0.75 / n))


@pytest.mark.parametrize("backend", BACKENDS)
def test_constant_excluded_and_tiny_tensors_untouched(backend):
    device = _device(backend)
    model = torch.nn.Module()
    model.constant = torch.nn.Parameter(torch.full((10, 10), 0.1, device=device))  # torch.std gives ~7e-9 here
    model.word_embeddings = torch.nn.Parameter(torch.randn(20, 4, device=device))
    model.scalar = torch.nn.Parameter(torch.randn(1, device=device))
    model.weight = torch.nn.Parameter(torch.randn(8, 8, device=device))
    model.register_buffer("not_a_parameter", torch.randn(5, device=device))
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    buffer = model.not_a_parameter.clone()
    with fusednoise.backend(backend):
        report = perturb_(model, exclude=("word_embeddings",), seed=0)
    assert report.perturbed == ["weight"]
    assert report.skipped == {"constant": "constant (std 0)", "word_embeddings": "excluded",
                              "scalar": "fewer than 2 elements (no unbiased std)"}
    for name in ("constant", "word_embeddings", "scalar"):
        assert torch.equal(getattr(model, name), before[name]), name
    assert not torch.equal(model.weight, before["weight"])
    assert torch.equal(model.not_a_parameter, buffer)
    assert "perturbed 1 tensors, skipped 3" in str(report)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's numpy
@pytest.mark.parametrize("backend", BACKENDS)
def test_non_finite_matrix_untouched(backend):
    x = torch.randn(50, device=_device(backend))
    x[3] = float("inf")
    before = x.clone()
    with fusednoise.backend(backend):
        report = perturb_([("w", x)], seed=0)
    assert report.skipped == {"w": "non-finite std"} and torch.equal(x, before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_kernel_matches_reference(dtype):
    kernel_tensors = _tensors(KERNEL_DEVICE, dtype, seed=4)
    ref_tensors = [t.detach().cpu().clone() for t in kernel_tensors]
    originals = [t.clone() for t in ref_tensors]
    with fusednoise.backend("triton"):
        k_report = perturb_(kernel_tensors, noise_lambda=0.15, seed=99)
    with fusednoise.backend("reference"):
        r_report = perturb_(ref_tensors, noise_lambda=0.15, seed=99)
    assert k_report.perturbed == r_report.perturbed
    for name in r_report.std:
        assert k_report.std[name] == pytest.approx(r_report.std[name], rel=1e-5)
    for k, r, o in zip(kernel_tensors, ref_tensors, originals):
        k = k.detach().cpu()
        assert k.dtype == dtype
        if dtype == torch.float32:
            assert torch.allclose(k, r, rtol=0, atol=1e-6)
        else:  # the same float32 value rounded: at most one ulp apart, nearly always equal
            ulp = torch.finfo(dtype).eps
            assert torch.allclose(k.float(), r.float(), rtol=ulp, atol=0)
            assert (k != r).float().mean() < 0.01
        assert not torch.equal(k, o)


def test_reference_std_is_the_unbiased_std():
    x = torch.randn(1000, dtype=torch.float64).float() * 3 + 7
    assert reference.matrix_std(x).item() == pytest.approx(x.double().std().item(), rel=1e-6)
    assert reference.matrix_std(torch.full((7, 3), 1 / 3)).item() == 0.0


def test_kernel_stats_merge_over_chunks_and_lanes():
    """The kernel's chunked Welford/Chan statistics equal the plain two-pass std (several chunks, ragged tail)."""
    n = kernels.STATS_CHUNK * 2 + 777
    x = (torch.randn(n, generator=torch.Generator().manual_seed(2)) * 0.04 + 5.0).to(KERNEL_DEVICE)
    std = kernels.launch_perturb([x.clone()], [0], 0.0, seed=1)
    assert std.item() == pytest.approx(x.double().std().item(), rel=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_deterministic_and_keyed_by_position(backend):
    device = _device(backend)
    a, b, c = _tensors(device)[:3], _tensors(device)[:3], _tensors(device)[:3]
    with fusednoise.backend(backend):
        perturb_(a, seed=5)
        perturb_(b, seed=5)
        perturb_([("0", c[0]), ("1", c[1]), ("2", c[2])], exclude="1", seed=5)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    # excluding tensor 1 does not change the noise of tensors 0 and 2 (each keyed by its position)
    assert torch.equal(c[0], a[0]) and torch.equal(c[2], a[2])
    d = _tensors(device)[:1]
    with fusednoise.backend(backend):
        perturb_(d, seed=6)
    assert not torch.equal(d[0], a[0])


def _expected_noisytune(x, seed, k, noise_lambda):
    """SPEC section 3 written out: ``W + (u - 0.5) * lambda * std(W)`` in float32, with ``u`` of element ``i`` the
    uniform of word ``i % 4`` of ``philox(seed, i // 4 (lo, hi), k, 0)``, from the plain-torch philox."""
    from fusednoise import rng

    flat = x.detach().reshape(-1).double()
    std = torch.tensor(float(flat.std()), dtype=torch.float32)
    blocks = torch.arange((flat.numel() + 3) // 4, dtype=torch.int64)
    lo, hi = blocks & 0xFFFFFFFF, blocks >> 32
    words = rng._philox4x32_torch(seed, lo, hi, torch.full_like(lo, k), torch.zeros_like(lo), 10)
    u = torch.stack([rng.uint_to_uniform(w) for w in words], dim=1).reshape(-1)[:flat.numel()]
    noise = (u - 0.5) * (torch.tensor(noise_lambda, dtype=torch.float32) * std)
    return (x.detach().reshape(-1).cpu().float() + noise).view(x.shape)


@pytest.mark.parametrize("backend", BACKENDS)
def test_same_shape_matrices_draw_their_own_streams(backend):
    """Two matrices of one shape and the same values get different noise: the k-th tensor draws stream k,
    each equal to the formula's (a shared stream would give them identical noise)."""
    device = _device(backend)
    gen = torch.Generator().manual_seed(3)
    base = 0.1 * torch.randn(16, 12, generator=gen)
    tensors = [base.clone().to(device), base.clone().to(device), torch.randn(30, generator=gen).to(device),
               base.clone().to(device)]
    originals = [t.clone() for t in tensors]
    with fusednoise.backend(backend):
        perturb_(tensors, noise_lambda=0.15, seed=77)
    noises = [(t - o).cpu() for t, o in zip(tensors, originals)]
    assert noises[0].abs().min() > 0 and not torch.equal(noises[0], noises[1])
    assert not torch.equal(noises[0], noises[3]) and not torch.equal(noises[1], noises[3])
    assert (noises[0] - noises[1]).abs().mean() > 0.1 * noises[0].abs().mean()
    for k in (0, 1, 3):
        expected = _expected_noisytune(originals[k].cpu(), 77, k, 0.15)
        torch.testing.assert_close(tensors[k].cpu(), expected, rtol=0, atol=1e-7, msg=f"tensor {k}")


def test_seed_from_cpu_generator():
    x, y = torch.randn(100), None
    y = x.clone()
    torch.manual_seed(17)
    r1 = perturb_([x])
    torch.manual_seed(17)
    r2 = perturb_([y])
    assert r1.seed == r2.seed and torch.equal(x, y)


def test_model_with_tied_weights_and_requires_grad():
    torch.manual_seed(0)
    config = transformers.BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=32, vocab_size=40, max_position_embeddings=16)
    model = transformers.BertForMaskedLM(config)  # decoder weight tied to the word embeddings
    tied = model.bert.embeddings.word_embeddings.weight
    before = tied.detach().clone()
    report = perturb_(model, seed=1)
    assert isinstance(report, PerturbReport)
    names = dict(model.named_parameters())
    assert report.n_perturbed + report.n_skipped == len(names)
    assert not torch.equal(tied, before) and tied.requires_grad
    # the paper's constant matrices: BERT's LayerNorm biases start at zero (std 0) and stay untouched
    assert report.skipped["bert.embeddings.LayerNorm.bias"] == "constant (std 0)"
    assert torch.all(model.bert.embeddings.LayerNorm.bias == 0)


def test_task_head_is_left_alone_unless_included():
    torch.manual_seed(0)
    config = transformers.BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=32, vocab_size=40, max_position_embeddings=16, num_labels=3)
    pretrained = transformers.BertForSequenceClassification(config).state_dict()
    runs = {}
    for include_head in (False, True):
        model = transformers.BertForSequenceClassification(config)
        model.load_state_dict(pretrained)
        report = perturb_(model, seed=5, include_head=include_head)
        runs[include_head] = ({n: p.detach().clone() for n, p in model.named_parameters()}, report)
    (default, default_report), (with_head, head_report) = runs[False], runs[True]
    head = {"classifier.weight", "classifier.bias"}
    assert {n: default_report.skipped[n] for n in head} == {n: "task head (outside model.base_model: not "
                                                            "pretrained; include_head=True perturbs it)" for n in head}
    assert torch.equal(default["classifier.weight"], pretrained["classifier.weight"])
    assert "classifier.weight" in head_report.perturbed
    assert not torch.equal(with_head["classifier.weight"], pretrained["classifier.weight"])
    # The pretrained matrices get the same noise either way: a tensor's noise is keyed by its position.
    for name in default:
        if name not in head:
            assert torch.equal(default[name], with_head[name]), name
    base = transformers.BertModel(config)  # a base model has no head to leave out
    assert not any(r.startswith("task head") for r in perturb_(base, seed=5).skipped.values())
    with pytest.raises(TypeError, match="include_head"):
        perturb_(base, include_head="no")


@pytest.mark.parametrize("kwargs, error, name", [
    (dict(noise_lambda=-0.1), ValueError, "noise_lambda"), (dict(noise_lambda=float("inf")), ValueError,
                                                            "noise_lambda"),
    (dict(noise_lambda="0.1"), TypeError, "noise_lambda"), (dict(exclude=3), TypeError, "exclude"),
    (dict(exclude=["a", 1]), TypeError, "exclude"), (dict(seed=-1), ValueError, "seed"),
])
def test_bad_arguments(kwargs, error, name):
    x = torch.randn(10)
    before = x.clone()
    with pytest.raises(error, match=name):
        perturb_([x], **kwargs)
    assert torch.equal(x, before)


def test_bad_model_or_params():
    with pytest.raises(TypeError, match="model_or_params"):
        perturb_(3)
    with pytest.raises(TypeError, match=r"model_or_params\[1\]"):
        perturb_([torch.randn(3), "w"])
    report = perturb_([torch.arange(6), torch.randn(4, dtype=torch.complex64)], seed=0)
    assert set(report.skipped.values()) == {"not a real floating-point tensor"}


# --------------------------------------------------------------------------------------------- shards (FSDP2)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_shards_perturbed_with_the_merged_std_equal_the_whole_matrix(dtype):
    """The sharded perturbation in one process: each "rank" takes its rows' float64 moments, the moments merge into
    the matrix's std, and each shard takes the noise of its unsharded elements (offsets 640 and 1280, a multiple of
    4; 1281 and 3 are not: the per-element launch). Both backends give the whole matrix's perturbation."""
    gen = torch.Generator().manual_seed(8)
    whole = (0.3 + 0.05 * torch.randn(3201, generator=gen)).to(dtype)
    bounds = [0, 640, 1280, 1281, 3201]
    shards = [whole[a:b].clone() for a, b in zip(bounds, bounds[1:])]
    moments = torch.stack([reference.shard_moments(s) for s in shards]).unsqueeze(1)  # (ranks, 1 matrix, 3)
    std = reference.merge_moments(moments)[0]
    assert std.item() == pytest.approx(reference.matrix_std(whole).item(), rel=1e-6)
    perturbed = whole.clone()
    reference.perturb_tensor_(perturbed, 0.15, seed=6, stream=2)
    for backend in BACKENDS:
        parts = [s.clone().to(_device(backend)) for s in shards]
        for part, offset in zip(parts, bounds):
            if backend == "reference":
                reference.add_scaled_noise_(part, 0.15, 6, 2, std, offset)
            else:
                kernels.launch_perturb([part], [2], 0.15, 6, [offset], std.reshape(1).to(part.device))
        joined = torch.cat([p.cpu() for p in parts]).float()
        ulp = 0.0 if dtype == torch.float32 else torch.finfo(dtype).eps
        assert torch.allclose(joined, perturbed.float(), rtol=ulp, atol=1e-6), backend


def test_merged_moments_keep_constant_matrices_at_zero_and_skip_empty_shards():
    shards = [torch.full((4, 3), 0.1), torch.zeros(0, 3), torch.full((2, 3), 0.1)]
    moments = torch.stack([reference.shard_moments(s) for s in shards]).unsqueeze(1)
    assert reference.merge_moments(moments).item() == 0.0
    assert reference.merge_moments(moments[[1, 0, 2]]).item() == 0.0  # an empty first shard
