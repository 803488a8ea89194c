"""LoRA adapters (Hu et al. 2021, https://arxiv.org/abs/2106.09685) in the ready loop,
through PEFT: `lora_r > 0` trains low-rank adapters on the model's linear layers and keeps
every base weight frozen.

The base model is then the reference (`BaseReference`: the policy with its adapters off),
so no copy of the model is made: DPO's and KTO's reference log-probs are the base's,
precomputed once or (`reference=model`) computed at each step. Checkpoints hold
the adapters alone (a resume rebuilds the base from `model=` and the warmed-up weights, then
loads them); the run ends with the adapter folder (`out_dir/adapter`, which
`peft.PeftModel.from_pretrained(base, path)` loads) and the model with the adapters merged
(`out_dir/model`, a plain Hugging Face folder). A warm-up (`sft_warmup_steps`) trains every
weight before the adapters are added; the base is then the warmed model (`out_dir/
reference.pt`), and the adapter folder belongs on it, not on `model=`. In your own loop,
wrap the model with `peft.get_peft_model` yourself: the engine's forward and the
algorithms take PEFT models.
"""

from __future__ import annotations

import contextlib
import difflib

import torch
from torch import nn

# The LM head stays out of reach: the fused log-prob ops read its weight directly
# (`engine/forward.py` refuses an adapter on it).
ALL_LINEAR = "all-linear"


def lora_targets(model: nn.Module, targets: str) -> str | list[str]:
    """PEFT's `target_modules` for the config value `targets` ("all-linear", or
    comma-separated module names such as "q_proj,v_proj", each matching the end of a module
    path as in PEFT). Raises ValueError naming `lora_targets` when a name matches no module
    of `model` (PEFT itself ignores such a name while another one matches) or matches the LM
    head; the ready loop calls it before any training."""
    if targets.strip() == ALL_LINEAR:
        return ALL_LINEAR
    names = [name.strip() for name in targets.split(",") if name.strip()]
    if not names:
        raise ValueError(f"lora_targets names no module: {targets!r}")
    paths = [path for path, _ in model.named_modules() if path]
    head = next(path for path, module in model.named_modules()
                if module is model.get_output_embeddings())
    for name in names:
        matches = [p for p in paths if p == name or p.endswith("." + name)]
        if not matches:
            close = difflib.get_close_matches(name, sorted({p.rsplit(".", 1)[-1]
                                                            for p in paths}), n=3)
            raise ValueError(f"lora_targets: {name!r} matches no module of the model"
                             + (f" (did you mean {', '.join(close)}?)" if close else ""))
        if head in matches:
            raise ValueError(f"lora_targets: {name!r} is the LM head ({head}); the fused "
                             "log-prob ops read its weight directly, so it cannot carry an "
                             "adapter")
    return names


def add_lora(model: nn.Module, *, r: int, alpha: float, targets: str,
             modules_to_save: tuple[str, ...] = ()) -> nn.Module:
    """`model` wrapped in PEFT LoRA adapters of rank `r` and scale `alpha / r` on `targets`
    (see `lora_targets`). The adapters start at zero (B = 0), so the wrapped model computes
    what `model` did. `modules_to_save`: modules trained whole beside the adapters and saved
    with them (a reward model's `reward_head`)."""
    try:
        import peft
    except ImportError:
        raise ImportError("lora_r > 0 needs peft: pip install peft "
                          "(or the project's train extra)") from None
    config = peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, bias="none",
                             target_modules=lora_targets(model, targets), task_type="CAUSAL_LM",
                             modules_to_save=list(modules_to_save) or None)
    return peft.get_peft_model(model, config)


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The parameters that train (the adapters), by name: what a LoRA checkpoint holds."""
    return {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}


@torch.no_grad()
def load_trainable_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load `trainable_state`'s tensors into `model`; the names must be exactly its
    trainable ones (a checkpoint of other adapters is refused, naming the difference)."""
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    if set(params) != set(state):
        missing, extra = sorted(set(params) - set(state)), sorted(set(state) - set(params))
        raise ValueError(f"the checkpoint's adapters do not match this model's: missing "
                         f"{missing[:3]}, unexpected {extra[:3]}")
    for name, p in params.items():
        p.copy_(state[name])


def merge(model: nn.Module) -> nn.Module:
    """The base model with the adapters merged into its weights (PEFT's merge_and_unload):
    a plain Hugging Face model again. `model` is consumed."""
    return model.merge_and_unload()


def _is_adapter(name: str) -> bool:
    """A PEFT parameter that `disable_adapter` turns off: a LoRA matrix or a trained copy of
    a module to save (the base module stays beside it)."""
    return ".lora_" in name or ".modules_to_save." in name


class BaseReference:
    """The reference of a LoRA policy without a second model: the policy's own base, run with
    its adapters disabled (PEFT's `disable_adapter`) and in eval mode, under no grad. Pass it
    as `ref_model=` to DPO, KTO, GRPO and PPO (TRL does the same for PEFT models); the
    reference then costs no memory and gives exactly the base model's log-probs.

    model: the PEFT policy. Refused when a base weight trains too (outside the adapters):
    the reference would move with every update."""

    training = False  # what the algorithms read and set on a reference model

    def __init__(self, model: nn.Module):
        if not callable(getattr(model, "disable_adapter", None)):
            raise TypeError(f"BaseReference needs a PEFT model (peft.get_peft_model), got "
                            f"{type(model).__name__}")
        moving = [name for name, p in model.named_parameters()
                  if p.requires_grad and not _is_adapter(name)]
        if moving:
            raise ValueError(f"BaseReference: the base of this model trains too ({moving[0]} "
                             f"and {len(moving) - 1} more require grad), so its log-probs "
                             "would follow every update; freeze them, or pass a frozen copy "
                             "as ref_model")
        self.model = model

    def eval(self) -> "BaseReference":
        return self

    def train(self, mode: bool = True) -> "BaseReference":
        return self

    @contextlib.contextmanager
    def active(self):
        """The policy with its adapters off and in eval mode, for the duration."""
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad(), self.model.disable_adapter():
                yield self.model
        finally:
            self.model.train(was_training)
