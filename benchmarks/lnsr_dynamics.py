"""Why LNSR at the papers' defaults collapses MiniLM: the task loss and the penalty, step by step.

    python benchmarks/lnsr_dynamics.py --data-dir ../shared/data/glue --lr 1e-4 --weight 1 --reduction sum \
        --output benchmarks/results/lnsr-dynamics/lr1e-4-w1.json

Trains the packaged all-MiniLM-L6-v2 on a GLUE subset with AdamW plus ``LNSR(weights=--weight)`` (standard noise,
scale 0.05, noise at the embedding output) and records, per step, the task loss, the penalty and its per-layer
terms, the gradient norm; every ``--eval-every`` steps, on a fixed batch, the norms of the task loss's and the
penalty's gradients taken separately, and on ``--eval-samples`` dev examples the accuracy, the fraction predicted
positive and the mean pairwise cosine similarity of the last layer's [CLS] vectors (near 1: every input maps to
the same representation, the collapse). Not a pytest file: a measurement whose JSON backs the LNSR section of
``benchmarks/results/finetune-minilm-cpu-glue4.md``.

With ``--first-step``, it measures instead, for every reduction x dropout mode of LNSR at lambda_r = 1, the
penalty / task-loss ratio and the ratio of their gradient norms on the first batch (16 examples, the fine-tuning
runs' batch) of each ``--tasks`` task for each ``--seeds`` seed, from the freshly loaded model (``--model``: another
model than the packaged MiniLM, to see where its lambda_r puts the ratio; ``docs/lnsr.md``, "Choosing lambda_r")::

    python benchmarks/lnsr_dynamics.py --first-step --data-dir ../shared/data/glue --tasks rte mrpc cola stsb \
        --seeds 0 1 2 --output benchmarks/results/lnsr-dynamics/first-step.json
"""
import argparse
import json
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from transformers import DataCollatorWithPadding, get_linear_schedule_with_warmup

from fusednoise.experiments.glue import get_task, load_glue, tokenize
from fusednoise.lnsr import DEFAULT_REDUCTION, LNSR, REDUCTIONS
from fusednoise.experiments.models import load_classifier

COLUMNS = ["input_ids", "attention_mask", "token_type_ids", "label"]


def _loader(dataset, tokenizer, batch_size: int, shuffle: bool, seed: int) -> DataLoader:
    collate = DataCollatorWithPadding(tokenizer)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, collate_fn=collate,
                      generator=torch.Generator().manual_seed(seed))


def _grad_norm(loss: torch.Tensor, parameters) -> float:
    grads = torch.autograd.grad(loss, parameters, retain_graph=True, allow_unused=True)
    return float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads if g is not None])))


def _probe(model, reg, probe_batch, dev_loader) -> dict:
    """Separate gradient norms on a fixed batch (train mode), then dev statistics (eval mode)."""
    parameters = [p for p in model.parameters() if p.requires_grad]
    outputs, penalty = reg(**probe_batch)
    record = {"task_grad_norm": _grad_norm(outputs.loss, parameters),
              "penalty_grad_norm": _grad_norm(penalty, parameters) if penalty.requires_grad else 0.0}
    model.eval()
    predictions, labels, cls = [], [], []
    with torch.no_grad():
        for batch in dev_loader:
            labels.append(batch.pop("labels"))
            out = model(**batch, output_hidden_states=True)
            predictions.append(out.logits.argmax(-1))
            cls.append(torch.nn.functional.normalize(out.hidden_states[-1][:, 0], dim=-1))
    model.train()
    predictions, labels, cls = torch.cat(predictions), torch.cat(labels), torch.cat(cls)
    record.update(dev_accuracy=float((predictions == labels).float().mean()),
                  dev_fraction_positive=float(predictions.float().mean()),
                  dev_cls_mean_cosine=float((cls @ cls.T).mean()))
    return record


def first_step(args) -> dict:
    """Penalty / task loss and gradient-norm ratios on the first batch, per task, seed, reduction and dropout."""
    records = []
    for task_name in args.tasks:
        task = get_task(task_name)
        data = load_glue(task.name, args.data_dir, max_train_samples=args.max_train_samples, data_seed=0)
        for seed in args.seeds:
            torch.manual_seed(seed)
            model, tokenizer = load_classifier(args.model, num_labels=task.num_labels)
            train = tokenize(data, tokenizer, task.name)["train"].with_format("torch", columns=COLUMNS)
            batch = next(iter(_loader(train, tokenizer, args.batch_size, True, seed)))
            model.train()
            parameters = [p for p in model.parameters() if p.requires_grad]
            for reduction in REDUCTIONS:
                for replay in (True, False):
                    torch.manual_seed(seed)  # the same clean-pass dropout for every mode
                    reg = LNSR(model, weights=1.0, reduction=reduction, replay_rng=replay)
                    outputs, penalty = reg(**batch)
                    record = {"task": task.name, "seed": seed, "reduction": reduction,
                              "dropout": "replay" if replay else "independent",
                              "tokens": int(batch["attention_mask"].sum()), "task_loss": float(outputs.loss),
                              "penalty": float(penalty), "task_grad_norm": _grad_norm(outputs.loss, parameters),
                              "penalty_grad_norm": _grad_norm(penalty, parameters)}
                    record["loss_ratio"] = record["penalty"] / record["task_loss"]
                    record["grad_ratio"] = record["penalty_grad_norm"] / record["task_grad_norm"]
                    print(json.dumps(record), flush=True)
                    records.append(record)
    return {"config": vars(args), "records": records}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--first-step", action="store_true",
                        help="ratios at the first step for every reduction x dropout mode instead of a training run")
    parser.add_argument("--tasks", nargs="+", default=["rte", "mrpc", "cola", "stsb"], help="with --first-step")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="with --first-step")
    parser.add_argument("--reduction", choices=REDUCTIONS, default=DEFAULT_REDUCTION,
                        help=f"LNSR's per-example reduction (default {DEFAULT_REDUCTION}; the collapse runs: sum)")
    parser.add_argument("--independent-dropout", action="store_true",
                        help="the noisy pass draws its own dropout (default: it replays the clean pass's)")
    parser.add_argument("--model", default=None,
                        help="a local folder or hub name of the model to measure (default: the packaged MiniLM)")
    parser.add_argument("--task", default="sst2", help="a binary GLUE task (default sst2)")
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--max-train-samples", type=int, default=1000)
    parser.add_argument("--eval-samples", type=int, default=256)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=None,
                        help="default 32; 16 with --first-step (the fine-tuning runs' batch)")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--weight", type=float, default=1.0, help="LNSR lambda_r of every layer (papers: 1)")
    parser.add_argument("--max-grad-norm", type=float, default=1.0, help="clipping, as Trainer does (default 1)")
    parser.add_argument("--eval-every", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", required=True, help="JSON file to write")
    args = parser.parse_args(argv)
    if args.batch_size is None:
        args.batch_size = 16 if args.first_step else 32
    if args.first_step:
        result = first_step(args)
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(result, indent=1) + "\n")
        return result

    torch.manual_seed(args.seed)
    model, tokenizer = load_classifier(args.model, num_labels=2)
    splits = tokenize(load_glue(args.task, args.data_dir, max_train_samples=args.max_train_samples, data_seed=0),
                      tokenizer, args.task)
    train = splits["train"].with_format("torch", columns=COLUMNS)
    dev = splits["validation"].select(range(min(args.eval_samples, len(splits["validation"]))))
    dev_loader = _loader(dev.with_format("torch", columns=COLUMNS), tokenizer, 64, False, args.seed)
    probe_batch = next(iter(_loader(train, tokenizer, args.batch_size, False, args.seed)))
    reg = LNSR(model, weights=args.weight, reduction=args.reduction, replay_rng=not args.independent_dropout)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    schedule = get_linear_schedule_with_warmup(optimizer, max(1, args.steps // 10), args.steps)
    model.train()

    history = [{"step": 0, **_probe(model, reg, probe_batch, dev_loader)}]
    step, start = 0, time.perf_counter()
    while step < args.steps:
        for batch in _loader(train, tokenizer, args.batch_size, True, args.seed + step):
            outputs, penalty = reg(**batch)
            optimizer.zero_grad(set_to_none=True)
            (outputs.loss + penalty).backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
            optimizer.step()
            schedule.step()
            step += 1
            record = {"step": step, "task_loss": float(outputs.loss), "penalty": float(penalty),
                      "penalty_terms": [float(t) for t in reg.last_terms], "grad_norm": float(grad_norm)}
            if step % args.eval_every == 0 or step == args.steps:
                record.update(_probe(model, reg, probe_batch, dev_loader))
            history.append(record)
            print(json.dumps(record), flush=True)
            if step >= args.steps:
                break
    result = {"config": vars(args), "seconds": time.perf_counter() - start, "history": history}
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
