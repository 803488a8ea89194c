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
"""

from __future__ import annotations

import dataclasses
import json
import random
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch

from . import checkpoint as ckpt
from .loop import (ConfigError, _check_type, build_config, check_bounds, check_max_grad_norm,
                   open_run)
from .metrics import MetricsLogger, plot_metrics, pyplot, read_metrics
from .packing import pack
from .rollout import HFRollout, Rollout, SamplingConfig, VLLMRollout, vllm_available
from .tasks import addition_prompts, arithmetic_reward, solve
from .tiny import tiny_model, tiny_tokenizer

ONLINE_ALGORITHMS = ("grpo", "ppo")
# Keys that may change between a run and its resumption (they do not change the numbers).
RESUMABLE_CHANGES = ("iterations", "crash_after_iterations", "save_every", "tensorboard",
                     "keep_checkpoints", "num_threads")
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

    algorithm: str = "grpo"
    model: str = "tiny-llama"        # tiny-llama / tiny-qwen2 (the task needs their tokenizer)
    task: str = "builtin:addition"   # the built-in verifiable-reward task (the only one yet)
    max_operand: int = 4             # prompts "a+b=" with a, b in 0..max_operand
    out_dir: str = "runs/online"
    seed: int = 0
    rollout: str = "auto"            # "auto" (vLLM when installed), "vllm" or "hf"
    sft_warmup_steps: int = 30       # SFT on right answers first (a fresh model has no format)
    sft_examples: int = 64
    sft_lr: float = 3e-3
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
        if self.model not in ("tiny-llama", "tiny-qwen2"):
            raise ConfigError(f"model must be tiny-llama or tiny-qwen2, got {self.model!r}: the "
                              "built-in addition task uses the embedded character tokenizer "
                              "(your own model, prompts and reward: GRPO/PPO in your loop)")
        if self.task != "builtin:addition":
            raise ConfigError(f"task must be 'builtin:addition', got {self.task!r}")
        if self.rollout not in ("auto", "vllm", "hf"):
            raise ConfigError(f"rollout must be auto, vllm or hf, got {self.rollout!r}")
        check_bounds(self, at_least_one=("iterations", "prompts_per_iteration", "group_size",
                                         "max_new_tokens", "eval_samples", "sft_examples",
                                         "ppo_epochs", "mini_batches", "keep_checkpoints",
                                         "num_threads", "max_tokens"),
                     non_negative=("sft_warmup_steps", "save_every"),
                     positive=("lr", "sft_lr", "temperature"))
        if not 0 <= self.max_operand <= 99:
            raise ConfigError(f"max_operand must be in [0, 99], got {self.max_operand!r}")
        check_max_grad_norm(self.max_grad_norm)
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
                      max_tokens=self.max_tokens)
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


def encode_prompt(tokenizer, text: str) -> list[int]:
    # A bos anchors position 0, as in every chat-formatted prompt.
    return [tokenizer.bos_token_id] + tokenizer.encode(text, add_special_tokens=False)


def sft_warmup(model, tokenizer, cfg: OnlineConfig) -> list[float]:
    """`sft_warmup_steps` SFT steps on right answers (prompt tokens are not predicted)."""
    from .algorithms import SFT
    from .forward import runs_padded

    rng = random.Random(cfg.seed + 7)
    prompts = addition_prompts(cfg.max_operand)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.sft_lr)
    sft = SFT(model)
    padded = runs_padded(model)
    losses = []
    for _ in range(cfg.sft_warmup_steps):
        seqs, prompt_lengths = [], []
        for text in rng.choices(prompts, k=cfg.sft_examples):
            prompt = encode_prompt(tokenizer, text)
            answer = tokenizer.encode(str(solve(text)), add_special_tokens=False)
            seqs.append(prompt + answer + [tokenizer.eos_token_id])
            prompt_lengths.append(len(prompt))
        batches = pack(seqs, max_tokens=cfg.max_tokens, prompt_lengths=prompt_lengths,
                       padded=padded)
        total = sum(sft.num_units(b) for b in batches)
        for batch in batches:
            losses.append(sft.step(batch, loss_scale=sft.num_units(batch) / total)["loss"])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return losses


def mean_reward(rollout: Rollout, model, tokenizer, cfg: OnlineConfig, seed: int) -> float:
    """Mean reward of `eval_samples` fresh samples on every prompt of the task."""
    prompts = addition_prompts(cfg.max_operand)
    rollout.sync_weights(model)
    sampling = SamplingConfig(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                              seed=seed, stop_token_ids=[tokenizer.eos_token_id])
    samples = rollout.generate([encode_prompt(tokenizer, p) for p in prompts], cfg.eval_samples,
                               sampling)
    rewards = [arithmetic_reward(prompts[s.prompt_index],
                                 tokenizer.decode(s.completion_token_ids, skip_special_tokens=True))
               for s in samples]
    return sum(rewards) / len(rewards)


def make_rollout(kind: str, model, max_model_len: int = 128) -> Rollout:
    if kind == "auto":
        kind = "vllm" if vllm_available() else "hf"
    if kind == "vllm":
        return VLLMRollout(model, max_model_len=max_model_len)
    return HFRollout(model)


def rollout_length(cfg: OnlineConfig, tokenizer) -> int:
    """vLLM's max_model_len for the task: its longest prompt + max_new_tokens, at least 128
    (what the KV cache is sized for anyway)."""
    longest = max(len(encode_prompt(tokenizer, p)) for p in addition_prompts(cfg.max_operand))
    return max(128, longest + cfg.max_new_tokens)


def needs_reference(cfg: OnlineConfig) -> bool:
    """Whether the run's algorithm has a KL term to a reference model: GRPO's `beta`, PPO's
    `kl_coef` (each reads only its own)."""
    return (cfg.beta if cfg.algorithm == "grpo" else cfg.kl_coef) > 0


def make_online_algorithm(cfg: OnlineConfig, model, rollout: Rollout, tokenizer, ref_model):
    from .algorithms.grpo import GRPO
    from .algorithms.ppo import PPO

    sampling = SamplingConfig(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                              stop_token_ids=[tokenizer.eos_token_id])
    common = dict(tokenizer=tokenizer, sampling=sampling, clip_low=cfg.clip_low,
                  clip_high=cfg.clip_high, loss_agg=cfg.loss_agg, tis_cap=cfg.tis_cap,
                  ppo_epochs=cfg.ppo_epochs, mini_batches=cfg.mini_batches,
                  max_tokens=cfg.max_tokens)
    if cfg.algorithm == "grpo":
        return GRPO(model, rollout, arithmetic_reward, group_size=cfg.group_size,
                    estimator=cfg.estimator, scale=cfg.scale, beta=cfg.beta,
                    ref_model=ref_model if cfg.beta > 0 else None,
                    importance_level=cfg.importance_level, **common)
    return PPO(model, rollout, arithmetic_reward, group_size=cfg.group_size,
               kl_coef=cfg.kl_coef, target_kl=cfg.target_kl,
               ref_model=ref_model if cfg.kl_coef > 0 else None, gamma=cfg.gae_gamma,
               lam=cfg.gae_lambda, vf_coef=cfg.vf_coef, **common)


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
    out, ckpt_root, state = open_run(cfg, resume=resume, resumable=RESUMABLE_CHANGES)
    if cfg.num_threads is not None:
        torch.set_num_threads(cfg.num_threads)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    start_time = time.perf_counter()
    tokenizer = tiny_tokenizer()
    model = tiny_model(cfg.model.split("-", 1)[1], len(tokenizer), seed=cfg.seed)  # validated
    sft_losses = sft_warmup(model, tokenizer, cfg) if state is None else []
    # The reference (for the KL terms) is the model after warm-up.
    ref_model = None
    if needs_reference(cfg):
        import copy

        ref_model = copy.deepcopy(model).eval().requires_grad_(False)
        if state is not None:
            ref_model.load_state_dict(state["reference"])
    own_rollout = rollout is None
    rollout = rollout or make_rollout(cfg.rollout, model, rollout_length(cfg, tokenizer))
    algorithm = make_online_algorithm(cfg, model, rollout, tokenizer, ref_model)
    params = [p for p in (algorithm.parameters() if hasattr(algorithm, "critic")
                          else model.parameters()) if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr)
    start = 0
    summary: dict[str, Any] = {"rollout": type(rollout).__name__}
    if state is not None:
        model.load_state_dict(state["model"])
        if "critic" in state:
            algorithm.critic.load_state_dict(state["critic"])
        optimizer.load_state_dict(state["optimizer"])
        ckpt.set_rng_state(state["rng"])
        start = state["step"]
        summary["reward_before"] = state["reward_before"]
        if "kl_coef" in state:
            algorithm.kl_coef = state["kl_coef"]
        if "kl_controller" in state:  # the adaptive coefficient's next update starts from it
            algorithm.kl_controller.load_state_dict(state["kl_controller"])
    else:
        summary["reward_before"] = mean_reward(rollout, model, tokenizer, cfg, seed=cfg.seed + 1)
    if sft_losses:
        progress(f"alignfuse {cfg.algorithm}: {summary['rollout']}; SFT warm-up "
                 f"{cfg.sft_warmup_steps} steps (loss {sft_losses[0]:.2f} -> "
                 f"{sft_losses[-1]:.2f}); reward before {summary['reward_before']:.3f}")
    # Its evaluations are at 0 and after the last checkpoint: a resumed run logs the final
    # one again, at the end (the checkpoint's iteration, or a later one when extended).
    logger = MetricsLogger(out, tensorboard=cfg.tensorboard,
                           resume_step=start if state is not None else None,
                           final_eval_logged=state is not None)
    if state is None:
        logger.log(0, {"reward": summary["reward_before"]}, split="eval")

    def save(iteration: int) -> None:
        payload = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                   "config": dataclasses.asdict(cfg), "reward_before": summary["reward_before"]}
        if ref_model is not None:
            payload["reference"] = ref_model.state_dict()
        if hasattr(algorithm, "critic"):
            payload["critic"] = algorithm.critic.state_dict()
            payload["kl_coef"] = algorithm.kl_coef
            if algorithm.kl_controller is not None:
                payload["kl_controller"] = algorithm.kl_controller.state_dict()
        ckpt.save_checkpoint(ckpt_root, iteration, payload, keep=cfg.keep_checkpoints)

    prompts = addition_prompts(cfg.max_operand)
    for iteration in range(start, cfg.iterations):
        # The prompts and the sampling seed of an iteration depend only on (seed, iteration).
        rng = random.Random(cfg.seed * 1_000_003 + iteration)
        batch = [encode_prompt(tokenizer, p)
                 for p in rng.choices(prompts, k=cfg.prompts_per_iteration)]
        algorithm.sampling.seed = cfg.seed * 100_003 + iteration
        metrics = algorithm.train_iteration(batch, optimizer, max_grad_norm=cfg.max_grad_norm)
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
    summary["reward_after"] = mean_reward(rollout, model, tokenizer, cfg, seed=cfg.seed + 2)
    logger.log(cfg.iterations, {"reward": summary["reward_after"]}, split="eval")
    logger.close()
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
             f"{len(prompts)} prompts) in {summary['seconds']:.0f} s")
    summary["model"] = model
    if own_rollout and hasattr(rollout, "close"):
        rollout.close()
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
