"""Hugging Face ``Trainer`` integration: HyPe, LNSR, NoisyTune, PATS and NEFTune in an existing Trainer script.

The few lines a user adds::

    from fusednoise.integrations.trainer import FusedNoiseTrainer, HyPeConfig, NoisyTuneConfig, PATSConfig

    trainer = FusedNoiseTrainer(
        model=model, args=training_args, train_dataset=train, eval_dataset=dev, processing_class=tokenizer,
        compute_metrics=compute_metrics,
        hype=HyPeConfig(sigma=1e-5),            # or hype=True for the paper's defaults
        noisytune=NoisyTuneConfig(0.15),
        pats=PATSConfig(),                      # PATSAdamax replaces the optimizer
        lnsr=None,                              # LNSRConfig() adds the LNSR penalty to the loss
        neftune=None,                           # NEFTuneConfig(alpha=5.0): noise on the embeddings
    )
    trainer.train()

What each one does inside the Trainer:

* **HyPe** (:class:`HyPeCallback`): ``hype.apply`` at ``on_train_begin``, ``handle.remove()`` at ``on_train_end``.
  The noise hooks act only while the model is in training mode, so the evaluations the Trainer runs during
  training (``model.eval()``) see the model without noise, bitwise. Hidden dropout is turned off while HyPe is on
  (``disable_dropout=True``, the paper's setting) and restored by ``remove()``. With ``HyPeConfig(seed=...)`` the
  per-layer noise counters are saved in every checkpoint (``trainer_state.json``, as an ``ExportableState``) and
  restored when training resumes from it, so a resumed run draws the noise an uninterrupted one would.
  ``HyPeConfig(fused=True)`` (or ``"auto"``) passes ``fused=`` to ``hype.apply``: the layers' residual-add + norm
  are patched with the fused ops, which add the noise at no extra pass (:mod:`fusednoise.fused`), from
  ``on_train_begin`` until ``on_train_end`` restores the original forwards with the hooks.
* **NoisyTune** (:class:`NoisyTuneCallback`): ``noisytune.perturb_`` once, at ``on_train_begin`` of a run that
  starts at step 0 (a run resumed from a checkpoint already holds perturbed, trained weights and is left alone),
  and never twice on the same model.
* **PATS**: ``create_optimizer`` builds :class:`fusednoise.optim.PATSAdamax` over
  :func:`fusednoise.optim.pats_param_groups` (noise on the encoder layers' weights only), with the Trainer's
  learning rate, betas, epsilon and weight decay unless :class:`PATSConfig` sets them. The Trainer's scheduler
  (linear decay, ``warmup_steps``) drives its learning rate as for any optimizer.
* **NEFTune** (:class:`NEFTuneCallback`): ``neftune.apply`` at ``on_train_begin``, ``handle.remove()`` at
  ``on_train_end``; noise on the input embeddings scaled by each example's own length (the attention mask of
  each training batch; each packed sequence's own, from ``position_ids``, in TRL's packed and padding-free
  batches), inert in eval mode. Use it instead of ``TrainingArguments(neftune_noise_alpha=...)``
  (which scales by the padded length); setting both is an error.
* **LNSR**: ``compute_loss`` runs :class:`fusednoise.lnsr.LNSR` (a clean and a noisy pass) and returns
  ``task loss + penalty``; the mean penalty since the last log is logged as ``lnsr_penalty``. In evaluation the
  loss is the task loss alone.

With a plain ``Trainer`` (or a subclass of your own): the two callbacks work on any Trainer
(``callbacks=[HyPeCallback(), NoisyTuneCallback()]``), :func:`pats_optimizer` gives an optimizer for
``Trainer(optimizers=(pats_optimizer(model, args), None))``, and :class:`FusedNoiseMixin` adds them all to a
Trainer subclass of your own (``class MyTrainer(FusedNoiseMixin, MyBaseTrainer)``), TRL's ``SFTTrainer`` included
(``class Trainer(FusedNoiseMixin, SFTTrainer)``; ``examples/sft_lora.py``).

DeepSpeed (``TrainingArguments(deepspeed=...)``): every method. ``pats=`` needs ZeRO-1 or ZeRO-2 (the Trainer
binds the optimizer to the engine's partitions, :func:`fusednoise.integrations.deepspeed.bind`; ZeRO-3 is refused
when training starts); NoisyTune gathers ZeRO-3's matrices and refreshes DeepSpeed's float32 master weights.
"""
from __future__ import annotations

import dataclasses
import json
import math
import sys
import warnings
import weakref
from dataclasses import dataclass
from typing import Any, Dict, Optional, Sequence, Tuple, Union

from torch import nn

from ..lnsr import DEFAULT_REDUCTION, DEFAULT_REPLAY_RNG

try:
    from transformers import Trainer, TrainerCallback
    from transformers.trainer_callback import ExportableState
except ImportError as error:  # pragma: no cover - transformers is a dependency of the package
    raise ImportError("fusednoise.integrations.trainer needs transformers (and accelerate for Trainer): "
                      "pip install transformers accelerate") from error


# --------------------------------------------------------------------------------------------- configs
@dataclass
class HyPeConfig:
    """Arguments of :func:`fusednoise.hype.apply`. Paper defaults: sigma 1e-5, hidden dropout off."""

    sigma: float = 1e-5
    distribution: str = "normal"  # "normal" (HyPe-N) or "uniform" (HyPe-U)
    layers: Any = None            # None / "all", "lower", "upper", indices or modules
    disable_dropout: bool = True  # the paper turns hidden dropout off when HyPe is on
    rounding: str = "nearest"     # "stochastic" keeps sigma 1e-5 alive in a bf16/fp16 residual stream
    seed: Optional[int] = None    # None: seeds from torch's CPU generator; an int: hype.apply(seed=...)
    # False: hooks; True: the fused residual-add + norm patches (LLaMA, Mistral, Qwen2, Gemma in float32, BERT,
    # RoBERTa, ELECTRA; another architecture is an error when training starts); "auto": fused where possible,
    # else hooks
    fused: Union[bool, str] = False

    def __post_init__(self):
        from ..fused import FUSED_CHOICES

        # hype.apply checks it again, but only when training starts: a typo should fail where the Trainer is built
        if not (self.fused is True or self.fused is False or self.fused == "auto"):
            raise ValueError(f"HyPeConfig.fused must be one of {FUSED_CHOICES}, got {self.fused!r}")


@dataclass
class LNSRConfig:
    """Arguments of :class:`fusednoise.lnsr.LNSR`. Paper defaults: scale 0.05, lambda_r = 1, noise at the
    embedding output (``inject_layer=0``); in-manifold noise with k = 10 neighbours and mix ratio 0.1. The papers
    do not say what ``||.||^2`` sums over nor how dropout enters the noisy pass: ``reduction`` and ``replay_rng``
    default to what the measurements in ``docs/lnsr.md`` support."""

    scale: float = 0.05
    inject_layer: int = 0
    weights: Any = None           # None: lambda_r = 1 for every layer; a number for all; or one per layer
    noise: str = "standard"       # "standard" or "in_manifold"
    k: int = 10
    mix_ratio: float = 0.1
    reduction: str = DEFAULT_REDUCTION  # "sum", "token_mean" or "mean" per example (every one: mean over the batch)
    replay_rng: bool = DEFAULT_REPLAY_RNG  # True: the noisy pass replays the clean pass's dropout; False: its own


@dataclass
class NoisyTuneConfig:
    """Arguments of :func:`fusednoise.noisytune.perturb_`. Paper default (GLUE): lambda 0.15, on the pretrained
    matrices only (``include_head=False`` leaves the freshly initialised task head alone)."""

    noise_lambda: float = 0.15
    exclude: Sequence[str] = ()
    seed: Optional[int] = None    # None: drawn from torch's CPU generator (``torch.manual_seed`` reproduces it)
    include_head: bool = False    # also perturb the task head (parameters outside model.base_model)


@dataclass
class PATSConfig:
    """Arguments of :class:`fusednoise.optim.PATSAdamax`. Paper defaults: lambda 2e-6, gamma 2e-3, beta 0.75,
    p 0.2. ``None`` fields take the Trainer's value (learning rate, Adam betas/epsilon, weight decay) or the
    optimizer's default (``noise_eps``, ``seed``).

    ``noise_lambda=0`` gives plain Adamax (the PATS paper's baseline optimizer)."""

    lr: Optional[float] = None
    sensitivity_beta: float = 0.75
    noise_lambda: float = 2e-6
    gamma: float = 2e-3
    noise_prob: float = 0.2
    noise_eps: Optional[float] = None
    betas: Optional[Tuple[float, float]] = None
    eps: Optional[float] = None
    weight_decay: Optional[float] = None
    seed: Optional[int] = None


@dataclass
class NEFTuneConfig:
    """Arguments of :func:`fusednoise.neftune.apply`. Paper default: alpha 5 (grid 5, 10, 15)."""

    alpha: float = 5.0
    seed: Optional[int] = None    # None: drawn from torch's CPU generator at every noisy call


def _as_config(value, cls, name: str):
    """None/False -> None; True -> defaults; a dict -> cls(**dict); an instance as is."""
    if value is None or value is False:
        return None
    if value is True:
        return cls()
    if isinstance(value, cls):
        return value
    if isinstance(value, dict):
        try:
            return cls(**value)
        except TypeError as error:
            fields = [f.name for f in dataclasses.fields(cls)]
            raise TypeError(f"{name}: {error}; the fields of {cls.__name__} are {fields}") from None
    raise TypeError(f"{name} must be None, True, a dict or a {cls.__name__}, got {type(value).__name__}")


def _kwargs(config) -> Dict[str, Any]:
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}


def _json_safe(value) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True


# --------------------------------------------------------------------------------------------- callbacks
class HyPeCallback(TrainerCallback, ExportableState):
    """HyPe on at the start of training, off at its end; inert during the Trainer's evaluations (eval mode).

    Works on any ``Trainer``: ``Trainer(..., callbacks=[HyPeCallback(HyPeConfig(sigma=1e-5))])``.

    Checkpoints: the handle's noise counters (:meth:`fusednoise.hype.HyPeHandle.state_dict`) are saved with the
    Trainer's state, and a run resumed from a checkpoint (``global_step > 0`` at ``on_train_begin``) loads them,
    so with ``seed=`` the noise continues where the interrupted run stopped. (With ``seed=None`` the noise comes
    from torch's CPU generator, which the Trainer's checkpoint restores.)
    """

    def __init__(self, config: Union[HyPeConfig, dict, bool, None] = True, noise_state: Optional[dict] = None):
        self.config = _as_config(config, HyPeConfig, "config")
        if self.config is None:
            raise ValueError("config must describe HyPe (True, a dict or a HyPeConfig), got None/False")
        self.noise_state = noise_state  # counters to continue from; set by a Trainer that restores callbacks
        self.handle = None

    def state(self) -> dict:
        """``ExportableState``: the config (JSON-safe) and the noise counters, for ``trainer_state.json``."""
        config = _kwargs(self.config)
        if not _json_safe(config["layers"]):  # modules cannot be written: a restored callback hooks every layer,
            config["layers"] = None           # and loading counters of fewer layers into it fails loudly
        noise_state = self.handle.state_dict() if self.handle is not None else self.noise_state
        return {"args": {"config": config}, "attributes": {"noise_state": noise_state}}

    def _saved_noise_state(self, state) -> Optional[dict]:
        saved = (getattr(state, "stateful_callbacks", None) or {}).get(type(self).__name__)
        if isinstance(saved, list):
            if len(saved) != 1:
                warnings.warn("several HyPeCallbacks in one Trainer: their noise counters are not restored from "
                              "the checkpoint", UserWarning, stacklevel=3)
                return None
            saved = saved[0]
        noise_state = (saved or {}).get("attributes", {}).get("noise_state")
        return noise_state if noise_state is not None else self.noise_state

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        from .. import hype

        if model is None:
            raise RuntimeError("HyPeCallback needs the model: the Trainer passes it to on_train_begin")
        if self.handle is None:
            self.handle = hype.apply(model, **_kwargs(self.config))
            noise_state = self._saved_noise_state(state) if state.global_step > 0 else None
            if noise_state is not None:
                self.handle.load_state_dict(noise_state)

    def on_train_end(self, args, state, control, **kwargs):
        if self.handle is not None:
            self.noise_state = self.handle.state_dict()
            self.handle.remove()
            self.handle = None


class NoisyTuneCallback(TrainerCallback):
    """NoisyTune's one perturbation of the pretrained weights, just before the first training step.

    Skipped when training resumes from a checkpoint (``state.global_step > 0``: the weights loaded are already
    perturbed and trained) and on a second ``train()`` of the same model. ``report`` holds what
    ``perturb_`` returned.
    """

    def __init__(self, config: Union[NoisyTuneConfig, dict, bool, None] = True):
        self.config = _as_config(config, NoisyTuneConfig, "config")
        if self.config is None:
            raise ValueError("config must describe NoisyTune (True, a dict or a NoisyTuneConfig), got None/False")
        self.report = None
        self._perturbed_ids = set()

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        from .. import noisytune

        if model is None:
            raise RuntimeError("NoisyTuneCallback needs the model: the Trainer passes it to on_train_begin")
        if state.global_step > 0 or id(model) in self._perturbed_ids:
            return
        # Under DeepSpeed ZeRO-3 perturb_ gathers each matrix whole (its std is the whole matrix's).
        self.report = noisytune.perturb_(model, noise_lambda=self.config.noise_lambda,
                                         exclude=tuple(self.config.exclude), seed=self.config.seed,
                                         include_head=self.config.include_head)
        self._perturbed_ids.add(id(model))
        if "deepspeed" in sys.modules:  # DeepSpeed keeps float32 master weights: they must take the perturbation
            from .deepspeed import refresh_master_weights

            refresh_master_weights(kwargs.get("optimizer"))


class NEFTuneCallback(TrainerCallback):
    """NEFTune on at the start of training, off at its end; inert during the Trainer's evaluations (eval mode).

    Works on any ``Trainer``: ``Trainer(..., callbacks=[NEFTuneCallback(NEFTuneConfig(alpha=5.0))])``.
    """

    def __init__(self, config: Union[NEFTuneConfig, dict, bool, None] = True):
        self.config = _as_config(config, NEFTuneConfig, "config")
        if self.config is None:
            raise ValueError("config must describe NEFTune (True, a dict or a NEFTuneConfig), got None/False")
        self.handle = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        from .. import neftune

        if model is None:
            raise RuntimeError("NEFTuneCallback needs the model: the Trainer passes it to on_train_begin")
        if getattr(args, "neftune_noise_alpha", None) is not None:
            raise ValueError("NEFTuneCallback and TrainingArguments.neftune_noise_alpha are both set: use one")
        if self.handle is None:
            self.handle = neftune.apply(model, **_kwargs(self.config))

    def on_train_end(self, args, state, control, **kwargs):
        if self.handle is not None:
            self.handle.remove()
            self.handle = None


def pats_optimizer(model: nn.Module, args=None, config: Union[PATSConfig, dict, bool, None] = True):
    """A :class:`fusednoise.optim.PATSAdamax` for ``model`` over :func:`fusednoise.optim.pats_param_groups`.

    ``args`` (``TrainingArguments``, optional) supplies the learning rate, Adam betas/epsilon and weight decay
    where ``config`` leaves them ``None``. For a plain Trainer: ``optimizers=(pats_optimizer(model, args), None)``
    (the Trainer still builds its scheduler around it).
    """
    from ..optim import PATSAdamax, pats_param_groups

    config = _as_config(config, PATSConfig, "config")
    if config is None:
        raise ValueError("config must describe PATS (True, a dict or a PATSConfig), got None/False")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    lr = config.lr if config.lr is not None else (args.learning_rate if args is not None else 2e-5)
    betas = config.betas if config.betas is not None else (
        (args.adam_beta1, args.adam_beta2) if args is not None else (0.9, 0.999))
    eps = config.eps if config.eps is not None else (args.adam_epsilon if args is not None else 1e-8)
    weight_decay = config.weight_decay if config.weight_decay is not None else (
        args.weight_decay if args is not None else 0.0)
    kwargs = dict(lr=lr, betas=tuple(betas), eps=eps, sensitivity_beta=config.sensitivity_beta,
                  noise_lambda=config.noise_lambda, gamma=config.gamma, noise_prob=config.noise_prob)
    if config.noise_eps is not None:
        kwargs["noise_eps"] = config.noise_eps
    if config.seed is not None:
        kwargs["seed"] = config.seed
    return PATSAdamax(pats_param_groups(model, weight_decay=weight_decay), **kwargs)


class _BindDeepSpeedPartitions(TrainerCallback):
    """Under DeepSpeed ZeRO-1/2 (``TrainingArguments(deepspeed=...)``), gives the PATSAdamax the engine's mapping
    from its flat partitions back to the parameters (:func:`fusednoise.integrations.deepspeed.bind`) once the
    Trainer has built the engine, before the first step; ZeRO-3 is refused there."""

    def __init__(self, trainer):
        self._trainer = weakref.ref(trainer)

    def on_train_begin(self, args, state, control, **kwargs):
        trainer = self._trainer()
        if trainer is not None and getattr(trainer, "is_deepspeed_enabled", False):
            from .deepspeed import bind

            bind(trainer.model_wrapped)


# --------------------------------------------------------------------------------------------- the trainer
# At the first step, an LNSR penalty this many times the task loss gets a warning: measured on all-MiniLM-L6-v2
# (docs/lnsr.md), a penalty 15x the loss came with a gradient 64x the task's, and fine-tuning collapsed to one class.
LNSR_DOMINANCE_RATIO = 10.0


LNSR_ADVICE = "lower LNSRConfig(weights=...), or check LNSRConfig(reduction=...)"


def _warn_if_penalty_dominates(penalty: float, task_loss: float, advice: str = LNSR_ADVICE) -> None:
    if task_loss > 0 and penalty > LNSR_DOMINANCE_RATIO * task_loss:
        warnings.warn(f"LNSR's penalty ({penalty:.3g}) is {penalty / task_loss:.0f}x the task loss ({task_loss:.3g}) "
                      "at the first step: the optimiser will mostly minimise the penalty, which on small models "
                      f"collapses fine-tuning to one class (docs/lnsr.md). Compare with a vanilla run, or {advice}.",
                      UserWarning, stacklevel=3)


class FusedNoiseMixin:
    """Adds ``hype=``, ``lnsr=``, ``noisytune=``, ``pats=`` and ``neftune=`` to a ``transformers.Trainer``
    (sub)class, TRL's ``SFTTrainer`` included.

    Each takes ``None`` (off, the default), ``True`` (the paper's defaults), a dict of arguments or its config
    dataclass (:class:`HyPeConfig`, :class:`LNSRConfig`, :class:`NoisyTuneConfig`, :class:`PATSConfig`,
    :class:`NEFTuneConfig`).
    """

    # What the warning on a dominating LNSR penalty tells the user to change (``fusednoise finetune`` names its flags).
    lnsr_advice = LNSR_ADVICE

    def __init__(self, *args, hype=None, lnsr=None, noisytune=None, pats=None, neftune=None, **kwargs):
        self.hype_config = _as_config(hype, HyPeConfig, "hype")
        self.lnsr_config = _as_config(lnsr, LNSRConfig, "lnsr")
        self.noisytune_config = _as_config(noisytune, NoisyTuneConfig, "noisytune")
        self.pats_config = _as_config(pats, PATSConfig, "pats")
        self.neftune_config = _as_config(neftune, NEFTuneConfig, "neftune")
        training_args = kwargs.get("args", args[1] if len(args) > 1 else None)
        if self.neftune_config is not None and getattr(training_args, "neftune_noise_alpha", None) is not None:
            raise ValueError("neftune= and TrainingArguments.neftune_noise_alpha are both set: use one (neftune= "
                             "scales by each example's length, the built-in by the padded length)")
        optimizers = kwargs.get("optimizers", (None, None))
        if self.pats_config is not None and optimizers is not None and optimizers[0] is not None:
            raise ValueError("pats= builds the optimizer: do not also pass optimizers=(optimizer, ...)")
        if self.pats_config is not None and kwargs.get("optimizer_cls_and_kwargs") is not None:
            raise ValueError("pats= builds the optimizer: do not also pass optimizer_cls_and_kwargs")
        callbacks = list(kwargs.pop("callbacks", None) or [])
        self.hype_callback = HyPeCallback(self.hype_config) if self.hype_config is not None else None
        self.noisytune_callback = (NoisyTuneCallback(self.noisytune_config)
                                   if self.noisytune_config is not None else None)
        self.neftune_callback = NEFTuneCallback(self.neftune_config) if self.neftune_config is not None else None
        # NoisyTune first: it perturbs the weights before anything else looks at them.
        ours = [cb for cb in (self.noisytune_callback, self.hype_callback, self.neftune_callback) if cb is not None]
        if self.pats_config is not None:
            ours.append(_BindDeepSpeedPartitions(self))
        super().__init__(*args, callbacks=ours + callbacks, **kwargs)
        self._lnsr = None
        self._lnsr_sum = None  # a detached tensor: adding floats would synchronise with the GPU every step
        self._lnsr_count = 0
        self._lnsr_checked = False

    # PATS ------------------------------------------------------------------------------------------------
    def create_optimizer(self, *args, **kwargs):
        if self.pats_config is None:
            return super().create_optimizer(*args, **kwargs)
        if self.optimizer is None:
            self.optimizer = pats_optimizer(self.model, self.args, self.pats_config)
        return self.optimizer

    # LNSR ------------------------------------------------------------------------------------------------
    def _lnsr_for(self, model: nn.Module):
        from ..lnsr import LNSR

        if self._lnsr is None or self._lnsr.model is not model:
            self._lnsr = LNSR(model, **_kwargs(self.lnsr_config))
        return self._lnsr

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None, **kwargs):
        if self.lnsr_config is None or not model.training:
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch, **kwargs)
        if "labels" not in inputs:
            raise ValueError("LNSR in FusedNoiseTrainer needs the batch's labels (a 'labels' field) to compute "
                             "the task loss the penalty is added to")
        outputs, penalty = self._lnsr_for(model)(**inputs)
        task_loss = outputs["loss"] if isinstance(outputs, dict) else outputs[0]
        if not self._lnsr_checked:
            self._lnsr_checked = True
            _warn_if_penalty_dominates(float(penalty.detach()), float(task_loss.detach()), self.lnsr_advice)
        self._lnsr_sum = penalty.detach() if self._lnsr_sum is None else self._lnsr_sum + penalty.detach()
        self._lnsr_count += 1
        loss = task_loss + penalty
        if self._trainer_skips_accumulation_division(num_items_in_batch):
            # Both terms here are means over this micro-batch (num_items_in_batch is not passed to the model).
            # When the Trainer takes the loss as normalised over the accumulated batch, it skips its division by
            # the number of micro-batches, and the loss would count that many times: divide here instead.
            loss = loss / self._micro_batches()
        return (loss, outputs) if return_outputs else loss

    def _trainer_skips_accumulation_division(self, num_items_in_batch) -> bool:
        """Whether ``Trainer.training_step`` will take the returned loss as normalised over the whole accumulated
        batch and not divide it by the number of micro-batches: its own test, in the versions that have each
        attribute. (It says yes for any model whose forward takes ``**kwargs``, including heads that ignore
        ``num_items_in_batch``, such as BERT's sequence classification in transformers 5.)"""
        flag = getattr(self, "loss_is_scaled_for_ga", None)
        if flag is not None:
            return bool(flag)
        return ((getattr(self, "model_accepts_loss_kwargs", False) and num_items_in_batch is not None)
                or getattr(self, "compute_loss_func", None) is not None)

    def _micro_batches(self) -> int:
        return int(getattr(self, "current_gradient_accumulation_steps", None) or self.args.gradient_accumulation_steps)

    def log(self, logs: Dict[str, float], *args, **kwargs) -> None:
        if self._lnsr_count and "loss" in logs:
            logs["lnsr_penalty"] = float(self._lnsr_sum) / self._lnsr_count
            self._lnsr_sum, self._lnsr_count = None, 0
        return super().log(logs, *args, **kwargs)

    @property
    def noisytune_report(self):
        """What ``perturb_`` returned when NoisyTune ran (None before training or without NoisyTune)."""
        return self.noisytune_callback.report if self.noisytune_callback is not None else None


class FusedNoiseTrainer(FusedNoiseMixin, Trainer):
    """``transformers.Trainer`` with ``hype=``, ``lnsr=``, ``noisytune=``, ``pats=`` and ``neftune=`` (see the module
    docs)."""


def warmup_steps_for(num_examples: int, batch_size: int, epochs: float, ratio: float = 0.1,
                     gradient_accumulation_steps: int = 1) -> int:
    """Warm-up steps for a warm-up over ``ratio`` of all optimizer steps (PATS, LNSR: 10%).

    An int for ``TrainingArguments(warmup_steps=...)`` that means the same in every transformers version
    (``warmup_ratio`` was folded into ``warmup_steps`` in transformers 5).
    """
    if not 0 <= ratio < 1:
        raise ValueError(f"ratio must be in [0, 1), got {ratio}")
    steps_per_epoch = max(1, math.ceil(math.ceil(num_examples / batch_size) / gradient_accumulation_steps))
    return math.ceil(ratio * steps_per_epoch * epochs)


__all__ = ["FusedNoiseMixin", "FusedNoiseTrainer", "HyPeCallback", "HyPeConfig", "LNSRConfig", "NoisyTuneCallback",
           "NoisyTuneConfig", "PATSConfig", "pats_optimizer", "warmup_steps_for", "NEFTuneCallback", "NEFTuneConfig"]
