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

from fusednoise import finetune
from fusednoise.cli import main
from fusednoise.finetune import FinetuneConfig, parse_recipe, summary_table
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
    with pytest.raises(ValueError, match="max_train_samples"):
        FinetuneConfig(max_train_samples=0)
    with pytest.raises(ValueError, match="lr must be"):
        FinetuneConfig(lr=-1.0)


def _fake_run(task, recipe, seed, value, epochs=2):
    metric = finetune.get_task(task).main_metric
    config = FinetuneConfig(task=task, methods=tuple(recipe.split("+")), seed=seed, max_train_samples=100)
    return {"schema": "fusednoise.finetune/1", "config": config.to_dict(), "task": task, "recipe": recipe,
            "seed": seed, "metrics": {metric: value}, "best_epoch": {"epoch": 1, metric: value + 0.01},
            "per_epoch": [{"epoch": e + 1, metric: value - 0.01 * (epochs - e - 1)} for e in range(epochs)],
            "train_examples": 100, "dev_examples": 277, "wall_time_s": 10.0, "peak_memory_mb": 100.0,
            "peak_memory_kind": "test", "device": "cpu: test", "model": "m"}


def test_summary_table_by_hand(tmp_path):
    runs = [_fake_run("rte", "vanilla", 0, 0.50), _fake_run("rte", "vanilla", 1, 0.60),
            _fake_run("rte", "hype-n", 0, 0.56), _fake_run("rte", "hype-n", 1, 0.58)]
    table = summary_table(runs)
    # vanilla: mean 55, sample std sqrt(50) = 7.07; hype-n: mean 57, std sqrt(2) = 1.41, +2.00 over vanilla
    assert "| vanilla | 0,1 | 55.00 ± 7.07 | — | 60.00 | 56.00 ± 7.07 | 100/277 | 3 | 2e-05 | 10 | 100 |" in table
    assert "| hype-n | 0,1 | 57.00 ± 1.41 | +2.00 | 58.00 |" in table
    assert table.index("| vanilla |") < table.index("| hype-n |")
    path = finetune.plot_curves(runs, tmp_path / "curves.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_per_seed_table_pairs_each_seed_with_vanilla():
    runs = [_fake_run("rte", "vanilla", 0, 0.50), _fake_run("rte", "vanilla", 1, 0.60),
            _fake_run("rte", "hype-n", 0, 0.56), _fake_run("rte", "hype-n", 1, 0.58), _fake_run("rte", "pats", 2, 0.7)]
    table = finetune.per_seed_table(runs)
    assert "| recipe | seed 0 | seed 1 | seed 2 | paired Δ vs vanilla |" in table
    assert "| vanilla | 50.00 | 60.00 |  | — |" in table
    assert "| hype-n | 56.00 | 58.00 |  | +6.00, -2.00 |" in table  # a mean gain of +2 that changes sign
    assert "| pats |  |  | 70.00 | no vanilla run with these seeds |" in table



# --------------------------------------------------------------------------------------------- end to end
@needs_glue
def test_finetune_command_end_to_end_with_every_method(tmp_path, capsys):
    out = tmp_path / "out"
    common = ["--task", "rte", "--data-dir", str(GLUE_DIR), "--max-train-samples", "32", "--max-eval-samples", "32",
              "--epochs", "1", "--batch-size", "32", "--max-length", "48", "--output", str(out), "--no-progress",
              "--device", "cpu"]
    assert main(["finetune", "--compare", "all", *common]) == 0
    assert main(["finetune", "--method", "hype-n", "--method", "noisytune", *common]) == 0  # a combination
    recipes = list(finetune.METHODS) + ["hype-n+noisytune"]
    files = sorted((out / "runs").glob("*.json"))
    assert sorted(f.name for f in files) == sorted(f"rte__{r}__seed0.json" for r in recipes)
    runs = {json.loads(f.read_text())["recipe"]: json.loads(f.read_text()) for f in files}
    for recipe, run in runs.items():
        assert run["config"]["methods"] == recipe.split("+")
        assert run["train_examples"] == 32 and run["dev_examples"] == 32 and run["optimizer_steps"] == 1
        assert [row["epoch"] for row in run["per_epoch"]] == [1]
        assert 0 <= run["per_epoch"][0]["accuracy"] <= 1 and math.isfinite(run["per_epoch"][0]["train_loss"])
        assert run["metrics"]["accuracy"] == run["per_epoch"][0]["accuracy"]
        assert run["wall_time_s"] > 0 and run["peak_memory_mb"] > 100 and run["device"].startswith("cpu")
    # Each method did what it says.
    assert runs["lnsr"]["per_epoch"][0]["lnsr_penalty"] > 0
    assert runs["lnsr-manifold"]["per_epoch"][0]["lnsr_penalty"] > 0
    assert "lnsr_penalty" not in runs["vanilla"]["per_epoch"][0]
    assert runs["noisytune"]["noisytune_report"]["n_perturbed"] > 0
    assert runs["hype-n+noisytune"]["noisytune_report"]["n_perturbed"] > 0
    assert runs["vanilla"]["noisytune_report"] is None
    assert runs["pats"]["config"]["optimizer"].startswith("Adamax") and runs["pats"]["config"]["optimizer_lr"] == 3e-4
    assert runs["hype-u"]["config"]["optimizer"] == "AdamW"
    table = (out / "results.md").read_text()
    for recipe in recipes:
        assert f"| {recipe} | 0 |" in table
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
