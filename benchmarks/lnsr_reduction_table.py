"""The LNSR comparison of ``docs/lnsr.md``: vanilla against LNSR with each reduction x dropout setting that was
run, from the run JSONs that ``fusednoise finetune`` wrote into one or more output folders.

    python benchmarks/lnsr_reduction_table.py benchmarks/results/finetune-minilm-cpu-glue4 \\
        benchmarks/results/finetune-minilm-cpu-glue4-lnsr-token_mean-replay \\
        benchmarks/results/finetune-minilm-cpu-glue4-lnsr-mean-independent

Prints Markdown: per task, the mean ± std over seeds with the difference to vanilla, then every seed with the
paired difference to the vanilla run of the same seed (:func:`fusednoise.finetune.summary_table` and
``per_seed_table``). LNSR rows are labelled by their setting; runs written before ``reduction`` and dropout were
options (no such fields in their config) ran the literal formula with replayed dropout: ``sum, replay``.
"""
import argparse
import sys

from fusednoise.finetune import load_runs, per_seed_table, summary_table

RECIPES = ("vanilla", "lnsr")


def labelled_runs(folders):
    runs = []
    for folder in folders:
        for run in load_runs(folder):
            if run["recipe"] not in RECIPES:
                continue
            if run["recipe"] == "lnsr":
                config = run["config"]
                run["recipe"] = f"lnsr ({config.get('lnsr_reduction', 'sum')}, {config.get('lnsr_dropout', 'replay')})"
            runs.append(run)
    return runs


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("folders", nargs="+", help="output folders of fusednoise finetune")
    args = parser.parse_args(argv)
    runs = labelled_runs(args.folders)
    if not runs:
        print("no vanilla or lnsr runs in " + ", ".join(args.folders), file=sys.stderr)
        return 1
    print(summary_table(runs))
    print("## Per seed\n")
    print(per_seed_table(runs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
