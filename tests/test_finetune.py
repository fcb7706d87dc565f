"""The Trainer integration (on a tiny random BERT) and ``fusednoise finetune`` end to end (on real RTE + MiniLM).

The Hugging Face Trainer needs ``accelerate``: a missing install fails here rather than being skipped."""
import json
import math
import warnings
from pathlib import Path

import pytest
import torch

import datasets
import transformers as hf
from transformers import TrainerCallback, TrainingArguments

from fusednoise.experiments import finetune
from fusednoise.cli import main
from fusednoise.experiments.finetune import FinetuneConfig, parse_recipe
from fusednoise.integrations.trainer import (FusedNoiseTrainer, HyPeCallback, HyPeConfig, LNSRConfig,
                                             NoisyTuneConfig, PATSConfig, warmup_steps_for)

GLUE_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "glue"
needs_glue = pytest.mark.skipif(not GLUE_DIR.is_dir(), reason="needs ../shared/data/glue")

VOCAB, SEQ, N = 64, 12, 32


def tiny_bert(hidden_dropout=0.0, num_labels=2, seed=0):
    torch.manual_seed(seed)
    config = hf.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=hidden_dropout,
                           attention_probs_dropout_prob=0.0, num_labels=num_labels)
    return hf.BertForSequenceClassification(config)


def tiny_data(seed=0):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, VOCAB, (N, SEQ), generator=generator)
    labels = (ids[:, 0] % 2).tolist()  # learnable: the first token's parity
    return datasets.Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": [[1] * SEQ] * N,
                                       "labels": labels})


def tiny_args(tmp_path, **overrides):
    kwargs = dict(output_dir=str(tmp_path / "trainer"), num_train_epochs=2, per_device_train_batch_size=8,
                  per_device_eval_batch_size=16, learning_rate=1e-3, eval_strategy="no", logging_strategy="epoch",
                  save_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True, seed=0)
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)


def batch_of(dataset, n=8):
    rows = dataset[:n]
    return {"input_ids": torch.tensor(rows["input_ids"]), "attention_mask": torch.tensor(rows["attention_mask"]),
            "labels": torch.tensor(rows["labels"])}


class Probe(TrainerCallback):
    """Runs ``check(model)`` at the first step's start (weights not yet updated)."""

    def __init__(self, check):
        self.check, self.seen = check, []

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if state.global_step == 0:
            self.seen.append(self.check(model))


# --------------------------------------------------------------------------------------------- integration
def test_hype_on_while_training_off_in_eval_and_removed_after(tmp_path):
    model = tiny_bert(hidden_dropout=0.1)
    data = tiny_data()
    batch = {k: v for k, v in batch_of(data).items() if k != "labels"}
    model.eval()
    with torch.no_grad():
        clean_eval = model(**batch).logits.clone()

    def check(m):
        dropout_ps = [mod.p for mod in m.modules() if isinstance(mod, torch.nn.Dropout)]
        with torch.no_grad():
            m.eval()
            eval_logits = m(**batch).logits
            m.train()
            a, b = m(**batch).logits, m(**batch).logits
        return dropout_ps, torch.equal(eval_logits, clean_eval), torch.equal(a, b)

    probe = Probe(check)
    trainer = FusedNoiseTrainer(model=model, args=tiny_args(tmp_path, eval_strategy="epoch"), train_dataset=data,
                                eval_dataset=data, hype=HyPeConfig(sigma=1e-2), callbacks=[probe])
    trainer.train()
    dropout_ps, eval_unchanged, train_repeatable = probe.seen[0]
    assert max(dropout_ps) == 0.0               # hidden dropout off while HyPe is on (paper setting)
    assert eval_unchanged                       # eval mode: bitwise the model without HyPe
    assert not train_repeatable                 # train mode: fresh noise on every forward
    # After training: hooks gone, dropout restored, and the last in-training evaluation (hooks attached, eval
    # mode) equals an evaluation of the same weights without HyPe.
    assert trainer.hype_callback.handle is None
    assert {mod.p for mod in model.modules() if isinstance(mod, torch.nn.Dropout)} == {0.1, 0.0}
    layers = model.bert.encoder.layer
    assert all(len(layer._forward_pre_hooks) == 0 for layer in layers)
    in_training = [e["eval_loss"] for e in trainer.state.log_history if "eval_loss" in e][-1]
    assert trainer.evaluate()["eval_loss"] == in_training


def test_hype_callback_on_a_plain_trainer(tmp_path):
    model = tiny_bert()
    data = tiny_data()
    seen = []
    probe = Probe(lambda m: seen.append(sum(len(layer._forward_pre_hooks) for layer in m.bert.encoder.layer)))
    trainer = hf.Trainer(model=model, args=tiny_args(tmp_path, num_train_epochs=1), train_dataset=data,
                         callbacks=[HyPeCallback({"sigma": 1e-5, "distribution": "uniform"}), probe])
    trainer.train()
    assert seen == [2]
    assert sum(len(layer._forward_pre_hooks) for layer in model.bert.encoder.layer) == 0


def _rebound(model):
    """The modules whose forward is an instance attribute (what the fused patch rebinds)."""
    return [name for name, module in model.named_modules() if "forward" in module.__dict__]


def test_hype_fused_patches_the_trainers_model_until_training_ends(tmp_path):
    model = tiny_bert()
    data = tiny_data()
    batch = {k: v for k, v in batch_of(data).items() if k != "labels"}

    def check(m):
        with torch.no_grad():
            m.train()
            a, b = m(**batch).logits, m(**batch).logits
        return _rebound(m), [len(layer._forward_pre_hooks) for layer in m.bert.encoder.layer], torch.equal(a, b)

    probe = Probe(check)
    trainer = FusedNoiseTrainer(model=model, args=tiny_args(tmp_path, num_train_epochs=1), train_dataset=data,
                                hype=HyPeConfig(sigma=1e-2, fused=True), callbacks=[probe])
    trainer.train()
    rebound, hooks, repeatable = probe.seen[0]
    # both norms of both BERT layers fused; the first layer's noise from its hook, the second's from layer 0's op
    assert rebound == [f"bert.encoder.layer.{i}.{sub}" for i in (0, 1) for sub in ("attention.output", "output")]
    assert hooks == [1, 0] and not repeatable  # and the noise is on
    # on_train_end, where the hooks are removed, restores the forwards
    assert trainer.hype_callback.handle is None
    assert _rebound(model) == [] and all(not layer._forward_pre_hooks for layer in model.bert.encoder.layer)


def test_hype_fused_defaults_to_hooks_and_is_checked_where_the_trainer_is_built(tmp_path):
    assert HyPeConfig().fused is False
    probe = Probe(_rebound)
    FusedNoiseTrainer(model=tiny_bert(), args=tiny_args(tmp_path, num_train_epochs=1), train_dataset=tiny_data(),
                      hype=True, callbacks=[probe]).train()
    assert probe.seen == [[]]  # no forward rebound: the hooks
    with pytest.raises(ValueError, match="HyPeConfig.fused must be one of"):
        FusedNoiseTrainer(model=tiny_bert(), args=tiny_args(tmp_path), hype={"fused": "yes"})
    with pytest.raises(ValueError, match="HyPeConfig.fused must be one of"):
        HyPeConfig(fused=1)


def test_noisytune_perturbs_once_before_the_first_step(tmp_path, monkeypatch):
    from fusednoise import noisytune

    calls = []
    original = noisytune.perturb_

    def counting(*args, **kwargs):
        calls.append(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(noisytune, "perturb_", counting)
    model = tiny_bert()
    before = model.bert.encoder.layer[0].attention.self.query.weight.detach().clone()
    probe = Probe(lambda m: m.bert.encoder.layer[0].attention.self.query.weight.detach().clone())
    trainer = FusedNoiseTrainer(model=model, args=tiny_args(tmp_path, num_train_epochs=1), train_dataset=tiny_data(),
                                noisytune=NoisyTuneConfig(noise_lambda=0.15, seed=7), callbacks=[probe])
    trainer.train()
    at_first_step = probe.seen[0]
    change = (at_first_step - before).abs()
    assert change.max() > 0
    assert change.max() <= 0.15 / 2 * before.std() * (1 + 1e-5)  # U(-lambda/2, lambda/2) * std(W)
    assert trainer.noisytune_report.n_perturbed > 0 and calls[0]["noise_lambda"] == 0.15
    trainer.train()                             # a second train() of the same model: no second perturbation
    assert len(calls) == 1


def test_pats_builds_the_optimizer_from_the_training_arguments(tmp_path):
    from fusednoise.optim import PATSAdamax

    model = tiny_bert()
    args = tiny_args(tmp_path, num_train_epochs=1, learning_rate=3e-4)
    trainer = FusedNoiseTrainer(model=model, args=args, train_dataset=tiny_data(), pats=True)
    trainer.train()
    optimizer = trainer.optimizer
    optimizer = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper
    assert isinstance(optimizer, PATSAdamax)
    flags = {group["noise"] for group in optimizer.param_groups}
    assert flags == {True, False}
    assert {group["noise_lambda"] for group in optimizer.param_groups} == {2e-6}
    assert all(group["initial_lr"] == 3e-4 for group in optimizer.param_groups)
    noisy = [p for g in optimizer.param_groups if g["noise"] for p in g["params"]]
    assert all("sensitivity" in optimizer.state[p] for p in noisy)

    custom = FusedNoiseTrainer(model=tiny_bert(), args=args, train_dataset=tiny_data(),
                               pats=PATSConfig(lr=1e-5, noise_lambda=0.0))
    built = custom.create_optimizer()
    assert {g["lr"] for g in built.param_groups} == {1e-5} and {g["noise_lambda"] for g in built.param_groups} == {0}


def test_noisytune_leaves_the_task_head_alone_unless_asked(tmp_path):
    def perturbed(config):
        model = tiny_bert()
        before = {name: p.detach().clone() for name, p in model.named_parameters()}
        trainer = FusedNoiseTrainer(model=model, args=tiny_args(tmp_path, max_steps=1, learning_rate=0.0),
                                    train_dataset=tiny_data(), noisytune=config)
        trainer.train()
        changed = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
        return changed, trainer.noisytune_report

    changed, report = perturbed(NoisyTuneConfig(seed=3))
    head = {"classifier.weight", "classifier.bias"}
    assert not changed & head and changed  # learning rate 0: only NoisyTune changed anything
    assert all(report.skipped[name].startswith("task head") for name in head)
    changed, report = perturbed(NoisyTuneConfig(seed=3, include_head=True))
    assert "classifier.weight" in changed and "classifier.weight" in report.perturbed


def test_hype_seed_counters_survive_a_checkpoint_resume(tmp_path):
    data = tiny_data()
    hype = HyPeConfig(sigma=0.05, seed=11)  # large noise, so a replayed sequence shows in the weights
    args = dict(num_train_epochs=1, per_device_train_batch_size=4, save_strategy="steps", save_steps=4,
                optim="sgd", learning_rate=0.1, lr_scheduler_type="constant")

    def train(folder, resume=None):
        model = tiny_bert(seed=0)
        trainer = FusedNoiseTrainer(model=model, args=tiny_args(tmp_path / folder, **args), train_dataset=data,
                                    hype=hype)
        trainer.train(resume_from_checkpoint=resume)
        return {name: p.detach().clone() for name, p in model.named_parameters()}, trainer

    whole, trainer = train("whole")  # 8 steps, checkpoints at 4 and 8
    assert trainer.hype_callback.noise_state == {"seed": 11, "calls": [8, 8]}
    checkpoint = tmp_path / "whole" / "trainer" / "checkpoint-4"
    saved = json.loads((checkpoint / "trainer_state.json").read_text())["stateful_callbacks"]["HyPeCallback"]
    assert saved["attributes"]["noise_state"] == {"seed": 11, "calls": [4, 4]}
    resumed, _ = train("resumed", resume=str(checkpoint))
    for name in whole:
        torch.testing.assert_close(resumed[name], whole[name], rtol=0, atol=1e-6)
    # Without the counters the resumed run replays the noise of steps 1-4: the weights then differ.
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    state["stateful_callbacks"]["HyPeCallback"]["attributes"]["noise_state"] = None
    (checkpoint / "trainer_state.json").write_text(json.dumps(state))
    replayed, _ = train("replayed", resume=str(checkpoint))
    assert max((replayed[n] - whole[n]).abs().max().item() for n in whole) > 1e-4


def test_lnsr_with_gradient_accumulation_matches_one_large_batch(tmp_path, monkeypatch):
    from fusednoise import lnsr

    # Noise that depends on each example alone, so two micro-batches of 8 and one batch of 16 get the same noise.
    monkeypatch.setattr(lnsr, "scaled_noise", lambda x, scale, seed=None: x + scale * x.flip(-1))
    data = tiny_data()

    def weights(batch_size, accumulation):
        model = tiny_bert(seed=1)
        args = tiny_args(tmp_path, num_train_epochs=1, per_device_train_batch_size=batch_size,
                         gradient_accumulation_steps=accumulation, optim="sgd", learning_rate=0.5,
                         max_grad_norm=0.0, lr_scheduler_type="constant")
        trainer = FusedNoiseTrainer(model=model, args=args, train_dataset=data, lnsr=LNSRConfig(scale=0.5))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the penalty dominates on a random model, as it should here
            trainer.train()
        return {name: p.detach().clone() for name, p in model.named_parameters()}

    large, accumulated = weights(16, 1), weights(8, 2)
    moved = max((large[n] - tiny_bert(seed=1).state_dict()[n]).abs().max().item() for n in large)
    assert moved > 1e-3
    for name in large:
        torch.testing.assert_close(accumulated[name], large[name], rtol=1e-4, atol=2e-5)  # float sums
    # The check can fail: without the division the accumulated loss counts twice.
    monkeypatch.setattr(FusedNoiseTrainer, "_trainer_skips_accumulation_division", lambda self, n: False)
    doubled = weights(8, 2)
    assert max((doubled[n] - large[n]).abs().max().item() for n in large) > 1e-3


@pytest.mark.filterwarnings("ignore:LNSR's penalty")  # scale 0.5 on a random model: it does dominate
def test_lnsr_penalty_is_added_in_training_only(tmp_path):
    model = tiny_bert()
    data = tiny_data()
    trainer = FusedNoiseTrainer(model=model, args=tiny_args(tmp_path, num_train_epochs=1), train_dataset=data,
                                eval_dataset=data, lnsr=LNSRConfig(scale=0.5))
    batch = batch_of(data)
    model.train()
    task_loss = model(**batch).loss
    loss = trainer.compute_loss(model, batch)
    assert loss.item() > task_loss.item() + 1e-6  # task loss (dropout 0: deterministic) + a positive penalty
    model.eval()
    assert trainer.compute_loss(model, batch).item() == model(**batch).loss.item()
    trainer.train()
    logged = [e["lnsr_penalty"] for e in trainer.state.log_history if "lnsr_penalty" in e]
    assert len(logged) == 1 and logged[0] > 0
    without_labels = {k: v for k, v in batch.items() if k != "labels"}
    model.train()
    with pytest.raises(ValueError, match="labels"):
        trainer.compute_loss(model, without_labels)


def test_lnsr_warns_once_when_its_penalty_dominates_the_task_loss(tmp_path):
    data = tiny_data()
    batch = batch_of(data)

    def first_steps(weight):
        model = tiny_bert().train()
        trainer = FusedNoiseTrainer(model=model, args=tiny_args(tmp_path), train_dataset=data,
                                    lnsr=LNSRConfig(scale=0.5, weights=weight))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer.compute_loss(model, batch)
            trainer.compute_loss(model, batch)
        penalty = float(trainer._lnsr_sum) / 2
        return [w for w in caught if "LNSR's penalty" in str(w.message)], penalty

    caught, penalty = first_steps(1e4)
    assert penalty > 100 and len(caught) == 1 and "docs/lnsr.md" in str(caught[0].message)  # once, not per step
    caught, penalty = first_steps(1e-3)
    assert caught == [] and 0 < penalty < 1  # the task loss is about ln 2


def test_trainer_argument_errors(tmp_path):
    args = tiny_args(tmp_path)
    optimizer = torch.optim.SGD(tiny_bert().parameters(), lr=0.1)
    with pytest.raises(ValueError, match="pats= builds the optimizer"):
        FusedNoiseTrainer(model=tiny_bert(), args=args, pats=True, optimizers=(optimizer, None))
    with pytest.raises(TypeError, match="hype must be None, True, a dict or a HyPeConfig"):
        FusedNoiseTrainer(model=tiny_bert(), args=args, hype=1e-5)
    with pytest.raises(TypeError, match="the fields of LNSRConfig"):
        FusedNoiseTrainer(model=tiny_bert(), args=args, lnsr={"sigma": 1})
    with pytest.raises(ValueError, match="config must describe HyPe"):
        HyPeCallback(None)


def test_warmup_steps():
    assert warmup_steps_for(1000, 32, 3, 0.1) == 10  # 32 steps per epoch, 96 in all
    assert warmup_steps_for(32, 16, 1, 0.1) == 1
    assert warmup_steps_for(100, 32, 2, 0.0) == 0
    with pytest.raises(ValueError, match="ratio"):
        warmup_steps_for(100, 32, 2, 1.0)


# --------------------------------------------------------------------------------------------- recipes
def test_recipes_parse_combine_and_refuse():
    assert parse_recipe("noisytune+hype-n") == ("hype-n", "noisytune")
    assert parse_recipe(["pats", "lnsr"]) == ("lnsr", "pats")
    for bad, message in (("vanilla+pats", "combines with nothing"), ("hype-n+hype-u", "cannot be combined"),
                         ("pats+adamax", "cannot be combined"), ("hype", "must be one of"),
                         ("lnsr+lnsr", "twice")):
        with pytest.raises(ValueError, match=message):
            parse_recipe(bad)


def test_config_maps_methods_to_the_papers_defaults():
    config = FinetuneConfig(task="rte", methods=("hype-u", "lnsr-manifold", "noisytune", "pats"))
    kwargs = config.trainer_kwargs()
    assert kwargs["hype"] == HyPeConfig(sigma=1e-5, distribution="uniform", layers=None, disable_dropout=True)
    assert kwargs["lnsr"] == LNSRConfig(scale=0.05, inject_layer=0, weights=1.0, noise="in_manifold", k=10,
                                        mix_ratio=0.1)
    assert kwargs["noisytune"] == NoisyTuneConfig(noise_lambda=0.15)
    assert kwargs["pats"].lr == 3e-4 and kwargs["pats"].noise_lambda == 2e-6 and kwargs["pats"].gamma == 2e-3
    assert kwargs["pats"].sensitivity_beta == 0.75 and kwargs["pats"].noise_prob == 0.2
    assert FinetuneConfig(task="cola", methods=("adamax",)).trainer_kwargs()["pats"].noise_lambda == 0.0
    assert FinetuneConfig(task="cola", methods=("pats",)).optimizer_lr == 1e-4
    assert FinetuneConfig(task="cola", methods=("vanilla",), lr=5e-5).trainer_kwargs() == {
        "hype": None, "lnsr": None, "noisytune": None, "pats": None}
    fused = FinetuneConfig(task="rte", methods=("hype-n",), hype_fused="auto")
    assert fused.trainer_kwargs()["hype"].fused == "auto" and fused.label == "hype-n (hype_fused=auto)"
    with pytest.raises(ValueError, match="hype_fused must be"):
        FinetuneConfig(hype_fused="yes")
    with pytest.raises(ValueError, match="max_train_samples"):
        FinetuneConfig(max_train_samples=0)
    with pytest.raises(ValueError, match="lr must be"):
        FinetuneConfig(lr=-1.0)


# --------------------------------------------------------------------------------------------- end to end
@needs_glue
def test_finetune_command_end_to_end_with_every_method(tmp_path, capsys):
    out = tmp_path / "out"
    common = ["--task", "rte", "--data-dir", str(GLUE_DIR), "--max-train-samples", "32", "--max-eval-samples", "32",
              "--epochs", "1", "--batch-size", "32", "--max-length", "48", "--output", str(out), "--no-progress",
              "--device", "cpu", "--warmup-ratio", "0"]  # one step: with warm-up it would run at lr 0 (refused)
    assert main(["finetune", "--compare", "all", *common]) == 0
    assert main(["finetune", "--method", "hype-n", "--method", "noisytune", *common]) == 0  # a combination
    recipes = list(finetune.METHODS) + ["hype-n+noisytune"]
    files = sorted((out / "runs").glob("*.json"))
    runs = {json.loads(f.read_text())["recipe"]: json.loads(f.read_text()) for f in files}
    assert sorted(runs) == sorted(recipes)
    for recipe, run in runs.items():
        name = finetune.run_file_name(run["config"])
        assert (out / "runs" / name).is_file() and name.startswith(f"rte__{recipe}__") and name.endswith("__seed0.json")
        assert run["config"]["device"] == "cpu"
        timing = run["timing"]  # what the step times were measured on
        assert timing["host"] and timing["torch_threads"] >= 1 and timing["calibration_ms_end"] > 0
        assert len(timing["load_average_start"]) == 3 and len(timing["load_average_end"]) == 3
        assert run["config"]["methods"] == recipe.split("+")
        assert run["train_examples"] == 32 and run["dev_examples"] == 32 and run["optimizer_steps"] == 1
        assert [row["epoch"] for row in run["per_epoch"]] == [1]
        assert 0 <= run["per_epoch"][0]["accuracy"] <= 1 and math.isfinite(run["per_epoch"][0]["train_loss"])
        assert run["metrics"]["accuracy"] == run["per_epoch"][0]["accuracy"]
        assert run["wall_time_s"] > 0 and run["peak_memory_mb"] > 100 and run["device"].startswith("cpu")
        assert run["schema"] == "fusednoise.finetune/3" and run["label"] == recipe and run["method_settings"] == {}
        assert run["step_time_s"]["steps_timed"] == 1 and run["step_time_s"]["median"] > 0
        assert "too few to train" in run["warnings"][0]
        assert run["majority_baseline"]["prediction"].startswith("always class")
    # Each method did what it says.
    assert runs["lnsr"]["per_epoch"][0]["lnsr_penalty"] > 0
    assert runs["lnsr-manifold"]["per_epoch"][0]["lnsr_penalty"] > 0
    assert "lnsr_penalty" not in runs["vanilla"]["per_epoch"][0]
    assert runs["noisytune"]["noisytune_report"]["n_perturbed"] > 0
    assert set(runs["noisytune"]["noisytune_report"]["skipped"]) >= {"classifier.weight", "classifier.bias"}
    assert runs["hype-n+noisytune"]["noisytune_report"]["n_perturbed"] > 0
    assert runs["vanilla"]["noisytune_report"] is None
    assert runs["pats"]["config"]["optimizer"].startswith("Adamax") and runs["pats"]["config"]["optimizer_lr"] == 3e-4
    assert runs["hype-u"]["config"]["optimizer"] == "AdamW"
    table = (out / "results.md").read_text()
    for recipe in recipes:
        assert f"| {recipe} ⚠ | 0 |" in table
    assert "| majority baseline: always class" in table and "too few to train" in table
    assert "### RTE" in table
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "fusednoise finetune: 1 run(s)" in capsys.readouterr().out


@needs_glue
def test_the_example_script_runs(tmp_path):
    import subprocess
    import sys

    script = Path(__file__).resolve().parents[1] / "examples" / "finetune_trainer.py"
    result = subprocess.run([sys.executable, str(script), "--data-dir", str(GLUE_DIR), "--max-train-samples", "16",
                             "--max-eval-samples", "16", "--epochs", "1", "--output", str(tmp_path / "out")],
                            capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "NoisyTune(lambda=0.15): perturbed" in result.stdout
    assert "'eval_accuracy'" in result.stdout
    assert "pin_memory" not in result.stderr  # no pinned-memory warning on a machine without a GPU
