"""A reward model: a scalar head on a causal LM's final hidden state at each sequence's last
token, trained with the pointwise (MSE), pairwise (Bradley-Terry) or listwise ranking losses
of `alignfuse.kernels.reward_model`.

Data layout in a packed batch:
- pointwise: any sequences, with the target score in `extras["score"]`;
- pairwise: packed as for DPO (`[chosen0, rejected0, ...]`, groups `[0, 0, ...]`), with an
  optional per-pair `extras["margin"]` (read at the chosen rows);
- listwise: the K responses of each prompt contiguous and best first, one group each.

The head is attached to the model (`model.reward_head`, an `nn.Linear(H, 1)`) so that it
moves, saves, and is wrapped by DDP/FSDP2 with it: construct `RewardModel` BEFORE wrapping
the model and building the optimizer. It is evaluated inside the model's forward, where
FSDP2 has the root module's parameters gathered.
"""

from __future__ import annotations

import torch
from torch import nn

from alignfuse.kernels.reward_model import listwise_rm_loss, pairwise_rm_loss, pointwise_rm_loss

from ..forward import run_decoder, unwrap_model
from .base import Algorithm, split_pairs

KINDS = ("pointwise", "pairwise", "listwise")


def attach_reward_head(model: nn.Module) -> nn.Linear:
    """The model's `reward_head` (created, zero-initialised, if missing)."""
    inner = unwrap_model(model)
    head = getattr(inner, "reward_head", None)
    if head is None:
        hidden = inner.config.hidden_size
        param = next(inner.parameters())
        head = nn.Linear(hidden, 1, device=param.device, dtype=param.dtype)
        # Zero init: every response starts with the same score, so early steps are stable.
        nn.init.zeros_(head.weight)
        nn.init.zeros_(head.bias)
        inner.reward_head = head
    return head


class RewardModel(Algorithm):
    """Reward-model step. `kind` picks the loss; `scores(batch)` gives `[S]` scores."""

    def __init__(self, model: nn.Module, *, kind: str = "pairwise"):
        super().__init__(model)
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        self.kind = kind
        attach_reward_head(model)

    def scores(self, batch) -> torch.Tensor:
        """`[S]` float32 score of each packed sequence (head on its last token's hidden)."""
        last = (batch.cu_seqlens[1:] - 1).to(torch.int64)
        head = unwrap_model(self.model).reward_head
        return run_decoder(self.model, batch,
                           lambda hidden: head(hidden[last]).squeeze(-1).float())

    def num_units(self, batch) -> int:
        if self.kind == "pointwise":
            return batch.num_seqs
        if self.kind == "pairwise":
            return batch.num_seqs // 2
        return int(torch.unique(batch.group_index).numel())

    def loss(self, batch) -> tuple[torch.Tensor, dict[str, float]]:
        extras = getattr(batch, "extras", None) or {}
        if self.kind == "pointwise":
            if "score" not in extras:
                raise ValueError("pointwise reward-model batches need extras['score'] "
                                 "(the target score of each sequence)")
            scores = self.scores(batch)
            loss = pointwise_rm_loss(scores, extras["score"].to(scores))
            return loss, {"score_mean": float(scores.detach().mean())}
        if self.kind == "pairwise":
            chosen, rejected = split_pairs(batch, "the pairwise reward model")
            scores = self.scores(batch)
            margin = extras["margin"][chosen].to(scores) if "margin" in extras else None
            loss = pairwise_rm_loss(scores[chosen], scores[rejected], margin=margin)
            c, r = scores[chosen].detach(), scores[rejected].detach()
            return loss, {"rewards/accuracy": float((c > r).float().mean()),
                          "rewards/margin": float((c - r).mean())}
        groups = batch.group_index
        _, counts = torch.unique_consecutive(groups, return_counts=True)
        if counts.numel() == 0 or bool((counts != counts[0]).any()) or int(counts[0]) < 2:
            raise ValueError("listwise batches need every group (prompt) to hold the same "
                             f"number K >= 2 of responses, got group sizes {counts.tolist()}")
        scores = self.scores(batch).reshape(counts.numel(), int(counts[0]))
        # Responses of a group are packed best first, so the ranking is the identity.
        ranking = torch.arange(scores.shape[1], device=scores.device).expand_as(scores)
        loss = listwise_rm_loss(scores, ranking)
        # Strictly above every other response, as the pairwise accuracy counts chosen > rejected:
        # argmax breaks ties towards index 0, so equal scores (a fresh zero head) read as 1.0.
        scores = scores.detach()
        top1 = (scores[:, :1] > scores[:, 1:]).all(dim=1)
        return loss, {"rewards/top1_accuracy": float(top1.float().mean())}


# ---------------------------------------------------------------------------------------
# A trained reward model as the reward of online RL (GRPO/PPO)


class TextRewardModel:
    """A trained reward model that scores (prompt, completion) texts, in batches: GRPO's and
    PPO's `reward` (their `score_batch` protocol), or yours to call.

    Each pair is rendered with the reward model's OWN tokenizer exactly as its training data
    was (`engine/data.py` `encode_prompt_completion`: the chat template when the tokenizer
    has one, else the prompt, the completion and eos), so the policy may use another
    tokenizer. Two kinds of model:
    - an alignfuse reward model (`alignfuse train rm`'s out_dir/model: a causal LM with its
      `reward_head`): the sequences are packed (documents isolated) and scored on their
      last token, as `RewardModel.scores` trained them;
    - a Hugging Face sequence classifier with one label (`*ForSequenceClassification`):
      right-padded batches of at most `max_tokens` padded tokens, its own pooling (the last
      token that is not its pad token); one sequence at a time when it has no pad token.

    A completion cut at max_new_tokens is scored as if it had ended (the rendering closes
    it); GRPO's/PPO's `missing_eos_penalty` lowers the reward of such completions.
    """

    def __init__(self, model: nn.Module, tokenizer, *, max_tokens: int = 4096):
        inner = unwrap_model(model)
        self.sequence_classifier = not hasattr(inner, "reward_head")
        if self.sequence_classifier and getattr(inner.config, "num_labels", None) != 1:
            raise ValueError("model has no reward_head and is not a sequence classifier with "
                             "one label; train one with `alignfuse train rm`")
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.max_tokens = max_tokens
        self._scorer = None if self.sequence_classifier else RewardModel(model)

    def encode(self, prompt: str, completion: str) -> list[int]:
        from ..data import encode_prompt_completion

        prompt_ids, completion_ids = encode_prompt_completion(self.tokenizer, prompt, completion)
        return prompt_ids + completion_ids

    @torch.no_grad()
    def score_batch(self, prompts, completions, fields=None) -> torch.Tensor:
        """`[S]` float32 scores of prompts[i] + completions[i] (texts); `fields` (the
        records' other keys, for a reward function) are not read."""
        if len(prompts) != len(completions):
            raise ValueError(f"prompts and completions differ in length: {len(prompts)} and "
                             f"{len(completions)}")
        sequences = [self.encode(p, c) for p, c in zip(prompts, completions)]
        scores = torch.empty(len(sequences), dtype=torch.float32)
        if not sequences:
            return scores
        longest = max(map(len, sequences))
        if longest > self.max_tokens:
            raise ValueError(f"max_tokens={self.max_tokens} is smaller than the longest "
                             f"prompt + completion for the reward model ({longest} tokens)")
        device = next(self.model.parameters()).device
        if not self.sequence_classifier:
            from ..forward import runs_padded
            from ..packing import pack

            for batch in pack(sequences, max_tokens=self.max_tokens,
                              padded=runs_padded(self.model, device)):
                batch = batch.to(device)
                scores[batch.seq_index.cpu()] = self._scorer.scores(batch).float().cpu()
            return scores
        pad = unwrap_model(self.model).config.pad_token_id
        # Shortest first, so a batch's padded width is its last row's length.
        order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
        groups, rows = [], []
        for i in order:
            if rows and (pad is None or (len(rows) + 1) * len(sequences[i]) > self.max_tokens):
                groups.append(rows)
                rows = []
            rows.append(i)
        groups.append(rows)
        for rows in groups:
            scores[rows] = self._classify([sequences[j] for j in rows], pad, device)
        return scores

    def _classify(self, sequences: list[list[int]], pad: int | None, device) -> torch.Tensor:
        width = max(map(len, sequences))
        ids = torch.full((len(sequences), width), pad if pad is not None else 0,
                         dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, seq in enumerate(sequences):
            ids[row, :len(seq)] = torch.tensor(seq)
            mask[row, :len(seq)] = 1
        logits = self.model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
        return logits[:, 0].float().cpu()

    def __call__(self, prompt: str, completion: str, **fields) -> float:
        return float(self.score_batch([prompt], [completion])[0])


def check_reward_model_folder(path) -> str:
    """What a reward-model folder holds, "alignfuse" (a causal LM whose weights carry
    `reward_head`) or "classifier" (a one-label `*ForSequenceClassification`), read from its
    config and weight names alone (no weights loaded). ValueError saying what is missing."""
    import json
    from pathlib import Path

    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise ValueError(f"{folder} is not a Hugging Face model folder (no config.json)")
    config = json.loads((folder / "config.json").read_text())
    architectures = config.get("architectures") or []
    if any(a.endswith("ForSequenceClassification") for a in architectures):
        labels = config.get("num_labels", len(config.get("id2label") or {}) or 2)
        if labels != 1:
            raise ValueError(f"{folder} is a sequence classifier with {labels} labels; a "
                             "reward model has one (a scalar score)")
        return "classifier"
    if "reward_head.weight" not in _weight_names(folder):
        raise ValueError(f"{folder} ({', '.join(architectures) or 'no architecture'}) has no "
                         "reward_head in its weights: it is a language model, not a reward "
                         "model; train one with `alignfuse train rm` (its out_dir/model), or "
                         "give a one-label *ForSequenceClassification model")
    return "alignfuse"


def _weight_names(folder) -> set[str]:
    import json

    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return set(json.loads(index.read_text())["weight_map"])
    if (folder / "model.safetensors").is_file():
        from safetensors import safe_open

        with safe_open(folder / "model.safetensors", "pt") as f:
            return set(f.keys())
    return set()


def _load_head(folder, head: nn.Linear) -> None:
    import json

    from safetensors import safe_open

    index = folder / "model.safetensors.index.json"
    names = {f"reward_head.{p}" for p in ("weight", "bias")}
    files = ({json.loads(index.read_text())["weight_map"][n] for n in names} if index.is_file()
             else {"model.safetensors"})
    state = {}
    for file in files:
        with safe_open(folder / file, "pt") as f:
            state.update({n.split(".", 1)[1]: f.get_tensor(n) for n in names if n in f.keys()})
    head.load_state_dict(state)


def load_reward_model(path, *, device="cpu", dtype: torch.dtype = torch.float32,
                      max_tokens: int = 4096) -> TextRewardModel:
    """A `TextRewardModel` from a folder: `alignfuse train rm`'s out_dir/model (a causal LM
    and its `reward_head`) or a one-label Hugging Face sequence classifier, with the
    folder's tokenizer. ValueError when the folder is neither (`check_reward_model_folder`)."""
    from pathlib import Path

    from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification,
                              AutoTokenizer)

    folder = Path(path)
    kind = check_reward_model_folder(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if kind == "classifier":
        model = AutoModelForSequenceClassification.from_pretrained(folder, dtype=dtype)
    else:
        from transformers.utils import logging

        # Its load report would call the reward head, loaded just below, "UNEXPECTED".
        verbosity = logging.get_verbosity()
        logging.set_verbosity_error()
        try:
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
        finally:
            logging.set_verbosity(verbosity)
        _load_head(folder, attach_reward_head(model))
    return TextRewardModel(model.to(device), tokenizer, max_tokens=max_tokens)
