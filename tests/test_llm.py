"""Causal LMs with LoRA (PEFT) in bf16: HyPe, LNSR, NoisyTune, PATS and NEFTune on LLaMA-, Mistral- and
Qwen2-style models, FusedNoiseMixin with TRL's SFTTrainer, and examples/sft_lora.py."""
import importlib.util
from pathlib import Path

import pytest
import torch

import fusednoise
from fusednoise import hype, lnsr, neftune, noisytune
from fusednoise.experiments.llm import FAMILIES, tiny_causal_lm, word_tokenizer
from fusednoise.optim import PATSAdamax, pats_param_groups
from fusednoise.reference import noise as reference_noise

peft = pytest.importorskip("peft", reason="the LLM tests need the [llm] extra: pip install -e '.[llm]'")
trl = pytest.importorskip("trl", reason="the LLM tests need the [llm] extra: pip install -e '.[llm]'")

ROOT = Path(__file__).resolve().parents[1]
GLUE_DIR = ROOT.parent / "shared" / "data" / "glue"
needs_glue = pytest.mark.skipif(not GLUE_DIR.is_dir(), reason="needs ../shared/data/glue")


def lora_model(family, dtype=torch.bfloat16, seed=0):
    """A tiny random causal LM wrapped by PEFT (LoRA on q_proj and v_proj, PEFT's default for these families)."""
    model = tiny_causal_lm(family, dtype=dtype, seed=seed)
    return peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, task_type="CAUSAL_LM"))


def padded_batch(lengths, tokens, vocab=256, seed=0):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, vocab, (len(lengths), tokens), generator=generator)
    mask = (torch.arange(tokens)[None, :] < torch.tensor(lengths)[:, None]).long()
    labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids.masked_fill(mask == 0, 0), "attention_mask": mask, "labels": labels}


def lora_parameters(model):
    return {name: p for name, p in model.named_parameters() if "lora_" in name}


def step_lora_b_once(model, batch):
    """One SGD step on the LoRA matrices, so that lora_B is no longer zero and every path carries a gradient."""
    model(**batch).loss.backward()
    with torch.no_grad():
        for p in lora_parameters(model).values():
            p -= 1e-1 * p.grad
            p.grad = None


# ---------------------------------------------------------------------------------- HyPe
def record_layer_inputs(model, index):
    """Record what layer ``index`` computes on: the input of its first norm (after any HyPe pre-hook)."""
    seen = []
    norm = model.base_model.model.model.layers[index].input_layernorm
    handle = norm.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach().clone()))
    return seen, handle


@pytest.mark.parametrize("family", FAMILIES)
def test_hype_on_a_bf16_lora_model_keeps_its_noise_with_stochastic_rounding(family):
    model = lora_model(family)
    batch = padded_batch([10, 6], 10)
    with torch.no_grad():
        plain_eval = model.eval()(**batch).logits
    model.train()
    seen, recorder = record_layer_inputs(model, 0)
    ids = torch.randint(4, 256, (8, 64), generator=torch.Generator().manual_seed(1))
    model(input_ids=ids)
    clean = seen[0]
    assert clean.dtype == torch.bfloat16  # the residual stream is bf16
    # The noise HyPe adds at layer 0 (its seed rule; a bf16 input takes the 16-bit draws of half precision), and how
    # much of it the stored bf16 input keeps: the slope of the stored change on the noise. sigma 1e-5 is below
    # bf16's resolution at these activations (std 0.02).
    unit = reference_noise.standard_noise(clean.numel(), "normal", hype.derive_seed(99, 0, 0), bits=16)
    eps = (unit.view(clean.shape) * 1e-5).double()
    slope = {}
    for rounding in ("nearest", "stochastic"):
        with hype.apply(model, sigma=1e-5, rounding=rounding, seed=99):
            model(input_ids=ids)
        change = seen[-1].double() - clean.double()
        slope[rounding] = float((change * eps).sum() / (eps * eps).sum())
    recorder.remove()
    # measured: nearest keeps about 0.28 of the noise, stochastic rounding all of it in expectation
    assert abs(slope["stochastic"] - 1) < 0.15 and slope["nearest"] < 0.5, slope
    with hype.apply(model, sigma=1e-5, rounding="stochastic"):
        model(**batch).loss.backward()
        with torch.no_grad():
            assert torch.equal(model.eval()(**batch).logits, plain_eval)  # eval: bitwise the model without HyPe
    grads = [p.grad for name, p in lora_parameters(model).items() if "lora_B" in name]
    assert all(g is not None and bool(torch.isfinite(g).all()) and float(g.abs().sum()) > 0 for g in grads)


# ---------------------------------------------------------------------------------- LNSR
@pytest.mark.parametrize("family", FAMILIES)
def test_lnsr_penalty_on_decoder_states_is_masked_by_the_attention_mask(family):
    model = lora_model(family).train()
    step_lora_b_once(model, padded_batch([9, 9], 9, seed=5))
    reg = lnsr.LNSR(model)
    assert reg.depth == 2 and reg.model_type == family
    batch = padded_batch([9, 4], 9)
    other_padding = dict(batch, input_ids=batch["input_ids"].masked_fill(batch["attention_mask"] == 0, 7))

    def penalty(inputs, masked=True):
        torch.manual_seed(0)
        if not masked:
            inputs = {k: v for k, v in inputs.items() if k != "attention_mask"}
        return reg(**inputs)

    outputs, first = penalty(batch)
    _, second = penalty(other_padding)
    assert first.dtype == torch.float32 and 0 < float(first) < float("inf")
    # Right padding in a causal model: what the padded positions hold cannot reach the real tokens, and the
    # masked penalty ignores the padded positions themselves, so it does not move. Without the mask it does.
    assert torch.equal(first, second)
    _, unmasked = penalty(batch, masked=False)
    _, unmasked_other = penalty(other_padding, masked=False)
    assert not torch.equal(unmasked, unmasked_other)
    (outputs.loss + first).backward()
    lora_grads = [p.grad for p in lora_parameters(model).values()]
    assert all(g is not None and bool(torch.isfinite(g).all()) for g in lora_grads)


# ---------------------------------------------------------------------------------- NoisyTune
@pytest.mark.parametrize("family", FAMILIES)
def test_noisytune_perturbs_the_pretrained_weights_of_a_lora_model(family):
    model = lora_model(family)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    report = noisytune.perturb_(model, noise_lambda=0.15, exclude="lora_", seed=3)
    lora = set(lora_parameters(model))
    for name, p in model.named_parameters():
        if name in lora:
            assert torch.equal(p, before[name]) and report.skipped[name] == "excluded"
        elif float(before[name].float().std()) > 0:  # not RMSNorm's ones nor Qwen2's zero biases (std 0)
            assert p.dtype == torch.bfloat16 and not torch.equal(p, before[name]), name
        else:
            assert torch.equal(p, before[name]), name
    assert report.n_perturbed == sum(1 for n, p in before.items() if n not in lora and float(p.float().std()) > 0)
    # Without exclude, LoRA's zero-initialised B matrices are skipped (std 0) and its A matrices perturbed.
    report = noisytune.perturb_(lora_model(family), noise_lambda=0.15, seed=3)
    assert all(report.skipped.get(n) for n in lora if "lora_B" in n)


# ---------------------------------------------------------------------------------- PATS
@pytest.mark.parametrize("family", FAMILIES)
def test_pats_puts_its_noise_on_the_lora_matrices(family):
    groups = pats_param_groups(lora_model(family))
    assert [g["noise"] for g in groups] == [True]  # only LoRA matrices are trainable, all inside the layers
    finals = {}
    for noise_lambda in (0.0, 1e-2):
        model = lora_model(family).train()
        frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
        groups = pats_param_groups(model)
        assert {id(p) for g in groups for p in g["params"]} == {id(p) for p in lora_parameters(model).values()}
        optimizer = PATSAdamax(groups, lr=1e-2, noise_lambda=noise_lambda, noise_prob=1.0, seed=11)
        batch = padded_batch([8, 5], 8)
        for _ in range(3):
            optimizer.zero_grad()
            model(**batch).loss.backward()
            optimizer.step()
        assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
        finals[noise_lambda] = {n: p.detach().clone() for n, p in lora_parameters(model).items()}
    changed = [n for n in finals[0.0] if not torch.equal(finals[0.0][n], finals[1e-2][n])]
    assert changed and all("lora_" in n for n in changed)


# ---------------------------------------------------------------------------------- NEFTune
@pytest.mark.parametrize("family", FAMILIES)
def test_neftune_on_a_bf16_lora_model(family):
    model = lora_model(family).train()
    batch = padded_batch([10, 3], 10)
    embeddings = model.get_input_embeddings()
    clean = embeddings(batch["input_ids"]).detach()
    seen, recorder = record_layer_inputs(model, 0)
    with neftune.apply(model, alpha=5.0):  # the mask comes from PeftModel's forward call
        model(**batch).loss.backward()
    recorder.remove()
    assert seen[0].dtype == torch.bfloat16
    assert torch.equal(seen[0][1, 3:], clean[1, 3:]) and not torch.equal(seen[0][1, :3], clean[1, :3])
    noise = (seen[0][1, :3].float() - clean[1, :3].float()).abs()
    assert float(noise.max()) <= 5.0 / (3 * clean.shape[-1]) ** 0.5 * 1.01  # its own length, 3 tokens


# ---------------------------------------------------------------------------------- TRL
def _instructions(n=24):
    from datasets import Dataset

    words = ["good", "bad", "film", "plot", "dull", "great", "acting", "slow"]
    rows = [{"prompt": f"Review: {' '.join(words[(i + k) % 8] for k in range(2 + i % 5))}\nSentiment:",
             "completion": " positive" if i % 2 else " negative"} for i in range(n)]
    return Dataset.from_list(rows)


def _sft_trainer(tmp_path, dtype=torch.float32, **methods):
    from fusednoise.integrations.trainer import FusedNoiseMixin

    class Trainer(FusedNoiseMixin, trl.SFTTrainer):
        pass

    data = _instructions()
    tokenizer = word_tokenizer(list(data["prompt"]) + list(data["completion"]))
    config = trl.SFTConfig(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, learning_rate=1e-2,
                           logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, max_length=32,
                           bf16=dtype == torch.bfloat16, disable_tqdm=True, seed=0)
    return Trainer(model=tiny_causal_lm("llama", vocab_size=len(tokenizer), dtype=dtype), args=config,
                   train_dataset=data, processing_class=tokenizer,
                   peft_config=peft.LoraConfig(r=4, lora_alpha=8, task_type="CAUSAL_LM"), **methods)


def test_sft_trainer_with_the_mixin_runs_every_method(tmp_path):
    from fusednoise.integrations.trainer import HyPeConfig, NEFTuneConfig, NoisyTuneConfig, PATSConfig

    trainer = _sft_trainer(tmp_path, dtype=torch.bfloat16, hype=HyPeConfig(rounding="stochastic"),
                           neftune=NEFTuneConfig(alpha=5.0), noisytune=NoisyTuneConfig(exclude=("lora_",)),
                           pats=PATSConfig(lr=1e-2))
    assert isinstance(trainer.model, peft.PeftModel)
    lora_before = {n: p.detach().clone() for n, p in lora_parameters(trainer.model).items()}
    trainer.train()
    losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
    assert len(losses) == 2 and all(0 < loss < 100 for loss in losses)
    assert isinstance(getattr(trainer.optimizer, "optimizer", trainer.optimizer), PATSAdamax)
    assert trainer.noisytune_report.n_perturbed > 0
    assert not any("lora_" in name for name in trainer.noisytune_report.perturbed)
    assert trainer.hype_callback.handle is None and trainer.neftune_callback.handle is None  # removed at the end
    after = lora_parameters(trainer.model)
    assert any(not torch.equal(after[n], lora_before[n]) for n in lora_before)


def test_sft_trainer_with_lnsr_logs_its_penalty(tmp_path):
    from fusednoise.integrations.trainer import LNSRConfig

    trainer = _sft_trainer(tmp_path, lnsr=LNSRConfig())
    trainer.train()
    rows = [row for row in trainer.state.log_history if "loss" in row]
    assert len(rows) == 2 and all(row["lnsr_penalty"] > 0 for row in rows)


@needs_glue
def test_the_sft_lora_example_runs_tiny(capsys):
    spec = importlib.util.spec_from_file_location("sft_lora", ROOT / "examples" / "sft_lora.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    assert example.main(["--tiny", "--max-steps", "2", "--train-examples", "32", "--data-dir", str(GLUE_DIR),
                         "--method", "neftune", "--method", "hype", "--method", "pats"]) == 0
    out = capsys.readouterr().out
    assert "tiny random LLaMA" in out and "methods: neftune, hype, pats" in out
    assert "at step 2 (PATSAdamax" in out
