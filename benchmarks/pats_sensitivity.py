"""PATS's sensitivities |theta * g| on the pretrained model, at the first step of fine-tuning: the scale that
``noise_eps`` must sit below (docs/pats.md, "noise_eps").

    python benchmarks/pats_sensitivity.py --data-dir ../shared/data/glue --task rte \
        --output benchmarks/results/pats-sensitivity/minilm-rte.json

Loads the packaged pretrained all-MiniLM-L6-v2 with a fresh classification head, takes one batch of real GLUE
examples, runs one forward and backward pass and records, for every tensor PATS perturbs
(:func:`fusednoise.optim.pats_param_groups`' noise groups: the encoder layers' weights), the mean sensitivity
``s_bar`` and the 1% / 50% quantiles of ``|theta * g|``, grouped by the kind of matrix. It also reports what
``noise_eps`` does to an element whose sensitivity EMA is still 0: its ratio ``s_bar / noise_eps``. Not a pytest
file: a measurement whose JSON backs docs/pats.md.
"""
import argparse
import json
import re
from pathlib import Path

import torch
from transformers import DataCollatorWithPadding

from fusednoise.experiments.glue import load_glue, tokenize
from fusednoise.experiments.models import load_classifier
from fusednoise.optim import pats_param_groups
from fusednoise.optim.pats import DEFAULT_NOISE_EPS

KINDS = (("query/key weights", r"\.(query|key)\.weight$"),
         ("value, attention-output, FFN weights",
          r"\.(value|attention\.output\.dense|intermediate\.dense|output\.dense)\.weight$"),
         ("biases", r"\.bias$"))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--task", default="rte")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default=None)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    splits = load_glue(args.task, args.data_dir, max_train_samples=args.batch_size, data_seed=args.seed)
    model, tokenizer = load_classifier(None, num_labels=1 if args.task == "stsb" else 2)
    encoded = tokenize(splits, tokenizer, args.task, args.max_length)
    batch = DataCollatorWithPadding(tokenizer)([encoded["train"][i] for i in range(args.batch_size)])
    batch["labels"] = batch.pop("label") if "label" in batch else batch["labels"]
    model.train()
    model(**batch).loss.backward()

    names = {id(p): n for n, p in model.named_parameters()}
    noisy = [p for group in pats_param_groups(model) if group.get("noise", True) for p in group["params"]]
    rows = []
    for p in noisy:
        s = (p.detach() * p.grad).abs().flatten().double()
        rows.append({"name": names[id(p)], "numel": s.numel(), "s_bar": float(s.mean()),
                     "q01": float(s.quantile(0.01)) if s.numel() <= 2**24 else None,
                     "q50": float(s.median()), "zero_fraction": float((s == 0).double().mean()),
                     "below_noise_eps": float((s < DEFAULT_NOISE_EPS).double().mean())})
    summary = {}
    for kind, pattern in KINDS:
        members = [r for r in rows if re.search(pattern, r["name"])]
        if members:
            summary[kind] = {
                "tensors": len(members),
                "s_bar": [min(r["s_bar"] for r in members), max(r["s_bar"] for r in members)],
                "q01": [min(r["q01"] for r in members), max(r["q01"] for r in members)],
                "q50": [min(r["q50"] for r in members), max(r["q50"] for r in members)],
                "below_noise_eps": [min(r["below_noise_eps"] for r in members),
                                    max(r["below_noise_eps"] for r in members)],
                "s_bar_over_q01": [min(r["s_bar"] / max(r["q01"], 1e-30) for r in members),
                                   max(r["s_bar"] / max(r["q01"], 1e-30) for r in members)],
                "zero_sensitivity_ratio_cap": [min(r["s_bar"] for r in members) / DEFAULT_NOISE_EPS,
                                               max(r["s_bar"] for r in members) / DEFAULT_NOISE_EPS],
            }
    result = {"model": "all-MiniLM-L6-v2 (pretrained, fresh head)", "task": args.task,
              "batch": [args.batch_size, args.max_length], "noise_eps": DEFAULT_NOISE_EPS, "summary": summary,
              "tensors": rows}
    print(json.dumps(summary, indent=2))
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
