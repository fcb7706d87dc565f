"""Add HyPe, NoisyTune, PATS and LNSR to an existing Hugging Face ``Trainer`` script.

Everything below is an ordinary Trainer script (model, tokenizer, datasets, TrainingArguments); the lines marked
``# fusednoise`` are the only ones the regularisers need. Run it as is (GLUE RTE, the packaged all-MiniLM-L6-v2):

    python examples/finetune_trainer.py --data-dir ../shared/data/glue --max-train-samples 256 --epochs 2

or without ``--data-dir`` to read GLUE from the Hugging Face hub, and ``--model`` for any sequence-classification
checkpoint (a hub name or a local folder).
"""
import argparse

import numpy as np
import torch
from transformers import DataCollatorWithPadding, TrainingArguments

from fusednoise.experiments.glue import compute_metrics, load_glue, tokenize
from fusednoise.integrations.transformers import (FusedNoiseTrainer, HyPeConfig, LNSRConfig,  # fusednoise
                                                  NoisyTuneConfig, PATSConfig, warmup_steps_for)
from fusednoise.experiments.models import load_classifier


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=None, help="GLUE TSV folder (default: the hub)")
    parser.add_argument("--model", default=None, help="default: the packaged all-MiniLM-L6-v2")
    parser.add_argument("--max-train-samples", type=int, default=256)
    parser.add_argument("--max-eval-samples", type=int, default=None, help="quick checks only (default: all)")
    parser.add_argument("--epochs", type=float, default=2)
    parser.add_argument("--lnsr", action="store_true", help="also add the LNSR penalty (two forward passes)")
    parser.add_argument("--output", default="fusednoise-runs/example")
    args = parser.parse_args()

    # An ordinary setup: data, model, tokenizer, metrics.
    splits = load_glue("rte", args.data_dir, max_train_samples=args.max_train_samples,
                       max_eval_samples=args.max_eval_samples)
    model, tokenizer = load_classifier(args.model, num_labels=2)
    encoded = tokenize(splits, tokenizer, "rte", max_length=128)

    def metrics(prediction):
        return compute_metrics("rte", prediction.predictions, prediction.label_ids)

    training_args = TrainingArguments(
        output_dir=args.output, num_train_epochs=args.epochs, per_device_train_batch_size=16,
        learning_rate=5e-5, lr_scheduler_type="linear",
        warmup_steps=warmup_steps_for(len(encoded["train"]), 16, args.epochs, ratio=0.1),  # 10% linear warm-up
        eval_strategy="epoch", logging_strategy="epoch", save_strategy="no", report_to="none", seed=0,
        dataloader_pin_memory=torch.cuda.is_available())  # pinning helps host-to-GPU copies only (warns on a CPU)

    trainer = FusedNoiseTrainer(                                   # fusednoise: instead of Trainer(
        model=model, args=training_args, train_dataset=encoded["train"], eval_dataset=encoded["validation"],
        data_collator=DataCollatorWithPadding(tokenizer), processing_class=tokenizer, compute_metrics=metrics,
        hype=HyPeConfig(sigma=1e-5, distribution="normal"),      # fusednoise: HyPe-N on while training
        noisytune=NoisyTuneConfig(noise_lambda=0.15),            # fusednoise: perturb once before step 1
        pats=PATSConfig(lr=3e-4),                                # fusednoise: PATSAdamax as the optimizer
        lnsr=LNSRConfig(scale=0.05) if args.lnsr else None,      # fusednoise: LNSR penalty in compute_loss
    )
    trainer.train()
    print(trainer.noisytune_report)
    final = trainer.evaluate()
    print({key: round(float(np.round(value, 4)), 4) for key, value in final.items() if key.startswith("eval_")})


if __name__ == "__main__":
    main()
