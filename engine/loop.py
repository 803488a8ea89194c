"""The ready loop: the algorithm objects driven from a config, for the `alignfuse` command.

It is a short function on top of the same pieces a user's own loop uses: load and tokenize
the data, pack each optimizer step's records into micro-batches of at most `max_tokens`
tokens, `algorithm.step(micro_batch, loss_scale=units/total)` for each (gradient
accumulation that equals one big batch, except KTO's reference point z0, which is estimated
per micro-batch as in TRL: there `max_tokens` changes the numbers a little), then the
optimizer and scheduler step (on fp32 master weights when the model is bf16). Around it: a
tqdm bar with tokens/s, metrics to JSONL/TensorBoard, a PNG plot at the end, atomic
checkpoints every `save_every` steps and an exact `resume` (model, master weights,
optimizer, scheduler, RNG states and data position are restored; the data order is a pure
function of the seed and the step, so the resumed run sees exactly the batches the
uninterrupted run would). Dropout is off unless `disable_dropout=false`.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import io
import math
import os
import random
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import checkpoint as ckpt
from .lora import (BaseReference, add_lora, load_trainable_state, lora_targets, merge,
                   trainable_state)
from .metrics import MetricsLogger, plot_metrics
from .precision import MasterWeights

ALGORITHMS = ("sft", "rm", "dpo", "kto", "orpo", "simpo")
REFERENCE_CHOICES = ("precompute", "model")


class ConfigError(ValueError):
    """A bad configuration value; the message names the key."""


# The algorithm knobs: each key that only some algorithms read, and the algorithms that read
# it (the one table `check_knobs` checks). A knob the user gives (YAML, `key=value` or
# keyword) for an algorithm that does not read it is a ConfigError, not silently ignored.
# Keep it in step with `make_algorithm`, `train` and `load_records`.
ALGORITHM_KNOBS: dict[str, tuple[str, ...]] = {
    "beta": ("dpo", "kto", "orpo", "simpo"),     # make_algorithm
    "loss_type": ("dpo",),                       # make_algorithm: DPO
    "label_smoothing": ("dpo", "simpo"),         # make_algorithm: DPO, SimPO
    "gamma": ("simpo",),                         # make_algorithm: SimPO
    "desirable_weight": ("kto",),                # make_algorithm: KTO
    "undesirable_weight": ("kto",),
    "rm_kind": ("rm",),                          # make_algorithm: RewardModel; load_records
    "reference": ("dpo", "kto"),                 # train: the algorithms with a reference
    "ties": ("dpo", "orpo", "simpo", "rm"),      # load_records: pairs (rm: rm_kind=pairwise)
}


@dataclass
class TrainConfig:
    """Every key of a training config (YAML file or `key=value` on the command line).

    The algorithm knobs (`ALGORITHM_KNOBS`) may be given only for an algorithm that reads
    them; `build_config` refuses the others. Their defaults apply whatever the algorithm.
    """

    # Not fields (no annotation): what `build_config`/`check_knobs` check given keys against.
    ALGORITHMS = ALGORITHMS
    KNOBS = ALGORITHM_KNOBS
    # Keys read only when another key is on: given while it is off, they are refused.
    NEEDS = {"lora_alpha": "lora_r", "lora_targets": "lora_r"}

    algorithm: str = "dpo"
    # model: "tiny-llama" / "tiny-qwen2" (the embedded default) or a local HF model folder.
    model: str = "tiny-llama"
    # data: a JSONL file (see engine/data.py for each algorithm's record shape) or
    # "builtin:addition" (the synthetic preference task of engine/tasks.py).
    data: str = "builtin:addition"
    eval_data: str | None = None      # same forms; builtin:addition holds out its own
    num_examples: int = 512           # size of the builtin training set
    out_dir: str = "runs/alignfuse"
    steps: int = 100                  # optimizer steps
    batch_size: int = 16              # records per optimizer step
    max_tokens: int = 2048            # tokens per packed micro-batch
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup_steps: int = 0
    max_grad_norm: float | None = 1.0
    seed: int = 0
    dtype: str = "float32"          # or bfloat16: bf16 weights and compute, fp32 master weights
    device: str = "cpu"
    # CPU threads for torch (None: torch's default). On a busy shared machine 1 thread was
    # 5-15x faster than 2 for the tiny model: oversubscribed threads wait on each other.
    num_threads: int | None = None
    # Algorithm knobs: only the algorithms ALGORITHM_KNOBS lists read each one, and giving
    # one to another algorithm is a ConfigError.
    beta: float = 0.1                 # DPO, KTO, ORPO, SimPO
    loss_type: str = "sigmoid"        # DPO
    label_smoothing: float = 0.0      # DPO, SimPO
    gamma: float = 0.5                # SimPO's target margin
    desirable_weight: float = 1.0     # KTO
    undesirable_weight: float = 1.0
    rm_kind: str = "pairwise"         # reward model: pointwise, pairwise, listwise
    reference: str = "precompute"     # DPO/KTO: precompute log-probs once, or keep a model
    # Pairs whose chosen equals rejected (no gradient): drop (with a warning), keep, error.
    ties: str = "drop"                # DPO, ORPO, SimPO, pairwise RM (engine/data.py)
    # Read by every algorithm:
    # LoRA (engine/lora.py): lora_r > 0 trains rank-r adapters on lora_targets ("all-linear":
    # every linear layer but the LM head; or names, "q_proj,v_proj") scaled by lora_alpha / r,
    # and freezes the rest; 0 trains every weight.
    lora_r: int = 0
    lora_alpha: float = 16.0          # only with lora_r > 0
    lora_targets: str = "all-linear"  # only with lora_r > 0
    # Recompute each decoder layer's activations in the backward instead of keeping them
    # (Hugging Face's gradient_checkpointing_enable, non-reentrant): less memory, one more
    # forward per step, the same numbers.
    gradient_checkpointing: bool = False
    # Dropout off (`engine.forward.disable_dropout`), as TRL does: with it on, the policy's
    # training forward differs from the reference's eval forward at step 0.
    disable_dropout: bool = True
    sft_warmup_steps: int = 0         # brief SFT on the chosen answers before DPO/KTO/...
    sft_lr: float = 3e-3
    log_every: int = 1
    eval_every: int = 0               # 0: only before and after training
    save_every: int = 0               # 0: only at the end
    # At the end, the trained model and tokenizer as a Hugging Face folder, out_dir/model
    # (`model=` of a later run, or `from_pretrained`, loads it).
    export_model: bool = True
    keep_checkpoints: int = 2
    tensorboard: bool = True
    progress: bool = True
    # Testing aid: raise after this many optimizer steps (a crash to resume from).
    crash_after_steps: int | None = None

    def validate(self) -> "TrainConfig":
        for f in fields(self):
            _check_type(f.name, getattr(self, f.name), f.type)
        if self.algorithm not in ALGORITHMS:
            raise ConfigError(f"algorithm must be one of {ALGORITHMS}, got {self.algorithm!r}")
        from .algorithms.reward_model import KINDS as RM_KINDS

        if self.rm_kind not in RM_KINDS:
            raise ConfigError(f"rm_kind must be one of {RM_KINDS}, got {self.rm_kind!r}")
        if self.reference not in REFERENCE_CHOICES:
            raise ConfigError(f"reference must be one of {REFERENCE_CHOICES}, "
                              f"got {self.reference!r}")
        from .data import TIES

        if self.ties not in TIES:
            raise ConfigError(f"ties must be one of {TIES}, got {self.ties!r}")
        check_dtype(self.dtype)
        try:
            device = torch.device(self.device)
        except RuntimeError:
            raise ConfigError(f"device must be a torch device such as cpu or cuda:0, "
                              f"got {self.device!r}") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"device={self.device!r}, but torch sees no CUDA device here")
        check_bounds(self, at_least_one=("steps", "batch_size", "max_tokens", "num_examples",
                                         "log_every", "keep_checkpoints", "num_threads"),
                     non_negative=("warmup_steps", "eval_every", "save_every",
                                   "sft_warmup_steps", "lora_r"),
                     positive=("lr", "sft_lr", "lora_alpha"))
        check_max_grad_norm(self.max_grad_norm)
        if self.algorithm != "rm" and self.batch_size < 2 and self.algorithm == "kto":
            raise ConfigError("batch_size must be >= 2 for kto (mismatched pairs)")
        self._check_loss_options()
        return self

    def _check_loss_options(self) -> None:
        """beta, loss_type, label_smoothing, ...: the algorithm's own loss checks them on one
        dummy pair, so a bad value stops the run here (not after model load and warm-up)
        and the valid values keep one definition, the kernels'."""
        from .algorithms import DPO, KTO, ORPO, SimPO

        try:
            if self.algorithm == "dpo":
                DPO.check_options(beta=self.beta, loss_type=self.loss_type,
                                  label_smoothing=self.label_smoothing)
            elif self.algorithm == "kto":
                KTO.check_options(beta=self.beta, desirable_weight=self.desirable_weight,
                                  undesirable_weight=self.undesirable_weight)
            elif self.algorithm == "orpo":
                ORPO.check_options(beta=self.beta)
            elif self.algorithm == "simpo":
                SimPO.check_options(beta=self.beta, gamma=self.gamma,
                                    label_smoothing=self.label_smoothing)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{self.algorithm}: {exc}") from None


def check_bounds(cfg, *, at_least_one: tuple[str, ...] = (), non_negative: tuple[str, ...] = (),
                 positive: tuple[str, ...] = ()) -> None:
    """ConfigError naming the first of these keys of `cfg` out of its range (an optional
    key left None passes): counts >= 1, non-negative ones >= 0, rates and the like > 0."""
    for keys, rule, ok in ((at_least_one, ">= 1", lambda v: v >= 1),
                           (non_negative, ">= 0", lambda v: v >= 0),
                           (positive, "> 0", lambda v: v > 0)):
        for key in keys:
            value = getattr(cfg, key)
            if value is not None and not ok(value):
                raise ConfigError(f"{key} must be {rule}, got {value!r}")


def check_dtype(dtype: str) -> None:
    """The training dtypes of the ready loops: float32, or bfloat16 (bf16 weights and
    compute, fp32 master weights for the optimizer, `engine/precision.py`)."""
    if dtype == "float16":
        raise ConfigError("dtype=float16 cannot train here: its gradients need loss "
                          "scaling, which this loop does not do (the weights overflow "
                          "within a step); use bfloat16 (computed in bf16, updated in "
                          "fp32) or float32")
    if dtype not in ("float32", "bfloat16"):
        raise ConfigError(f"dtype must be float32 or bfloat16, got {dtype!r}")


def check_max_grad_norm(value: float | None) -> None:
    """`algorithms.base.check_max_grad_norm`, as a ConfigError for the configs."""
    from .algorithms.base import check_max_grad_norm as check

    try:
        check(value)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def _check_type(key: str, value: Any, annotation: str) -> None:
    allowed = {"str": (str,), "int": (int,), "float": (int, float), "bool": (bool,)}
    parts = [p.strip() for p in str(annotation).split("|")]
    if value is None:
        if "None" not in parts:
            raise ConfigError(f"{key} must not be null")
        return
    types = tuple(t for p in parts if p != "None" for t in allowed[p])
    if isinstance(value, bool) and bool not in types:
        raise ConfigError(f"{key} must be {' or '.join(p for p in parts if p != 'None')}, "
                          f"got {value!r}")
    if not isinstance(value, types):
        raise ConfigError(f"{key} must be {' or '.join(p for p in parts if p != 'None')}, "
                          f"got {type(value).__name__} {value!r}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{key} must be finite, got {value!r}")


def make_config(values: dict[str, Any] | None = None, overrides: list[str] | None = None,
                **kwargs) -> TrainConfig:
    """A validated `TrainConfig` from a mapping (a parsed YAML file), `key=value` strings
    (the command line; values parsed as YAML scalars) and keyword arguments, later wins."""
    return build_config(TrainConfig, values, overrides, kwargs)


def build_config(config_class: type, values: dict[str, Any] | None,
                 overrides: list[str] | None, kwargs: dict[str, Any]):
    """`config_class(**merged).validate()`, merged from `values`, then `key=value` strings
    (values parsed as YAML scalars), then `kwargs`, later wins. The one parser of
    `TrainConfig` and `OnlineConfig`: unknown keys raise ConfigError with a suggestion, and
    so does an algorithm knob given for an algorithm that does not read it (`check_knobs`;
    only the keys given here count, so a config built in code from every field, or a
    checkpoint's, is not refused)."""
    import yaml

    merged: dict[str, Any] = {}
    if values is not None:
        if not isinstance(values, dict):
            raise ConfigError(f"the config must be a mapping of keys to values, "
                              f"got {type(values).__name__}")
        merged.update(values)
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value")
        key, raw = item.split("=", 1)
        merged[key.strip()] = yaml.safe_load(raw) if raw.strip() else None
    merged.update(kwargs)
    types = {f.name: str(f.type) for f in fields(config_class)}
    for key, value in merged.items():
        if key not in types:
            close = difflib.get_close_matches(str(key), types, n=2)
            hint = f" (did you mean {' or '.join(close)}?)" if close else ""
            raise ConfigError(f"unknown config key {key!r}{hint}")
        # YAML reads 1e-3 (no dot) as a string: accept it for float keys.
        if "float" in types[key] and isinstance(value, str):
            try:
                merged[key] = float(value)
            except ValueError:
                pass
    cfg = config_class(**merged)
    check_knobs(cfg, merged)
    return cfg.validate()


def check_knobs(cfg, given) -> None:
    """ConfigError for each key of `given` (the keys the user set) that is an algorithm knob
    of `type(cfg).KNOBS` not read by `cfg.algorithm`, or a key of `type(cfg).NEEDS` whose
    switch is off (lora_alpha with lora_r=0; a switch may also be a pair (property, what
    makes it true)); whatever its value, the default too.
    Keys left out are never refused: their defaults apply to every algorithm."""
    knobs, algorithms = type(cfg).KNOBS, type(cfg).ALGORITHMS
    if cfg.algorithm not in algorithms:
        return  # validate() names the bad algorithm
    for key in given:
        readers = knobs.get(key)
        if readers is not None and cfg.algorithm not in readers:
            names = (f"{', '.join(readers[:-1])} and {readers[-1]} read" if len(readers) > 1
                     else f"{readers[0]} reads")
            raise ConfigError(f"{key} is not used by algorithm={cfg.algorithm} (only {names} "
                              f"it); remove it")
        switch = getattr(type(cfg), "NEEDS", {}).get(key)
        if isinstance(switch, tuple):  # (a property of the config, what makes it true)
            attribute, condition = switch
            if not getattr(cfg, attribute):
                raise ConfigError(f"{key} is read only with {condition}; remove it")
        elif switch is not None and not getattr(cfg, switch):
            raise ConfigError(f"{key} is not used with {switch}={getattr(cfg, switch)!r} "
                              f"(it is read only when {switch} is set); remove it or set "
                              f"{switch}")


def load_config_file(path: str | os.PathLike) -> dict[str, Any]:
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            values = yaml.safe_load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
    return values or {}


# ---------------------------------------------------------------------------------------
# Model, data, algorithm


TINY_MODELS = ("tiny-llama", "tiny-qwen2")


def load_model_and_tokenizer(cfg: TrainConfig):
    return load_model(cfg.model, seed=cfg.seed, dtype=cfg.dtype, device=cfg.device)


def load_model(name: str, *, seed: int, dtype: str = "float32", device: str = "cpu"):
    """(model, tokenizer) of a `model=` key: an embedded tiny model (initialised from `seed`)
    or a local Hugging Face model folder."""
    from .tiny import tiny_model, tiny_tokenizer

    torch_dtype = getattr(torch, dtype)
    if name in TINY_MODELS:
        tokenizer = tiny_tokenizer()
        model = tiny_model(name.split("-", 1)[1], len(tokenizer), seed=seed, dtype=torch_dtype)
    else:
        if not Path(name).is_dir():
            raise ConfigError(f"model must be tiny-llama, tiny-qwen2 or a local model folder; "
                              f"{name!r} is none of these")
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(name)
        model = AutoModelForCausalLM.from_pretrained(name, dtype=torch_dtype,
                                                     attn_implementation="sdpa")
    return model.to(device), tokenizer


def load_records(cfg: TrainConfig, source: str, *, evaluation: bool):
    """The records of `source` for `cfg.algorithm` (validated up front by engine/data.py)."""
    from . import data, tasks

    if source.startswith("builtin:"):
        name = source.split(":", 1)[1]
        if name != "addition":
            raise ConfigError(f"data: unknown builtin task {name!r} (have: addition)")
        if cfg.algorithm not in ("dpo", "orpo", "simpo", "sft") and not (
                cfg.algorithm == "rm" and cfg.rm_kind == "pairwise"):
            raise ConfigError(f"data: builtin:addition is preference data; it does not fit "
                              f"algorithm={cfg.algorithm!r}")
        held_out = tasks.held_out_addition_prompts()
        if evaluation:
            return tasks.addition_preferences(128, seed=cfg.seed + 1, only=held_out)
        return tasks.addition_preferences(cfg.num_examples, seed=cfg.seed, exclude=held_out)
    if not Path(source).exists():
        raise ConfigError(f"{'eval_data' if evaluation else 'data'}: file {source} does not exist")
    if cfg.algorithm == "sft":  # instruction/input/output records, or preference pairs
        return data.load_sft(source)
    if cfg.algorithm in ("dpo", "orpo", "simpo") or (cfg.algorithm == "rm"
                                                     and cfg.rm_kind == "pairwise"):
        return data.load_dpo(source, ties=cfg.ties)
    if cfg.algorithm == "kto":
        return data.load_kto(source)
    return data.load_scored(source) if cfg.rm_kind == "pointwise" else data.load_ranked(source)


def build_dataset(cfg: TrainConfig, records, tokenizer, padded: bool = False):
    """Tokenized sequences in the layout the algorithm reads (see each algorithm's module).
    `padded`: the model runs on padded rows (`runs_padded`), so a record's sequences take
    their count times the longest of a micro-batch's budget."""
    from .algorithms.kto import kto_dataset
    from .data import tokenize_records

    dataset = tokenize_records(records, tokenizer)
    if cfg.algorithm == "sft":  # preference data: learn the preferred answers only
        dataset = preferred_only(dataset)
    if cfg.algorithm == "kto":
        dataset = kto_dataset(dataset)
    # The loop packs without truncation (a cut completion would change what is learned),
    # so a record (its sequences are packed together) must fit one micro-batch.
    sizes, counts, widths = ([0] * dataset.num_records for _ in range(3))
    for i, record in enumerate(dataset.record_index):
        length = len(dataset.sequence(i))
        sizes[record] += length
        counts[record] += 1
        widths[record] = max(widths[record], length)
    if padded:
        sizes = [count * width for count, width in zip(counts, widths)]
    largest = max(range(len(sizes)), key=sizes.__getitem__, default=None)
    if largest is not None and sizes[largest] > cfg.max_tokens:
        what = (f"needs {sizes[largest]} padded slots ({counts[largest]} sequences x the "
                f"longest: this model runs on padded rows)" if padded
                else f"has {sizes[largest]} tokens")
        raise ConfigError(f"max_tokens={cfg.max_tokens} is too small: record {largest} {what} "
                          f"(its sequences are packed together); raise max_tokens")
    return dataset


def data_fingerprint(source: str | None) -> str | None:
    """sha256 of a data file's bytes, or of every file of a saved dataset folder (with its
    relative path); None for no data, a builtin task (its config keys define it), or a
    path that does not exist (its loader names it)."""
    if source is None or source.startswith("builtin:") or not Path(source).exists():
        return None
    import hashlib

    root = Path(source)
    files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
    digest = hashlib.sha256()
    for path in files:
        digest.update(str(path.relative_to(root) if root.is_dir() else "").encode() + b"\0")
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def check_token_ids(dataset, tokenizer, model, key: str) -> None:
    """Every token id of `dataset` (from config key `key`) has a row in the model's input
    embeddings. A tokenizer with tokens added after the model was saved gives ids past them:
    an IndexError deep in torch's embedding on CPU, a device-side assert on a GPU."""
    rows = model.get_input_embeddings().num_embeddings
    if len(tokenizer) <= rows:  # no id can be past the embeddings: nothing to scan
        return
    for i in range(len(dataset)):
        top = max(dataset.sequence(i))
        if top >= rows:
            raise ConfigError(
                f"{key}: record {dataset.record_index[i]} has token id {top}, but the model's "
                f"input embeddings have {rows} rows (the tokenizer has {len(tokenizer)} "
                f"tokens); after adding tokens, resize the model "
                f"(model.resize_token_embeddings(len(tokenizer))) and save it again")


def preferred_only(tokenized):
    """The preferred completions of a tokenized dataset (chosen / desirable / best-ranked;
    all of them for data without such a label), one record each."""
    good = tokenized.extras.get("chosen") or tokenized.extras.get("desirable")
    if good is None and "rank" in tokenized.extras:
        good = [rank == 0 for rank in tokenized.extras["rank"]]
    keep = [i for i in range(len(tokenized)) if good is None or good[i]]
    return dataclasses.replace(tokenized, prompt_ids=[tokenized.prompt_ids[i] for i in keep],
                               completion_ids=[tokenized.completion_ids[i] for i in keep],
                               record_index=list(range(len(keep))), extras={})


def make_algorithm(cfg: TrainConfig, model, ref_model=None):
    from .algorithms import DPO, KTO, ORPO, SFT, RewardModel, SimPO

    if cfg.algorithm == "sft":
        return SFT(model)
    if cfg.algorithm == "rm":
        return RewardModel(model, kind=cfg.rm_kind)
    if cfg.algorithm == "dpo":
        return DPO(model, ref_model, beta=cfg.beta, loss_type=cfg.loss_type,
                   label_smoothing=cfg.label_smoothing)
    if cfg.algorithm == "kto":
        return KTO(model, ref_model, beta=cfg.beta, desirable_weight=cfg.desirable_weight,
                   undesirable_weight=cfg.undesirable_weight)
    if cfg.algorithm == "orpo":
        return ORPO(model, beta=cfg.beta)
    return SimPO(model, beta=cfg.beta, gamma=cfg.gamma, label_smoothing=cfg.label_smoothing)


def records_for_step(num_records: int, batch_size: int, seed: int, step: int) -> list[int]:
    """The records of optimizer step `step`: a per-epoch permutation seeded by (seed, epoch).

    A pure function of its arguments, so a resumed run needs only the step number.
    """
    per_epoch = max(1, num_records // batch_size)
    epoch, index = divmod(step, per_epoch)
    order = torch.randperm(num_records, generator=torch.Generator().manual_seed(seed * 100003 + epoch))
    return order[index * batch_size:(index + 1) * batch_size].tolist()


def run_batches(algorithm, batches, *, train: bool) -> dict[str, float]:
    """One optimizer step's micro-batches (or an evaluation): unit-weighted mean metrics."""
    device = next(algorithm.model.parameters()).device
    batches = [b.to(device) for b in batches]
    total = sum(algorithm.num_units(b) for b in batches)
    if total == 0:
        raise ValueError(f"{type(algorithm).__name__}: the step's {len(batches)} micro-batches "
                         "hold nothing to learn from (num_units is 0; for SFT: no target "
                         "tokens, every completion cut off or empty)")
    sums: dict[str, float] = {}
    for batch in batches:
        units = algorithm.num_units(batch)
        if train:
            metrics = algorithm.step(batch, loss_scale=units / total)
        else:
            with torch.no_grad():
                loss, metrics = algorithm.loss(batch)
            metrics = {"loss": float(loss), **metrics}
        for key, value in metrics.items():
            if key != "units":
                sums[key] = sums.get(key, 0.0) + value * units
    out = {key: value / total for key, value in sums.items()}
    out["tokens"] = float(sum(b.num_tokens for b in batches))
    return out


def evaluate(algorithm, dataset, max_tokens: int) -> dict[str, float]:
    from .forward import runs_padded

    was_training = algorithm.model.training
    algorithm.model.eval()
    try:
        batches = dataset.pack(max_tokens=max_tokens, padded=runs_padded(algorithm.model))
        return run_batches(algorithm, batches, train=False)
    finally:
        algorithm.model.train(was_training)


# ---------------------------------------------------------------------------------------
# The loop


def _lr_lambda(warmup: int, total: int):
    def factor(step: int) -> float:  # linear warmup, then linear decay to 10%
        if warmup and step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return max(0.1, 1.0 - 0.9 * progress)

    return factor


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def sft_warmup(cfg: TrainConfig, model, records, tokenizer) -> None:
    """A brief SFT on the preferred completions (chosen / desirable / best-ranked), for a
    fresh model that knows no answer format yet. Its own optimizer, thrown away after."""
    from .algorithms import SFT
    from .data import tokenize_records
    from .forward import runs_padded

    data = preferred_only(tokenize_records(records, tokenizer))
    padded = runs_padded(model)
    sft = SFT(model)
    master = MasterWeights(list(model.parameters()))
    optimizer = torch.optim.AdamW(master.masters, lr=cfg.sft_lr)
    for step in range(cfg.sft_warmup_steps):
        records_now = records_for_step(data.num_records, cfg.batch_size, cfg.seed + 7, step)
        master.zero_grad()
        run_batches(sft, data.pack(records_now, max_tokens=cfg.max_tokens, padded=padded),
                    train=True)
        master.gradients_in()
        optimizer.step()
        master.weights_out()


# Keys that may change between a run and its resumption (they do not change the numbers).
# Not `steps`: the learning rate decays over `steps` optimizer steps, so a resumed run with
# another value would jump to a point of a schedule neither run follows.
RESUMABLE_CHANGES = ("crash_after_steps", "progress", "save_every", "eval_every",
                     "log_every", "tensorboard", "keep_checkpoints", "num_threads",
                     "export_model", "gradient_checkpointing")


def check_data_unchanged(cfg, state: dict[str, Any] | None,
                         keys: tuple[str, ...]) -> dict[str, str | None]:
    """The sha256 of each data file named by `keys` of `cfg` (what a checkpoint records as
    `data_sha256`); ConfigError when resuming from a checkpoint (`state`) whose run read
    another file: the resumed run would not see the batches the run saw."""
    fingerprints = {key: data_fingerprint(getattr(cfg, key)) for key in keys}
    for key, digest in fingerprints.items():
        saved = (state or {}).get("data_sha256", {}).get(key)
        if saved is not None and saved != digest:
            raise ConfigError(f"resume: {key}={getattr(cfg, key)!r} changed since the "
                              f"checkpoint (sha256 {saved[:12]}... then, {str(digest)[:12]}... "
                              "now); a resumed run would not see the batches the run saw: "
                              "restore it, or start a new out_dir")
    return fingerprints


def check_lora_targets(cfg, model) -> None:
    """With `cfg.lora_r`, a ConfigError for `lora_targets` that do not fit `model`, before
    any warm-up time is spent."""
    if cfg.lora_r:
        try:
            lora_targets(model, cfg.lora_targets)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None


def keep_warmed_model(out: Path, model, *, resumed: bool, device: str = "cpu") -> None:
    """The model after warm-up (a reference, or the frozen base under LoRA adapters whose
    checkpoints hold the adapters alone): written atomically to out/reference.pt by a fresh
    run, loaded back into `model` by a resumed one (the checkpoint's weights follow)."""
    path = out / "reference.pt"
    if not resumed:
        buffer = io.BytesIO()
        torch.save(model.state_dict(), buffer)
        ckpt.atomic_write_bytes(path, buffer.getvalue())
    else:
        model.load_state_dict(torch.load(path, map_location=device))


def export_run_model(cfg, model, tokenizer, out: Path, summary: dict[str, Any]):
    """The end of a run (`cfg.export_model`): out/model, a Hugging Face folder of the trained
    model, and under LoRA (`cfg.lora_r`) out/adapter beside it, with the adapters merged into
    the model first. Records the paths in `summary`; returns the model (merged: `model` is
    consumed under LoRA, after the last use of its adapters)."""
    if cfg.lora_r:
        if cfg.export_model:
            summary["adapter"] = str(ckpt.export_pretrained(model, tokenizer, out / "adapter"))
        model = merge(model)
    if cfg.export_model:
        summary["export"] = str(ckpt.export_pretrained(model, tokenizer, out / "model"))
    return model


def open_run(cfg, *, resume: bool, resumable: tuple[str, ...]
             ) -> tuple[Path, Path, dict[str, Any] | None]:
    """Create `cfg.out_dir` and, when resuming, load its latest checkpoint (RNG not yet
    restored) and check that `cfg` matches the checkpoint's config except in `resumable`
    keys. Returns (out_dir, checkpoint root, checkpoint state or None). Shared by `train`
    and the online loop."""
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_root = out / "checkpoints"
    state = ckpt.load_checkpoint(ckpt_root, restore_rng=False) if resume else None
    if resume and state is None:
        raise ConfigError(f"resume: no checkpoint under {ckpt_root} (out_dir={cfg.out_dir!r})")
    if state is not None:
        # Not out_dir: it is where the checkpoint was found, however it is spelled (./r, r,
        # /abs/r) and wherever the folder was moved since.
        # Nor a knob the algorithm does not read (a checkpoint made before such knobs were
        # refused may hold one with another value): it does not change the numbers either.
        # A key the checkpoint's config lacks (added to alignfuse since) counts as its
        # default: that run had that behaviour.
        knobs = type(cfg).KNOBS
        saved = {f.name: f.default for f in dataclasses.fields(cfg)} | state["config"]
        changed = [k for k, v in dataclasses.asdict(cfg).items()
                   if k not in resumable and k != "out_dir" and saved.get(k) != v
                   and cfg.algorithm in knobs.get(k, (cfg.algorithm,))]
        if changed:
            values = ", ".join(f"{k}: {saved.get(k)!r} -> {getattr(cfg, k)!r}"
                               for k in changed)
            raise ConfigError(f"resume: the config differs from the checkpoint's in {changed} "
                              f"({values}); only {', '.join(resumable)} may change")
    return out, ckpt_root, state


def train(cfg: TrainConfig, *, resume: bool = False) -> dict[str, Any]:
    """Run training from a validated config. Returns a summary: `before`/`after` evaluation
    metrics, the final train metrics, and the paths written."""
    cfg.validate()
    out, ckpt_root, state = open_run(cfg, resume=resume, resumable=RESUMABLE_CHANGES)

    if cfg.num_threads is not None:
        torch.set_num_threads(cfg.num_threads)
    _seed_everything(cfg.seed)
    records = load_records(cfg, cfg.data, evaluation=False)  # data errors before the model
    # A resumed run must see the data the checkpoint's run saw (the order is a function of
    # the step, over the records as they were).
    fingerprints = check_data_unchanged(cfg, state, ("data", "eval_data"))
    model, tokenizer = load_model_and_tokenizer(cfg)
    from .forward import disable_dropout, runs_padded

    if cfg.disable_dropout:
        disable_dropout(model)
    padded = runs_padded(model)  # then every micro-batch budgets its padded rows
    dataset = build_dataset(cfg, records, tokenizer, padded)
    check_token_ids(dataset, tokenizer, model, "data")
    eval_source = cfg.eval_data or (cfg.data if cfg.data.startswith("builtin:") else None)
    eval_dataset = (build_dataset(cfg, load_records(cfg, eval_source, evaluation=True),
                                  tokenizer, padded) if eval_source else None)
    if eval_dataset is not None:
        check_token_ids(eval_dataset, tokenizer, model, "eval_data")

    needs_reference = cfg.algorithm in ("dpo", "kto")
    # The model after warm-up: the reference, and the frozen base under LoRA adapters (a
    # LoRA checkpoint holds the adapters alone).
    ref_model = None
    check_lora_targets(cfg, model)
    if state is None and cfg.sft_warmup_steps:
        sft_warmup(cfg, model, records, tokenizer)
    if needs_reference or (cfg.lora_r and cfg.sft_warmup_steps):
        keep_warmed_model(out, model, resumed=state is not None, device=cfg.device)
    if needs_reference and not cfg.lora_r:
        ref_model = copy.deepcopy(model)
        ref_model.eval().requires_grad_(False)
    if cfg.lora_r:
        from .algorithms.reward_model import attach_reward_head

        # A reward model's head trains whole and goes into the adapter folder with them.
        head = ("reward_head",) if cfg.algorithm == "rm" else ()
        if head:
            attach_reward_head(model)
        model = add_lora(model, r=cfg.lora_r, alpha=cfg.lora_alpha, targets=cfg.lora_targets,
                         modules_to_save=head)
        if needs_reference:  # the frozen base itself, adapters off: no copy of the model
            ref_model = BaseReference(model)
    if ref_model is not None and cfg.reference == "precompute":
        attach_reference_logps(ref_model, dataset, cfg.max_tokens)
        if eval_dataset is not None:
            attach_reference_logps(ref_model, eval_dataset, cfg.max_tokens)
        ref_model = None  # the log-probs live with the data now; free the model
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    algorithm = make_algorithm(cfg, model, ref_model)
    master = MasterWeights([p for p in model.parameters() if p.requires_grad])
    params = master.masters  # what the optimizer updates: fp32
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer,
                                                  _lr_lambda(cfg.warmup_steps, cfg.steps))
    start = 0
    summary: dict[str, Any] = {}
    if state is not None:
        if cfg.lora_r:
            load_trainable_state(model, state["model"])
        else:
            model.load_state_dict(state["model"])
        master.load_state_dict(state.get("master"))
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        ckpt.set_rng_state(state["rng"])
        start = state["step"]
        summary["before"] = state.get("before")
    elif eval_dataset is not None:
        summary["before"] = evaluate(algorithm, eval_dataset, cfg.max_tokens)

    # Resuming a finished run: its final evaluation, logged after the last checkpoint at
    # step `steps`, is logged again below (mid-run evaluations come before their checkpoint).
    logger = MetricsLogger(out, tensorboard=cfg.tensorboard,
                           resume_step=start if state is not None else None,
                           final_eval_logged=state is not None and start == cfg.steps)
    if state is None and summary.get("before"):
        logger.log(0, summary["before"], split="eval")

    def save(step: int) -> None:
        if cfg.lora_r:
            weights = trainable_state(model)  # the base is model= plus reference.pt
        else:
            weights = model.state_dict()
        ckpt.save_checkpoint(ckpt_root, step, {
            "model": weights, "master": master.state_dict(),
            "data_sha256": fingerprints,
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "config": dataclasses.asdict(cfg),
            "before": summary.get("before"),
        }, keep=cfg.keep_checkpoints)

    bar = _progress(cfg, start)
    model.train()
    train_metrics: dict[str, float] = {}
    try:
        for step in range(start, cfg.steps):
            t0 = time.perf_counter()
            records_now = records_for_step(dataset.num_records, cfg.batch_size, cfg.seed, step)
            batches = dataset.pack(records_now, max_tokens=cfg.max_tokens, padded=padded)
            master.zero_grad()
            train_metrics = run_batches(algorithm, batches, train=True)
            master.gradients_in()
            if cfg.max_grad_norm is not None:
                train_metrics["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(
                    params, cfg.max_grad_norm))
            train_metrics["lr"] = scheduler.get_last_lr()[0]  # the rate this step ran at
            optimizer.step()
            master.weights_out()
            scheduler.step()
            train_metrics["tokens_per_s"] = train_metrics["tokens"] / (time.perf_counter() - t0)
            done = step + 1
            if done % cfg.log_every == 0 or done == cfg.steps:
                logger.log(done, train_metrics)
            if cfg.eval_every and eval_dataset is not None and done % cfg.eval_every == 0 \
                    and done != cfg.steps:
                logger.log(done, evaluate(algorithm, eval_dataset, cfg.max_tokens), split="eval")
            if cfg.save_every and done % cfg.save_every == 0:
                save(done)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{train_metrics['loss']:.4f}",
                                tok_s=f"{train_metrics['tokens_per_s']:.0f}")
            if cfg.crash_after_steps is not None and done == cfg.crash_after_steps:
                raise RuntimeError(f"crash_after_steps={done}: injected crash (testing aid)")
    finally:
        if bar is not None:
            bar.close()
    save(cfg.steps)
    if eval_dataset is not None:
        summary["after"] = evaluate(algorithm, eval_dataset, cfg.max_tokens)
        logger.log(cfg.steps, summary["after"], split="eval")
    model = export_run_model(cfg, model, tokenizer, out, summary)
    logger.close()
    summary["train"] = train_metrics
    summary["metrics"] = str(logger.path)
    summary["plot"] = str(plot_metrics(logger.path, out / "curves.png") or "")
    summary["model"] = model
    return summary


@torch.no_grad()
def attach_reference_logps(ref_model, dataset, max_tokens: int) -> None:
    """Compute every sequence's reference log-prob once and store it with the dataset
    (`extras["reference_logps"]`), so batches carry it and no reference model is kept."""
    from .forward import precompute_reference_logps, runs_padded

    logps = precompute_reference_logps(
        ref_model, dataset.pack(max_tokens=max_tokens, padded=runs_padded(ref_model)))
    dataset.extras["reference_logps"] = logps.tolist()


def _progress(cfg: TrainConfig, start: int):
    if not cfg.progress:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=cfg.steps, initial=start, desc=f"alignfuse {cfg.algorithm}", unit="step",
                dynamic_ncols=True)
