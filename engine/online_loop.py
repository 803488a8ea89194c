"""Online RL from the command line: the ready GRPO/PPO loop and the GRPO main job.

`train_online(cfg)` drives the `GRPO`/`PPO` objects exactly as a user's loop would
(`train_iteration` per generation batch), with the engine's metrics JSONL/TensorBoard
(`engine/metrics.py`), plots, and atomic checkpoints with an exact resume
(`engine/checkpoint.py`: model, critic, optimizer, RNG states; the prompts and the sampling
seed of iteration i are pure functions of (seed, i)).

The main job (`alignfuse demo --task grpo`): the tiny model learns small additions from a
verifiable reward. Prompts are `"a+b="` with a, b in 0..max_operand, the reward is
`engine/tasks.py`'s `arithmetic_reward` (1 when the completion starts with the right sum).
A randomly initialised model never answers, so a short SFT warm-up on right answers teaches
the format and gets the reward off zero; GRPO then raises it. Generation goes through vLLM
when it is installed (weights synced in place every iteration), else transformers.

The reward reported before and after is the mean reward of `eval_samples` fresh samples per
prompt, at the training temperature, over every prompt of the task: exactly the objective
GRPO maximises.

On your own model, prompts and reward (`model=<folder> task=<prompts.jsonl>
reward=<file.py:function>`): the prompts are `engine/data.py` `load_prompts` records,
rendered as the offline loaders render prompts (the chat template when the tokenizer has
one), gone through in a fresh order each epoch; the reward gets each record's own prompt
text, the decoded completion and the record's other fields as keywords (`OnlineTask`).
`reward_model=<folder>` scores with a trained reward model instead (`alignfuse train rm`'s
out_dir/model, or a one-label sequence classifier: `TextRewardModel`, batched, through its
own tokenizer), which makes SFT -> reward model -> PPO a pipeline of three commands.
`lora_r > 0` trains adapters only: the KL reference is their base (`BaseReference`), the
rollout receives the merged weights at every sync (`rollout.hf_weights`), checkpoints hold
the adapters, and the run ends with `out_dir/adapter` beside the merged `out_dir/model`.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import random
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from . import checkpoint as ckpt
from .algorithms.grpo import checked_rewards, unfinished
from .data import PromptRecord
from .lora import BaseReference, add_lora, load_trainable_state, trainable_state
from .loop import (TINY_MODELS, ConfigError, _check_type, build_config, check_bounds,
                   check_data_unchanged, check_dtype, check_lora_targets, check_max_grad_norm,
                   export_run_model, keep_warmed_model, load_model, open_run)
from .metrics import MetricsLogger, plot_metrics, pyplot, read_metrics
from .packing import pack
from .precision import MasterWeights
from .rollout import HFRollout, Rollout, SamplingConfig, VLLMRollout, vllm_available
from .tasks import addition_prompts, arithmetic_reward, solve

ONLINE_ALGORITHMS = ("grpo", "ppo")
BUILTIN_TASK = "builtin:addition"
# Keys that may change between a run and its resumption (they do not change the numbers).
RESUMABLE_CHANGES = ("iterations", "crash_after_iterations", "save_every", "tensorboard",
                     "keep_checkpoints", "num_threads", "gradient_checkpointing")
# The algorithm knobs: each key only one of GRPO and PPO reads (`make_online_algorithm`,
# `needs_reference`), and who reads it. Given for the other one, it is a ConfigError
# (`engine/loop.py::check_knobs`), not silently ignored. The other keys both read.
ONLINE_ALGORITHM_KNOBS: dict[str, tuple[str, ...]] = {
    "estimator": ("grpo",),
    "scale": ("grpo",),
    "beta": ("grpo",),
    "importance_level": ("grpo",),
    "kl_coef": ("ppo",),
    "target_kl": ("ppo",),
    "gae_gamma": ("ppo",),
    "gae_lambda": ("ppo",),
    "vf_coef": ("ppo",),
}


@dataclass
class OnlineConfig:
    """Every key of an online (GRPO/PPO) run: YAML file or `key=value` on the command line.

    The GRPO-only and PPO-only keys (`ONLINE_ALGORITHM_KNOBS`) may be given only for the
    algorithm that reads them; `build_config` refuses them for the other one.
    """

    # Not fields (no annotation): what `build_config`/`check_knobs` check given keys against.
    ALGORITHMS = ONLINE_ALGORITHMS
    KNOBS = ONLINE_ALGORITHM_KNOBS
    # Keys read only when another is on (`check_knobs`): given while it is off, refused.
    NEEDS = {"lora_alpha": "lora_r", "lora_targets": "lora_r",
             **{key: ("builtin_task", f"task={BUILTIN_TASK}")
                for key in ("max_operand", "sft_examples", "sft_lr")}}

    @property
    def builtin_task(self) -> bool:
        return self.task == BUILTIN_TASK

    algorithm: str = "grpo"
    # tiny-llama / tiny-qwen2 (the embedded default), or a local Hugging Face model folder
    # (with a task of your own: the built-in one needs the embedded tokenizer).
    model: str = "tiny-llama"
    # "builtin:addition" (the verifiable-reward task of engine/tasks.py), or your prompts: a
    # JSONL file or saved dataset folder of `prompt` records (engine/data.py `load_prompts`;
    # their other fields, e.g. `answer`, reach the reward function as keywords).
    task: str = "builtin:addition"
    # Your task's reward: "module:function" or "path/to/file.py:function", called as
    # function(prompt, completion, **fields) -> float (prompt: the record's text, before any
    # chat template). The built-in task has its own (arithmetic_reward) and takes none.
    reward: str | None = None
    # Or a trained reward model: `alignfuse train rm`'s out_dir/model, or a one-label Hugging
    # Face *ForSequenceClassification folder. It scores the record's prompt text and the
    # completion, rendered by its own tokenizer as its training data was, in batches.
    reward_model: str | None = None
    eval_task: str | None = None     # prompts to evaluate on (default: the task's own)
    eval_prompts: int = 64           # at most this many of them (a fixed draw)
    max_operand: int = 4             # built-in task: prompts "a+b=" with a, b in 0..max_operand
    out_dir: str = "runs/online"
    seed: int = 0
    rollout: str = "auto"            # "auto" (vLLM when installed), "vllm" or "hf"
    # SFT on right answers first (a fresh model has no format): the built-in task only (None:
    # 30 there, 0 for a task of yours, which has no right answers to learn).
    sft_warmup_steps: int | None = None
    sft_examples: int = 64
    sft_lr: float = 3e-3
    # LoRA (engine/lora.py), as in `alignfuse train`: lora_r > 0 trains rank-r adapters and
    # freezes the model; the KL reference is then the base itself (BaseReference, no copy),
    # vLLM gets the merged weights at each sync, and the run ends with out_dir/adapter.
    lora_r: int = 0
    lora_alpha: float = 16.0         # only with lora_r > 0
    lora_targets: str = "all-linear"  # only with lora_r > 0
    # At the end, the trained policy and its tokenizer as a Hugging Face folder, out_dir/model.
    export_model: bool = True
    # bfloat16: the policy (and its reference copy, PPO's critic) computed in bf16 and updated
    # through fp32 master weights (engine/precision.py), as `alignfuse train` does; LoRA
    # adapters stay fp32. The rollout samples in its own dtype (vLLM: float32 on a CPU) from
    # the synced weights; tis_cap corrects for the difference.
    dtype: str = "float32"
    # Recompute each layer's activations in the backward (non-reentrant): less memory.
    gradient_checkpointing: bool = False
    iterations: int = 60             # generation batches
    prompts_per_iteration: int = 25
    group_size: int = 16             # samples per prompt
    # Adam moves every weight by ~lr per step whatever the gradient's size: 2e-3 moved the
    # tiny policy by 0.3 nats/token in one step and the reward fell (measured); 5e-4 rises.
    lr: float = 5e-4
    max_grad_norm: float | None = 1.0
    temperature: float = 1.0
    max_new_tokens: int = 4
    max_tokens: int = 4096           # tokens per packed micro-batch
    ppo_epochs: int = 1
    mini_batches: int = 2            # optimizer steps per generation batch and epoch
    loss_agg: str = "token-mean"
    clip_low: float = 0.2
    clip_high: float = 0.2
    tis_cap: float | None = 2.0      # truncated importance sampling (sampler vs trainer)
    # Subtracted from the reward of a completion cut at max_new_tokens (in training and in the
    # evaluated reward): a reward model would score it as if it had ended. None: off.
    missing_eos_penalty: float | None = None
    # GRPO only (a ConfigError when given with algorithm=ppo)
    estimator: str = "grpo"
    scale: str = "group"
    beta: float = 0.04               # KL to the reference (the model after warm-up)
    importance_level: str = "token"
    # PPO only (a ConfigError when given with algorithm=grpo)
    kl_coef: float = 0.0
    target_kl: float | None = None
    gae_gamma: float = 1.0
    gae_lambda: float = 0.95
    vf_coef: float = 0.5
    # Both again
    eval_samples: int = 8
    save_every: int = 0              # 0: only at the end
    keep_checkpoints: int = 2
    tensorboard: bool = True
    # Torch threads of the trainer. One: the model is tiny, and on a shared 2-core machine
    # more threads oversubscribe. Set before vLLM starts: vLLM's CPU worker then replaces
    # torch.set_num_threads by a no-op for the rest of the process.
    num_threads: int | None = 1
    crash_after_iterations: int | None = None  # testing aid: a crash to resume from

    def validate(self) -> "OnlineConfig":
        for f in fields(self):
            _check_type(f.name, getattr(self, f.name), f.type)
        if self.algorithm not in ONLINE_ALGORITHMS:
            raise ConfigError(f"algorithm must be one of {ONLINE_ALGORITHMS}, "
                              f"got {self.algorithm!r}")
        if self.builtin_task:
            if self.model not in TINY_MODELS:
                raise ConfigError(f"model={self.model!r} needs a task of yours (task=prompts."
                                  f"jsonl reward=module:function): task={BUILTIN_TASK} runs on "
                                  "tiny-llama or tiny-qwen2, whose character tokenizer it uses")
            for key in ("reward", "reward_model"):
                if getattr(self, key) is not None:
                    raise ConfigError(f"{key}: task={BUILTIN_TASK} has its own reward "
                                      f"(arithmetic_reward); remove {key}=, or give task= "
                                      "your prompts")
            if self.sft_warmup_steps is None:
                self.sft_warmup_steps = 30
        else:
            if self.task.startswith("builtin:"):
                raise ConfigError(f"task: unknown built-in task {self.task!r} (have: "
                                  f"{BUILTIN_TASK}, or a prompts file)")
            for key in ("task", "eval_task"):
                source = getattr(self, key)
                if source is not None and not Path(source).exists():
                    raise ConfigError(f"{key}: {source} does not exist (a JSONL file or a "
                                      "saved dataset folder of prompt records)")
            if self.model not in TINY_MODELS and not Path(self.model).is_dir():
                raise ConfigError(f"model must be tiny-llama, tiny-qwen2 or a local model "
                                  f"folder; {self.model!r} is none of these")
            if self.reward is None and self.reward_model is None:
                raise ConfigError(f"reward: task={self.task!r} needs a reward: a function, "
                                  "reward=module:function or reward=path/to/file.py:function, "
                                  "or a trained reward model, reward_model=<folder>")
            if self.reward is not None and self.reward_model is not None:
                raise ConfigError("reward_model: give reward= (a function) or reward_model= "
                                  "(a trained reward model), not both")
            if self.reward_model is not None and not Path(self.reward_model).is_dir():
                raise ConfigError(f"reward_model: {self.reward_model} is not a folder (a "
                                  "reward model: `alignfuse train rm`'s out_dir/model, or a "
                                  "Hugging Face sequence classifier)")
            if self.sft_warmup_steps is None:
                self.sft_warmup_steps = 0
            elif self.sft_warmup_steps:
                raise ConfigError(f"sft_warmup_steps={self.sft_warmup_steps}: the warm-up "
                                  f"learns {BUILTIN_TASK}'s right answers, and a task of yours "
                                  "has none; warm up with `alignfuse train sft` and pass its "
                                  "out_dir/model as model=")
        if self.eval_task is not None and self.builtin_task:
            raise ConfigError(f"eval_task: task={BUILTIN_TASK} evaluates on all of its prompts; "
                              "remove eval_task")
        if self.reward is not None and ":" not in self.reward:
            raise ConfigError(f"reward must look like module:function or path/to/file.py:"
                              f"function, got {self.reward!r}")
        if self.rollout not in ("auto", "vllm", "hf"):
            raise ConfigError(f"rollout must be auto, vllm or hf, got {self.rollout!r}")
        check_bounds(self, at_least_one=("iterations", "prompts_per_iteration", "group_size",
                                         "max_new_tokens", "eval_samples", "sft_examples",
                                         "ppo_epochs", "mini_batches", "keep_checkpoints",
                                         "num_threads", "max_tokens", "eval_prompts"),
                     non_negative=("sft_warmup_steps", "save_every", "lora_r"),
                     positive=("lr", "sft_lr", "temperature", "lora_alpha"))
        if not 0 <= self.max_operand <= 99:
            raise ConfigError(f"max_operand must be in [0, 99], got {self.max_operand!r}")
        check_max_grad_norm(self.max_grad_norm)
        check_dtype(self.dtype)
        for key in ("gae_gamma", "gae_lambda"):
            if not 0 <= getattr(self, key) <= 1:
                raise ConfigError(f"{key} must be in [0, 1], got {getattr(self, key)!r}")
        self._check_algorithm_options()
        return self

    def _check_algorithm_options(self) -> None:
        """The algorithm's own option checks (`GRPO/PPO.check_options`, the kernels' checks
        on dummy inputs), so a bad value stops here, before warm-up, vLLM and generation."""
        from .algorithms.grpo import GRPO
        from .algorithms.ppo import PPO

        common = dict(group_size=self.group_size, clip_low=self.clip_low,
                      clip_high=self.clip_high, loss_agg=self.loss_agg, tis_cap=self.tis_cap,
                      ppo_epochs=self.ppo_epochs, mini_batches=self.mini_batches,
                      max_tokens=self.max_tokens, missing_eos_penalty=self.missing_eos_penalty)
        try:
            if self.algorithm == "grpo":
                GRPO.check_options(estimator=self.estimator, scale=self.scale, beta=self.beta,
                                   importance_level=self.importance_level, **common)
            else:
                PPO.check_options(kl_coef=self.kl_coef, target_kl=self.target_kl,
                                  gamma=self.gae_gamma, lam=self.gae_lambda,
                                  vf_coef=self.vf_coef, **common)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{self.algorithm}: {exc}") from None


def make_online_config(values: dict[str, Any] | None = None,
                       overrides: list[str] | None = None, **kwargs) -> OnlineConfig:
    """A validated `OnlineConfig` from a mapping, `key=value` strings and keywords (later
    wins); values are parsed as YAML scalars, as `alignfuse train` does for the other
    algorithms."""
    return build_config(OnlineConfig, values, overrides, kwargs)


# ---------------------------------------------------------------------------------------
# The task


def encode_builtin_prompt(tokenizer, text: str) -> list[int]:
    """A built-in task's prompt: a bos anchors position 0, as in every chat-formatted prompt."""
    return [tokenizer.bos_token_id] + tokenizer.encode(text, add_special_tokens=False)


# The mapping key under which a prompt's own text rides along to the reward (GRPO/PPO hand
# the reward the prompt as decoded from its tokens, chat template included).
_PROMPT_TEXT = "_alignfuse_prompt_text"


@dataclass
class OnlineTask:
    """What a run samples and scores: its prompts (text and the reward's fields), their token
    ids, the reward (a function, or a `TextRewardModel`), the tokens that end a completion
    and the evaluation prompts. It is GRPO's/PPO's reward (`score_batch`)."""

    prompts: list[PromptRecord]
    eval_prompts: list[PromptRecord]
    reward: Callable[..., float] | Any
    tokenizer: Any
    encode: Callable[[str], list[int]]
    stop_token_ids: list[int]
    builtin: bool
    _ids: dict[str, list[int]] = dataclasses.field(default_factory=dict, repr=False)

    def ids(self, prompt: str) -> list[int]:
        if prompt not in self._ids:
            self._ids[prompt] = self.encode(prompt)
        return self._ids[prompt]

    def batch(self, records: Sequence[PromptRecord]) -> list[dict]:
        """GRPO/PPO's prompts: token ids, with the text and fields the reward gets."""
        return [{"prompt": self.ids(r.prompt), _PROMPT_TEXT: r.prompt, **r.fields}
                for r in records]

    def score_batch(self, prompts: Sequence[str], completions: Sequence[str],
                    fields: Sequence[dict]) -> list[float] | torch.Tensor:
        """The rewards of a batch (what GRPO/PPO call): the user's function per sample, or
        the reward model once, on each record's own prompt text (the `_PROMPT_TEXT` field
        of `batch`'s prompts, else the prompt given)."""
        texts = [f.get(_PROMPT_TEXT, p) for p, f in zip(prompts, fields)]
        fields = [{k: v for k, v in f.items() if k != _PROMPT_TEXT} for f in fields]
        if hasattr(self.reward, "score_batch"):
            return self.reward.score_batch(texts, completions, fields)
        return [self.reward(t, c, **f) for t, c, f in zip(texts, completions, fields)]

    def longest_prompt(self) -> int:
        return max(len(self.ids(r.prompt)) for r in (*self.prompts, *self.eval_prompts))


def load_reward(spec: str) -> Callable[..., float]:
    """The function named by `reward=`: "module:function" (importable) or
    "path/to/file.py:function". ConfigError naming `reward` when it cannot be had."""
    import importlib
    import importlib.util
    import sys

    target, _, name = spec.rpartition(":")
    if not target or not name:
        raise ConfigError(f"reward must look like module:function or path/to/file.py:"
                          f"function, got {spec!r}")
    try:
        if target.endswith(".py") or "/" in target or "\\" in target:
            path = Path(target)
            if not path.is_file():
                raise ConfigError(f"reward: {target} is not a file")
            module_spec = importlib.util.spec_from_file_location(
                f"_alignfuse_reward_{path.stem}", path)
            module = importlib.util.module_from_spec(module_spec)
            sys.path.insert(0, str(path.resolve().parent))  # its own helper modules
            try:
                module_spec.loader.exec_module(module)
            finally:
                sys.path.remove(str(path.resolve().parent))
        else:
            module = importlib.import_module(target)
    except ConfigError:
        raise
    except Exception as exc:  # the user's module: any error, named and chained
        raise ConfigError(f"reward: importing {target} failed: {type(exc).__name__}: "
                          f"{exc}") from exc
    function = getattr(module, name, None)
    if function is None:
        import difflib

        close = difflib.get_close_matches(name, [n for n in vars(module) if not n.startswith("_")])
        raise ConfigError(f"reward: {target} has no {name!r}"
                          + (f" (did you mean {', '.join(close)}?)" if close else ""))
    if not callable(function):
        raise ConfigError(f"reward: {target}:{name} is a {type(function).__name__}, not a "
                          "function")
    return function


def load_task_records(cfg: OnlineConfig) -> tuple[list[PromptRecord], list[PromptRecord] | None]:
    """(the task's prompts, the evaluation prompts or None for the task's own), validated
    before any model loads. The built-in task's are every "a+b=" prompt."""
    if cfg.builtin_task:
        return [PromptRecord(p) for p in addition_prompts(cfg.max_operand)], None
    from .data import load_prompts

    return (load_prompts(cfg.task),
            load_prompts(cfg.eval_task) if cfg.eval_task is not None else None)


def make_task(cfg: OnlineConfig, model, tokenizer, records: list[PromptRecord],
              eval_records: list[PromptRecord] | None) -> OnlineTask:
    """The run's task over loaded records: the built-in one (its encoding and reward), or
    the user's prompts (encoded as `engine/data.py` encodes prompts: the chat template when
    the tokenizer has one) and `reward=`."""
    if cfg.builtin_task:
        return OnlineTask(records, records, arithmetic_reward, tokenizer,
                          lambda text: encode_builtin_prompt(tokenizer, text),
                          [tokenizer.eos_token_id], builtin=True)
    from .data import encode_prompt

    if eval_records is None:  # a fixed draw of the task's own prompts
        eval_records = list(records)
        if len(eval_records) > cfg.eval_prompts:
            eval_records = random.Random(cfg.seed + 3).sample(eval_records, cfg.eval_prompts)
    eval_records = eval_records[:cfg.eval_prompts]
    if cfg.reward_model is not None:
        from .algorithms.reward_model import load_reward_model

        reward = load_reward_model(cfg.reward_model, device=next(model.parameters()).device,
                                   max_tokens=cfg.max_tokens)
    else:
        reward = load_reward(cfg.reward)
    return OnlineTask(records, eval_records, reward, tokenizer,
                      lambda text: encode_prompt(tokenizer, text),
                      end_token_ids(model, tokenizer), builtin=False)


def end_token_ids(model, tokenizer) -> list[int]:
    """The tokens that end a completion: the tokenizer's eos and the model's generation
    config's (an instruct model's end of turn, e.g. <|eot_id|>, is often only there)."""
    ids = []
    for value in (tokenizer.eos_token_id,
                  getattr(getattr(model, "generation_config", None), "eos_token_id", None)):
        for token in (value if isinstance(value, (list, tuple)) else [value]):
            if token is not None and int(token) not in ids:
                ids.append(int(token))
    if not ids:
        raise ConfigError("model: neither its tokenizer nor its generation config has an eos "
                          "token, so a completion could never end")
    return ids


def sft_warmup(model, tokenizer, cfg: OnlineConfig) -> list[float]:
    """`sft_warmup_steps` SFT steps on right answers (prompt tokens are not predicted)."""
    from .algorithms import SFT
    from .forward import runs_padded

    rng = random.Random(cfg.seed + 7)
    prompts = addition_prompts(cfg.max_operand)
    master = MasterWeights(list(model.parameters()))  # fp32 updates of a bf16 model
    optimizer = torch.optim.AdamW(master.masters, lr=cfg.sft_lr)
    sft = SFT(model)
    padded = runs_padded(model)
    losses = []
    for _ in range(cfg.sft_warmup_steps):
        seqs, prompt_lengths = [], []
        for text in rng.choices(prompts, k=cfg.sft_examples):
            prompt = encode_builtin_prompt(tokenizer, text)
            answer = tokenizer.encode(str(solve(text)), add_special_tokens=False)
            seqs.append(prompt + answer + [tokenizer.eos_token_id])
            prompt_lengths.append(len(prompt))
        batches = pack(seqs, max_tokens=cfg.max_tokens, prompt_lengths=prompt_lengths,
                       padded=padded)
        total = sum(sft.num_units(b) for b in batches)
        for batch in batches:
            losses.append(sft.step(batch, loss_scale=sft.num_units(batch) / total)["loss"])
        master.gradients_in()
        optimizer.step()
        master.weights_out()
        master.zero_grad()
    return losses


def mean_reward(rollout: Rollout, model, task: OnlineTask, cfg: OnlineConfig,
                seed: int) -> float:
    """Mean reward of `eval_samples` fresh samples on every evaluation prompt."""
    rollout.sync_weights(model)
    sampling = SamplingConfig(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                              seed=seed, stop_token_ids=task.stop_token_ids)
    records = task.eval_prompts
    samples = rollout.generate([task.ids(r.prompt) for r in records], cfg.eval_samples, sampling)
    chosen = [records[s.prompt_index] for s in samples]
    rewards = checked_rewards(task.score_batch(
        [r.prompt for r in chosen],
        [task.tokenizer.decode(s.completion_token_ids, skip_special_tokens=True)
         for s in samples], [r.fields for r in chosen]), samples)
    if cfg.missing_eos_penalty:
        rewards = rewards - cfg.missing_eos_penalty * unfinished(samples)
    return float(rewards.double().mean())


def make_rollout(kind: str, model, max_model_len: int = 128) -> Rollout:
    if kind == "auto":
        kind = "vllm" if vllm_available() else "hf"
    if kind == "vllm":
        return VLLMRollout(model, max_model_len=max_model_len)
    return HFRollout(model)


def rollout_length(cfg: OnlineConfig, task: OnlineTask) -> int:
    """vLLM's max_model_len for the task: its longest prompt + max_new_tokens, at least 128
    (what the KV cache is sized for anyway)."""
    return max(128, task.longest_prompt() + cfg.max_new_tokens)


def needs_reference(cfg: OnlineConfig) -> bool:
    """Whether the run's algorithm has a KL term to a reference model: GRPO's `beta`, PPO's
    `kl_coef` (each reads only its own)."""
    return (cfg.beta if cfg.algorithm == "grpo" else cfg.kl_coef) > 0


def make_online_algorithm(cfg: OnlineConfig, model, rollout: Rollout, task: OnlineTask,
                          ref_model):
    from .algorithms.grpo import GRPO
    from .algorithms.ppo import PPO

    sampling = SamplingConfig(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                              stop_token_ids=task.stop_token_ids)
    common = dict(tokenizer=task.tokenizer, sampling=sampling, clip_low=cfg.clip_low,
                  clip_high=cfg.clip_high, loss_agg=cfg.loss_agg, tis_cap=cfg.tis_cap,
                  ppo_epochs=cfg.ppo_epochs, mini_batches=cfg.mini_batches,
                  max_tokens=cfg.max_tokens, missing_eos_penalty=cfg.missing_eos_penalty)
    if cfg.algorithm == "grpo":
        return GRPO(model, rollout, task, group_size=cfg.group_size,
                    estimator=cfg.estimator, scale=cfg.scale, beta=cfg.beta,
                    ref_model=ref_model if cfg.beta > 0 else None,
                    importance_level=cfg.importance_level, **common)
    return PPO(model, rollout, task, group_size=cfg.group_size,
               kl_coef=cfg.kl_coef, target_kl=cfg.target_kl,
               ref_model=ref_model if cfg.kl_coef > 0 else None, gamma=cfg.gae_gamma,
               lam=cfg.gae_lambda, vf_coef=cfg.vf_coef, **common)


def iteration_prompts(cfg: OnlineConfig, task: OnlineTask, iteration: int) -> list[PromptRecord]:
    """The prompts of an iteration, a function of (seed, iteration) alone (an exact resume
    needs nothing else): the built-in task draws with replacement; a task of yours goes
    through its prompts in a fresh order each epoch (`loop.records_for_step`)."""
    if task.builtin:
        rng = random.Random(cfg.seed * 1_000_003 + iteration)
        return rng.choices(task.prompts, k=cfg.prompts_per_iteration)
    from .loop import records_for_step

    return [task.prompts[i] for i in records_for_step(len(task.prompts),
                                                      cfg.prompts_per_iteration, cfg.seed,
                                                      iteration)]


# ---------------------------------------------------------------------------------------
# The loop


def train_online(cfg: OnlineConfig, *, resume: bool = False, rollout: Rollout | None = None,
                 progress=print) -> dict[str, Any]:
    """Run GRPO or PPO from a validated config. Returns a summary: reward before/after, the
    batch-reward curve, timings and the paths written.

    rollout: an existing rollout to reuse (tests share one vLLM engine); it must have been
        built on a model of the same architecture, and is synced from the new model first.
    """
    cfg.validate()
    # The user's prompts and reward function are checked before anything is written.
    records, eval_records = load_task_records(cfg)
    if not cfg.builtin_task:
        if cfg.reward is not None:
            load_reward(cfg.reward)
        else:
            from .algorithms.reward_model import check_reward_model_folder

            try:
                check_reward_model_folder(cfg.reward_model)
            except ValueError as exc:
                raise ConfigError(f"reward_model: {exc}") from None
        if cfg.prompts_per_iteration > len(records):
            raise ConfigError(f"prompts_per_iteration={cfg.prompts_per_iteration} is more than "
                              f"the task's {len(records)} prompts; lower it (group_size "
                              "samples each prompt several times)")
    out, ckpt_root, state = open_run(cfg, resume=resume, resumable=RESUMABLE_CHANGES)
    # A resumed run must draw from the prompts the checkpoint's run drew from.
    fingerprints = check_data_unchanged(cfg, state, ("task", "eval_task"))
    if cfg.num_threads is not None:
        torch.set_num_threads(cfg.num_threads)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    start_time = time.perf_counter()
    model, tokenizer = load_model(cfg.model, seed=cfg.seed, dtype=cfg.dtype)
    task = make_task(cfg, model, tokenizer, records, eval_records)
    check_lora_targets(cfg, model)
    sft_losses = (sft_warmup(model, tokenizer, cfg)
                  if state is None and cfg.sft_warmup_steps else [])
    # The reference (for the KL terms) is the model after warm-up; under LoRA adapters it is
    # their frozen base, kept in out_dir/reference.pt when a warm-up changed it (a LoRA
    # checkpoint holds the adapters alone).
    ref_model = None
    if cfg.lora_r and cfg.sft_warmup_steps:
        keep_warmed_model(out, model, resumed=state is not None)
    if needs_reference(cfg) and not cfg.lora_r:
        ref_model = copy.deepcopy(model).eval().requires_grad_(False)
        if state is not None:
            ref_model.load_state_dict(state["reference"])
    if cfg.lora_r:
        model = add_lora(model, r=cfg.lora_r, alpha=cfg.lora_alpha, targets=cfg.lora_targets)
        if needs_reference(cfg):
            ref_model = BaseReference(model)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    own_rollout = rollout is None
    rollout = rollout or make_rollout(cfg.rollout, model, rollout_length(cfg, task))
    algorithm = make_online_algorithm(cfg, model, rollout, task, ref_model)
    params = [p for p in (algorithm.parameters() if hasattr(algorithm, "critic")
                          else model.parameters()) if p.requires_grad]
    master = MasterWeights(params)  # bf16 parameters get fp32 masters; fp32 ones are their own
    optimizer = torch.optim.AdamW(master.masters, lr=cfg.lr)
    start = 0
    summary: dict[str, Any] = {"rollout": type(rollout).__name__}
    if state is not None:
        if cfg.lora_r:
            load_trainable_state(model, state["model"])
        else:
            model.load_state_dict(state["model"])
        if "critic" in state:
            algorithm.critic.load_state_dict(state["critic"])
        master.load_state_dict(state.get("master"))
        optimizer.load_state_dict(state["optimizer"])
        ckpt.set_rng_state(state["rng"])
        start = state["step"]
        summary["reward_before"] = state["reward_before"]
        if "kl_coef" in state:
            algorithm.kl_coef = state["kl_coef"]
        if "kl_controller" in state:  # the adaptive coefficient's next update starts from it
            algorithm.kl_controller.load_state_dict(state["kl_controller"])
    else:
        summary["reward_before"] = mean_reward(rollout, model, task, cfg, seed=cfg.seed + 1)
    if state is None:
        warmup = (f"SFT warm-up {cfg.sft_warmup_steps} steps (loss {sft_losses[0]:.2f} -> "
                  f"{sft_losses[-1]:.2f}); " if sft_losses else "")
        progress(f"alignfuse {cfg.algorithm}: {summary['rollout']}; {warmup}reward before "
                 f"{summary['reward_before']:.3f}")
    # Its evaluations are at 0 and after the last checkpoint: a resumed run logs the final
    # one again, at the end (the checkpoint's iteration, or a later one when extended).
    logger = MetricsLogger(out, tensorboard=cfg.tensorboard,
                           resume_step=start if state is not None else None,
                           final_eval_logged=state is not None)
    if state is None:
        logger.log(0, {"reward": summary["reward_before"]}, split="eval")

    def save(iteration: int) -> None:
        payload = {"model": trainable_state(model) if cfg.lora_r else model.state_dict(),
                   "master": master.state_dict(), "optimizer": optimizer.state_dict(), "data_sha256": fingerprints,
                   "config": dataclasses.asdict(cfg), "reward_before": summary["reward_before"]}
        if ref_model is not None and not cfg.lora_r:
            payload["reference"] = ref_model.state_dict()
        if hasattr(algorithm, "critic"):
            payload["critic"] = algorithm.critic.state_dict()
            payload["kl_coef"] = algorithm.kl_coef
            if algorithm.kl_controller is not None:
                payload["kl_controller"] = algorithm.kl_controller.state_dict()
        ckpt.save_checkpoint(ckpt_root, iteration, payload, keep=cfg.keep_checkpoints)

    for iteration in range(start, cfg.iterations):
        # The prompts and the sampling seed of an iteration depend only on (seed, iteration).
        batch = task.batch(iteration_prompts(cfg, task, iteration))
        algorithm.sampling.seed = cfg.seed * 100_003 + iteration
        metrics = algorithm.train_iteration(batch, optimizer, max_grad_norm=cfg.max_grad_norm,
                                            master_weights=master)
        done = iteration + 1
        logger.log(done, metrics)
        if iteration % 5 == 0 or done == cfg.iterations:
            progress(f"  iteration {done:3d}  reward {metrics['reward']:.3f}  "
                     f"generate {metrics['time/generate_s']:.2f}s  "
                     f"sync {metrics['time/sync_s'] * 1e3:.0f}ms  "
                     f"train {metrics['time/train_s']:.2f}s")
        if cfg.save_every and done % cfg.save_every == 0:
            save(done)
        if cfg.crash_after_iterations is not None and done == cfg.crash_after_iterations:
            raise RuntimeError(f"crash_after_iterations={done}: injected crash (testing aid)")
    save(cfg.iterations)
    summary["reward_after"] = mean_reward(rollout, model, task, cfg, seed=cfg.seed + 2)
    logger.log(cfg.iterations, {"reward": summary["reward_after"]}, split="eval")
    logger.close()
    if own_rollout and hasattr(rollout, "close"):
        rollout.close()
    model = export_run_model(cfg, model, tokenizer, out, summary)
    summary["seconds"] = time.perf_counter() - start_time
    summary["reward_curve"] = [row["reward"] for row in read_metrics(logger.path)
                               if row["split"] == "train"]
    summary["metrics"] = str(logger.path)
    summary["plot"] = str(plot_metrics(logger.path, out / "curves.png") or "")
    summary["reward_plot"] = str(plot_reward(summary, out / "reward.png") or "")
    with open(out / "summary.json", "w") as f:
        json.dump({k: v for k, v in summary.items()}, f, indent=2)
    progress(f"alignfuse {cfg.algorithm}: reward {summary['reward_before']:.3f} -> "
             f"{summary['reward_after']:.3f} (mean over {cfg.eval_samples} samples x "
             f"{len(task.eval_prompts)} prompts) in {summary['seconds']:.0f} s")
    summary["model"] = model
    return summary


def plot_reward(summary: dict, png) -> Path | None:
    """The batch reward per iteration, with the evaluated reward before and after."""
    plt = pyplot()
    if plt is None:
        return None
    curve = summary["reward_curve"]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(range(1, len(curve) + 1), curve, label="batch reward")
    ax.axhline(summary["reward_before"], ls="--", c="gray", label="eval before")
    ax.axhline(summary["reward_after"], ls="--", c="green", label="eval after")
    ax.set_xlabel("iteration")
    ax.set_ylabel("mean reward")
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return Path(png)


# The GRPO main job: sized for a few minutes on 2 CPU cores.
GRPO_DEMO_CONFIG = {"algorithm": "grpo", "out_dir": "runs/demo-grpo"}


def run_grpo_demo(overrides: list[str] | None = None, *, resume: bool = False,
                  rollout: Rollout | None = None, progress=print, **kwargs) -> dict[str, Any]:
    """`alignfuse demo --task grpo`: the GRPO main job on the embedded default."""
    cfg = make_online_config(GRPO_DEMO_CONFIG, overrides, **kwargs)
    return train_online(cfg, resume=resume, rollout=rollout, progress=progress)
