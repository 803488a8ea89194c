"""The packed model forward: per-token log-probs of a Hugging Face causal LM on a `PackedBatch`.

Several documents share one row of tokens (`input_ids [N]`, `position_ids` restarting at 0 per
document, `cu_seqlens [S+1]`). Two things must hold:

1. Documents are isolated: a token attends only to earlier tokens of its own document.
   transformers does NOT do this from restarting `position_ids` alone with the sdpa/eager
   kernels (NOTES.md: the second document attends to the first; logits differed by 0.54).
   So the attention inputs are chosen per device (`attention_inputs`):
   - CUDA with flash-attn importable: the varlen kernel with `cu_seqlens`;
   - CUDA otherwise: flex_attention with a document `BlockMask`;
   - CPU: a 4-D block-diagonal causal mask `[1, 1, N, N]`: boolean for sdpa, additive
     (0 / dtype min) for eager, whose attention adds the mask to the scores.
   The two masks replace transformers' own, sliding window included: for a model with a
   sliding window that a document exceeds, the window goes into the mask too (one per
   layer type where local and global layers mix, `document_masks`). The varlen kernel gets
   the window from transformers itself.
2. No `[N, V]` logits tensor exists. The model's own forward is run (so DDP, FSDP2 and PEFT
   hooks fire as usual) with `logits_to_keep` set to no position, and the decoder's final
   hidden states are taken by a forward hook on the decoder. Inside that hook, still within
   the root forward (FSDP2 has the root's parameters gathered then), the log-probs are
   gathered through `alignfuse.kernels.linear_logprobs` with the LM head's weight and bias.

The LM head must be an `nn.Linear`. What some families do to its logits is passed to the
fused ops, read from the config in one place (`lm_head_of`):
- Gemma-2/3 style soft-capping (`config.final_logit_softcapping = c`):
  logits = c * tanh(raw / c), the ops' `softcap=c`;
- Cohere's `config.logit_scale = s`: logits = raw * s, and raw * s / T = raw / (T / s), so
  the ops get `temperature=T / s` (exact); HyperCLOVAX's `logits_scaling` and Falcon-H1's
  `lm_head_multiplier` multiply too, Granite's `logits_scaling = s` divides instead
  (`temperature=T * s`). A model with a cap and a scale is refused (no family has both,
  and their order would matter); so are the scaling fields of other families.
The sampling temperature divides the transformed logits, as transformers and vLLM do.

What no config field tells is checked once per model (`verify_packed_model`, a forward and
a backward of two tiny documents at the first call): that a packed document does not
depend on the tokens packed before it, and that the head as read above gives the model's
own logits. Models with
state-space, convolution or linear-attention layers leak (Bamba, Falcon-H1, Jamba, LFM2,
Qwen3-Next, measured): they run on right-padded rows, one per document, which is exact
for a causal model (hidden states gathered back into the packed order, so everything
downstream is unchanged). So do models whose forward raises on the packed row (Bloom and
ALiBi Falcon build their position bias from a 2-D attention mask). `runs_padded(model)`
tells, so that their batches are packed with `pack(..., padded=True)`, which budgets the
padded rows (the loops and algorithms do). A head that is not reproduced is refused
(`ModelCheckError`).
"""

from __future__ import annotations

import math
import numbers
import os
import sys
import warnings
from typing import Callable, Iterable, NamedTuple

import torch
from torch import nn

from alignfuse.kernels import linear_logprobs, segment_sum
from alignfuse.kernels.logprobs.reference import apply_softcap

from .lora import BaseReference
from .packing import pack

IGNORE_INDEX = -100


class LMHead(NamedTuple):
    """The model's LM head as the fused `linear_*` ops take it (see `lm_head_of`)."""

    weight: torch.Tensor          # [V, H]
    bias: torch.Tensor | None     # [V] or None
    softcap: float | None         # logits = softcap * tanh(raw / softcap); None = no cap
    logit_scale: float            # logits = raw * logit_scale; 1.0 when the model has none

    def op_kwargs(self, temperature: float) -> dict:
        """`bias`, `softcap` and `temperature` keywords of a `linear_*` op for sampling
        temperature `temperature` (the logit scale is folded into the temperature)."""
        if self.logit_scale != 1.0:
            if not (isinstance(temperature, numbers.Real) and math.isfinite(temperature)
                    and temperature > 0):
                raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
            temperature = temperature / self.logit_scale
        return {"bias": self.bias, "softcap": self.softcap, "temperature": temperature}


def unwrap_model(model: nn.Module) -> nn.Module:
    """The Hugging Face `PreTrainedModel` inside DDP (`.module`) and PEFT wrappers.

    FSDP2 (`fully_shard`) changes the class in place and needs no unwrapping. A model
    compiled whole (`torch.compile(model)`) is refused: the packed forward hooks the
    decoder's output, which a whole-model graph does not expose; compiling each decoder
    layer (`layer.compile()`) works.
    """
    while True:
        if isinstance(getattr(model, "_orig_mod", None), nn.Module):  # torch.compile's wrapper
            raise TypeError(
                "the model is compiled whole (torch.compile(model)); the packed forward needs "
                "the decoder's output from inside the model's forward: compile its decoder "
                "layers instead (for layer in model.model.layers: layer.compile())")
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "get_base_model") and callable(model.get_base_model):
            inner = model.get_base_model()  # peft.PeftModel
            if inner is model:
                return model
            model = inner
        else:
            return model


def disable_dropout(model: nn.Module) -> int:
    """Turn off every dropout of `model` (returns how many it turned off): `nn.Dropout`
    modules, and the probabilities that Hugging Face attention modules keep as plain
    attributes (`attention_dropout`, read by the attention call in training mode) and in
    the config. Preference and policy losses compare the policy's log-probs with a
    reference's and with the samples' log-probs, computed in eval mode: dropout in the
    training forward makes them differ at step 0 (DPO's rewards are not 0, GRPO's ratios
    not 1). TRL turns it off for the same reason; the ready loops call this."""
    def zero_rates(obj) -> int:
        """Set obj's nonzero float `*dropout` / `*pdrop` attributes to 0; how many."""
        rates = [name for name, value in vars(obj).items()
                 if isinstance(value, float) and value != 0
                 and (name.endswith("dropout") or name.endswith("pdrop"))]
        for name in rates:
            setattr(obj, name, 0.0)
        return len(rates)

    inner = unwrap_model(model)
    changed = 0
    for module in inner.modules():
        if isinstance(module, nn.modules.dropout._DropoutNd):
            changed += module.p != 0
            module.p = 0.0
        else:
            changed += zero_rates(module)
    config = getattr(inner, "config", None)
    for sub in (config, getattr(config, "text_config", None)):
        if sub is not None:
            zero_rates(sub)
    return int(changed)


# Config fields by which some families scale the LM head's logits, and what each does:
# (field, model_type prefix it means this for, exponent: logits = raw * value ** exponent).
# The same field name means other things elsewhere, so the model type is part of the key.
_LOGIT_SCALES = (("logit_scale", "", 1.0),                   # Cohere, Cohere2: raw * s
                 ("logits_scaling", "granite", -1.0),        # Granite (and its kin): raw / s
                 ("logits_scaling", "hyperclovax", 1.0),     # HyperCLOVAX: raw * s
                 ("lm_head_multiplier", "falcon_h1", 1.0))   # Falcon-H1: raw * s
# Fields that transform the logits (or the head's input) in ways not taken over here.
_UNSUPPORTED_HEAD_FIELDS = ("logits_scaling", "lm_head_multiplier", "dim_model_base",
                            "output_multiplier_scale")


def _positive_number(config, field: str) -> float:
    value = getattr(config, field)
    if not (isinstance(value, numbers.Real) and not isinstance(value, bool)
            and math.isfinite(value) and value > 0):
        raise ValueError(f"config.{field} must be a finite number > 0, got {value!r}")
    return float(value)


def text_config(config):
    """The language model's settings: a multimodal model's `text_config`, else the config."""
    if config is not None and hasattr(config, "get_text_config"):
        return config.get_text_config()
    return config


def lm_head_of(model: nn.Module) -> LMHead:
    """The model's LM head: `(weight [V, H], bias [V] or None, softcap, logit_scale)`.

    The one place that reads how a family transforms the head's logits from its (text)
    config: `final_logit_softcapping` (Gemma-2), `logit_scale` (Cohere: logits * s),
    Granite's `logits_scaling` (logits / s), HyperCLOVAX's (logits * s) and Falcon-H1's
    `lm_head_multiplier` (logits * s) are reproduced (`_LOGIT_SCALES`); the other scaling
    fields this knows of (`_UNSUPPORTED_HEAD_FIELDS`: MiniCPM's `dim_model_base`, ...) are
    refused, as are heads that are not an `nn.Linear`. A family
    that transforms its logits in code, with no config field, is caught by
    `verify_packed_model`, which compares this head's logits with the model's own.
    """
    inner = unwrap_model(model)
    config = text_config(getattr(inner, "config", None))
    model_type = str(getattr(config, "model_type", "") or "")
    softcap = None
    if getattr(config, "final_logit_softcapping", None) is not None:
        # transformers caps whenever the field is not None: 0 would be a division by zero
        # there, not "no cap", so it is refused with the other invalid values.
        softcap = _positive_number(config, "final_logit_softcapping")
    logit_scale, scale_field = 1.0, None
    for field, family, exponent in _LOGIT_SCALES:
        if getattr(config, field, None) is not None and model_type.startswith(family):
            logit_scale *= _positive_number(config, field) ** exponent
            scale_field = field
    for field in _UNSUPPORTED_HEAD_FIELDS:
        value = getattr(config, field, None)
        if field != scale_field and value not in (None, 1, 1.0):
            raise NotImplementedError(
                f"the model's config sets {field}={value!r} (model_type {model_type!r}), which "
                "transforms its logits in a way the fused log-probs do not reproduce")
    if softcap is not None and logit_scale != 1.0:
        raise NotImplementedError(
            f"the model's config sets both final_logit_softcapping={softcap!r} and "
            f"{scale_field}={getattr(config, scale_field)!r}; their order is model-specific, "
            "so the fused log-probs cannot reproduce its logits")
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    if not isinstance(head, nn.Linear):
        raise NotImplementedError(
            f"the model's output embedding must be an nn.Linear, got {type(head).__name__} "
            "(a LoRA adapter on lm_head, or a model without an LM head, is not supported)")
    return LMHead(head.weight, head.bias, softcap, logit_scale)


def document_ids(cu_seqlens: torch.Tensor) -> torch.Tensor:
    """`[N]` int64: the document of each packed token."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).to(torch.int64)
    return torch.repeat_interleave(torch.arange(lengths.numel(), device=cu_seqlens.device),
                                   lengths)


def document_causal_mask(cu_seqlens: torch.Tensor, window: int | None = None) -> torch.Tensor:
    """`[1, 1, N, N]` bool: token i may attend to token j iff same document and j <= i (and,
    with a sliding `window`, i - j < window, as transformers' sliding layers)."""
    doc = document_ids(cu_seqlens)
    pos = torch.arange(doc.numel(), device=doc.device)
    allowed = (doc[:, None] == doc[None, :]) & (pos[None, :] <= pos[:, None])
    if window is not None:
        allowed &= (pos[:, None] - pos[None, :]) < window
    return allowed[None, None]


def document_block_mask(cu_seqlens: torch.Tensor, window: int | None = None):
    """flex_attention's `BlockMask` of the same rule as `document_causal_mask`, without an
    `[N, N]` tensor (blocks wholly outside every document are skipped)."""
    from torch.nn.attention.flex_attention import create_block_mask

    doc = document_ids(cu_seqlens)

    def same_document_causal(batch, head, q, k):
        return (doc[q] == doc[k]) & (k <= q)

    def same_document_window(batch, head, q, k):
        return (doc[q] == doc[k]) & (k <= q) & (q - k < window)

    n = doc.numel()
    rule = same_document_causal if window is None else same_document_window
    return create_block_mask(rule, None, None, n, n, device=doc.device)


def document_masks(config, packed, build: Callable[[int | None], object]):
    """The attention mask(s) for `packed`: `build(window)` makes one (window None: no sliding
    window). The masks given to transformers replace its own, sliding window included, so a
    model with sliding layers (Gemma-2's local layers, Mistral) whose window a document
    exceeds gets the window in its mask: one windowed mask when every layer slides (no
    `layer_types`), else the `{layer type: mask}` mapping those models take."""
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    slides = bool(window) and (layer_types is None or "sliding_attention" in layer_types)
    if not slides or int(packed.max_seqlen) <= window:
        return build(None)  # one mask serves every layer
    if layer_types is None:
        return build(window)
    unknown = sorted(set(layer_types) - {"full_attention", "sliding_attention"})
    if unknown:
        raise NotImplementedError(f"the model's layer_types include {unknown}: only "
                                  "full_attention and sliding_attention layers get packed "
                                  "document masks")
    return {kind: build(window if kind == "sliding_attention" else None)
            for kind in dict.fromkeys(layer_types)}


def _flash_attn_importable() -> bool:
    try:
        import flash_attn  # noqa: F401
    except Exception:
        return False
    return True


def attention_inputs(model: nn.Module, packed) -> dict:
    """Keyword arguments for the model's forward that isolate the packed documents.

    May switch the model's attention implementation on CUDA (to flash_attention_2 when
    flash-attn is importable, else to flex_attention): those are the only CUDA kernels that
    isolate documents without an `[N, N]` mask.
    """
    inner = unwrap_model(model)
    impl = getattr(inner.config, "_attn_implementation", None) or "eager"
    cu = packed.cu_seqlens
    if packed.input_ids.device.type != "cuda":
        if impl not in ("sdpa", "eager"):
            raise ValueError(f"on {packed.input_ids.device.type} the model's attention must be "
                             f"'sdpa' or 'eager' to take a document mask, got {impl!r}")
        dtype = getattr(inner, "dtype", torch.float32)
        if not dtype.is_floating_point:
            dtype = torch.float32

        def cpu_mask(window):
            mask = document_causal_mask(cu, window)
            if impl == "eager":
                # eager attention adds the mask to the scores: a boolean one would add 1 / 0
                # and isolate nothing.
                mask = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(
                    ~mask, torch.finfo(dtype).min)
            return mask

        return {"attention_mask": document_masks(text_config(inner.config), packed, cpu_mask)}
    if impl.startswith("flash_attention") or _flash_attn_importable():
        if not impl.startswith("flash_attention"):
            inner.set_attn_implementation("flash_attention_2")
        cu32 = cu.to(torch.int32)
        max_len = int(packed.max_seqlen)
        # FlashAttentionKwargs: the varlen kernel reads document boundaries from these.
        return {"cu_seq_lens_q": cu32, "cu_seq_lens_k": cu32,
                "max_length_q": max_len, "max_length_k": max_len}
    if impl != "flex_attention":
        inner.set_attn_implementation("flex_attention")
    return {"attention_mask": document_masks(text_config(inner.config), packed,
                                             lambda window: document_block_mask(cu, window))}


def run_decoder(model: nn.Module, packed, on_hidden: Callable[[torch.Tensor], object], *,
                lm_head: bool = False):
    """Run `model` on `packed` and return `on_hidden(hidden [N, H])`.

    `hidden` is the decoder's final hidden state (after the final norm). `on_hidden` runs
    inside the model's forward, while FSDP2 has the root module's parameters gathered, so it
    may use the LM head or any parameter of the root module. No logits are computed.
    The model is checked first (once, `verify_packed_model`); pass `lm_head=True` when
    `on_hidden` uses the LM head (`lm_head_of`), so that a head it cannot reproduce is
    refused. A model whose packed documents are not isolated (state-carrying layers) runs
    on right-padded rows `[S, max_seqlen]` instead: exact for any causal model, at the cost
    of the padding; `hidden` is gathered back into the packed order.
    """
    device = packed.input_ids.device
    leak, head = _verdict(model, device)
    if lm_head and head:
        raise ModelCheckError(head)
    # one document runs padded too: one row, no padding, and a model that cannot take the
    # packed row's mask (Bloom) gets its 2-D mask
    padded = leak is not None
    if padded and packed.num_seqs * int(packed.max_seqlen) > 2 * packed.num_tokens:
        _warn_caller("the padded rows of this model hold more than twice the batch's tokens "
                     "(one long document among short ones, or one group of very unequal "
                     "lengths): pack its batches with pack(..., padded=True), which budgets "
                     "the padded rows and puts documents of like length together (the "
                     "engine's loops do; `runs_padded(model)` tells)")
    # no position kept: the LM head runs on an empty slice, so no [N, V] logits
    return _forward(model, packed, on_hidden,
                    torch.empty(0, dtype=torch.long, device=device), padded=padded)[0]


# alignfuse's engine and kernels, and torch (its decorators, `torch.no_grad()` on an engine
# method, and module calls wrap the engine's frames)
_OWN_CODE = (*(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                            folder, "") for folder in ("engine", "kernels")),
             os.path.join(os.path.dirname(os.path.abspath(torch.__file__)), ""))


def _warn_caller(message: str) -> None:
    """A UserWarning attributed to the first caller outside alignfuse's engine and kernels
    and torch (the user's line, however deep the engine's own calls go)."""
    frame, level = sys._getframe(0), 1
    while frame is not None and frame.f_code.co_filename.startswith(_OWN_CODE):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, UserWarning, stacklevel=level)


def _forward(model: nn.Module, packed, on_hidden: Callable[[torch.Tensor], object],
             logits_to_keep, *, padded: bool = False) -> tuple[object, object]:
    """`(on_hidden(hidden [N, H]), the model's output)` of one forward of `packed`: packed
    in one row with the documents isolated, or `padded`, one right-padded row per document
    (see `run_decoder`)."""
    decoder = unwrap_model(model).get_decoder()
    captured: list = []
    if padded:
        inputs = {"input_ids": packed.to_padded(packed.input_ids),
                  "attention_mask": packed.to_padded(torch.ones_like(packed.input_ids))}
    else:
        inputs = {"input_ids": packed.input_ids.reshape(1, -1),
                  "position_ids": packed.position_ids.reshape(1, -1),
                  **attention_inputs(model, packed)}

    def hook(module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output.last_hidden_state
        hidden = packed.from_padded(hidden) if padded else hidden.reshape(-1, hidden.shape[-1])
        captured.append(on_hidden(hidden))

    handle = decoder.register_forward_hook(hook)
    try:
        output = model(**inputs, logits_to_keep=logits_to_keep, use_cache=False)
    finally:
        handle.remove()
    if len(captured) != 1:
        raise RuntimeError(f"the decoder ran {len(captured)} times in one forward; expected 1")
    return captured[0], output


# What the packed forward assumes, verified once per model -----------------------------------

class ModelCheckError(NotImplementedError):
    """The model breaks an assumption of the packed forward (documents isolated, the LM head
    reproduced); see `verify_packed_model`."""


# The inner model's attribute {(device type, attention implementation): its verdict
# (`_probe`)}. An attribute, so a deep copy (the reference model, PPO's critic) keeps the
# verdict rather than probing and warning again: it depends on the architecture and the
# config, which the copy shares, not on the weights.
_VERDICTS = "_alignfuse_packed_verdicts"
# The probe: a first document (two draws of it) and a second one; ids from a private
# generator, so the global RNG (which a resumed run replays) is not touched.
_PROBE_LENGTHS = (7, 9)
# Isolated, the second document's hidden states do not depend on the first one's tokens.
# By gradient (`_leak_by_gradient`): masked attention probabilities are exactly 0, so the
# gradient of the second document's states with respect to the first one's embeddings is
# exactly 0 in any dtype, dense or mixture of experts (routing is per token); measured on
# tiny random models in float32 and bf16: 0 for Llama, Gemma-2, Qwen3-MoE and Mixtral, and
# 7e-6 (Falcon-H1 with scaled-up embeddings) to 0.33 (Bamba) of the gradient with respect to
# its own embeddings for the hybrids. Anything above 0 leaks.
# By forwards (`_leak_by_forwards`, under FSDP1, where the probe runs no backward): the
# second document's states change with the first one's tokens by no more than the
# forward's own run-to-run noise in a dense model, but a mixture of experts rounds its rows
# differently as the routing of the first changes the experts' batch sizes (1.6e-7
# relative in float32, measured; bf16's order in half precision). Allowed: this many times
# the noise plus this share of the states' norm, by the model's dtype (half precision
# otherwise); the same floors bound the second document packed against it run alone (the
# positions: a model that ignores the restarting `position_ids` fails there). The hybrids'
# leaks measured in float32 are 5e-4 (LFM2) to 0.4 (Bamba); in half precision a leak under
# the half floor is not caught by forwards.
_NOISE_MARGIN = 10.0
_LEAK_FLOOR = {torch.float64: 1e-9, torch.float32: 2e-5}
_HALF_LEAK_FLOOR = 5e-2
# The LM head as reproduced against the model's own logits, relative norm by the model's
# dtype (half precision otherwise): TF32 matmuls and bf16 logits stay well inside; a scale
# or cap the engine missed does not.
_HEAD_TOLERANCE = {torch.float64: 1e-6, torch.float32: 5e-3}
_HALF_HEAD_TOLERANCE = 3e-2
# What a model's forward raises when it cannot take a packed row: it then runs padded.
_UNPACKABLE = (ValueError, TypeError, IndexError, RuntimeError)


def verify_packed_model(model: nn.Module, device, *, lm_head: bool = True,
                        isolation: bool = True) -> None:
    """Check that packing is exact for this model; raise `ModelCheckError` (a
    NotImplementedError) if not. `run_decoder` makes the same check and, where packed
    documents are not isolated, runs the model on padded rows instead of refusing it.

    The probe runs once per model, device type and attention implementation, on every rank
    alike, on two short random documents packed in one row, in eval mode. It checks
    - (`isolation=True`) that documents are isolated: the second document's final hidden
      states do not depend on the first one's tokens, and equal those of it run alone. A
      model with layers that carry state along the row (state-space, short convolution or
      linear-attention layers, as in Mamba hybrids, LFM2, Qwen3-Next) leaks the first
      document into the second, which no attention mask cuts. One forward and a backward to
      the input embeddings: isolated, the gradient of the second document's states with
      respect to the first one's embeddings is exactly 0 in any dtype (`_leak_by_gradient`;
      inference mode is left for it). Under the legacy FSDP wrapper, where it runs no
      backward, three forwards instead (`_leak_by_forwards`: the first document drawn
      twice). A last forward runs the second document alone. The forward comparisons allow
      what rounding alone changes (a mixture of experts rounds differently as its routing
      changes): 2e-5 of the states' norm in float32, 5e-2 in half precision, where a
      smaller difference is not caught. A model whose forward raises on the packed row
      (ValueError, TypeError, IndexError or RuntimeError, out of memory excepted) fails
      this check too, and its head is checked on padded rows.
    - (`lm_head=True`) that the LM head as `lm_head_of` reproduces it (weight, bias, softcap,
      logit scale) gives the model's own logits, so a family that transforms its logits in
      code, or through a config field this engine does not read, is caught.
    `ALIGNFUSE_VERIFY_MODEL=0` skips it (packing is then trusted: a leaking model trains on
    leaked context, a head not reproduced on wrong log-probs).
    """
    leak, head = _verdict(model, device)
    if isolation and leak:
        raise ModelCheckError(f"{leak} `run_decoder` (token_logprobs, the algorithms) runs "
                              "such a model on right-padded rows instead.")
    if lm_head and head:
        raise ModelCheckError(head)


def runs_padded(model: nn.Module, device=None) -> bool:
    """Whether `run_decoder` runs `model` on right-padded rows, one per document, instead of
    one packed row (`verify_packed_model`'s probe found its documents not isolated, or its
    forward refusing a packed row; the probe runs now if it has not yet). Pack such a
    model's batches with `pack(..., padded=True)`, so that `max_tokens` bounds the padded
    rows it allocates; the engine's loops and algorithms do. `device`: where the batches
    will be (default: the model's parameters')."""
    if isinstance(model, BaseReference):
        model = model.model  # the same modules: the same verdict
    if device is None:
        device = next(unwrap_model(model).parameters()).device
    return _verdict(model, device)[0] is not None


def _verdict(model: nn.Module, device) -> tuple[str | None, str | None]:
    """The probe's verdict for `model` on `device` (`_probe`), computed once."""
    if os.environ.get("ALIGNFUSE_VERIFY_MODEL", "1") == "0":
        return None, None
    inner = unwrap_model(model)
    device = torch.device(device)

    def key():
        return device.type, str(getattr(inner.config, "_attn_implementation", None))

    verdicts = inner.__dict__.setdefault(_VERDICTS, {})
    if key() not in verdicts:
        before = key()
        modes = [(module, module.training) for module in model.modules()]
        model.eval()
        try:
            with torch.no_grad():
                verdict = _probe(model, device)
        finally:
            for module, training in modes:
                module.training = training
        if verdict[0]:
            _warn_caller(f"{verdict[0]} alignfuse runs it on right-padded rows, one per "
                         "document, instead of packed ones.")
        # attention_inputs may have switched the implementation: the verdict is the new one's
        verdicts[before] = verdicts[key()] = verdict
    return verdicts[key()]


def _probe(model: nn.Module, device: torch.device) -> tuple[str | None, str | None]:
    """(what leaks between packed documents, what differs in the LM head's logits): error
    messages, None where the check passes (the head's is None too when `lm_head_of` refuses
    the head: that refusal is its own error)."""
    inner = unwrap_model(model)
    config = text_config(inner.config)
    model_type = str(getattr(config, "model_type", "") or "")
    vocab = int(getattr(inner.get_input_embeddings(), "num_embeddings", 0) or config.vocab_size)
    gen = torch.Generator().manual_seed(1031)
    first, other_first, second = (torch.randint(0, vocab, (n,), generator=gen).tolist()
                                  for n in (_PROBE_LENGTHS[0], *_PROBE_LENGTHS))
    try:
        head = lm_head_of(model)
    except (NotImplementedError, ValueError):
        head = None

    def run(runner: nn.Module, before: list, *, with_logits: bool = False, leaf=None,
            padded: bool = False):
        """`second` packed after `before` through `runner` (on padded rows if `padded`):
        (its rows' float32 hidden states, (the head's logits, the model's logits) or None,
        the batch's rows of `before` and of `second`). `leaf`: a hook output for the input
        embeddings."""
        batch = probe_batch(before)
        index = int((batch.seq_index == 1).nonzero())
        rows = slice(int(batch.cu_seqlens[index]), int(batch.cu_seqlens[index + 1]))
        before_rows = slice(int(batch.cu_seqlens[1 - index]), int(batch.cu_seqlens[2 - index]))

        def on_hidden(hidden):  # inside the forward: FSDP2 has gathered the head
            hidden = hidden[rows]
            # detached: compared with float() later, in grad mode after a padded retry
            return (hidden.float(),
                    _head_logits(model, hidden.detach()).detach() if with_logits else None)

        handle = (None if leaf is None
                  else inner.get_input_embeddings().register_forward_hook(leaf))
        try:
            (hidden, predicted), output = _forward(
                runner, batch, on_hidden,
                0 if with_logits else torch.empty(0, dtype=torch.long, device=device),
                padded=padded)
        finally:
            if handle is not None:
                handle.remove()
        logits = None
        if with_logits:
            logits = output.logits.detach()
            logits = (batch.from_padded(logits) if padded
                      else logits.reshape(-1, logits.shape[-1]))
            logits = (predicted, logits[rows].float())
        return hidden, logits, (before_rows, rows)

    def probe_batch(before: list):
        (batch,) = pack([before, second], max_tokens=len(before) + len(second))
        return batch.to(device)

    embedded: list = []

    def leaf(module, args, output):
        embedded.append(output.detach().requires_grad_())
        return embedded[-1]

    def padded_instead(error: Exception, runner: nn.Module):
        """The verdict for a model whose packed forward through `runner` raised `error`, if
        it runs padded (through the same runner in the same autograd mode: an error that is
        not about packing is raised again)."""
        if isinstance(error, torch.OutOfMemoryError):
            raise error
        # e.g. Bloom and ALiBi Falcon build their position bias from a 2-D attention mask
        # and take no document mask: padded rows give them one
        _, logits, _ = run(runner, first, with_logits=head is not None, padded=True)
        return (f"the model cannot run packed documents in one row (model_type "
                f"{model_type!r}): its forward raised {type(error).__name__}: {error}.",
                _head_mismatch(inner, head, logits, model_type))

    # Only the packed forwards are tried: an error anywhere else is no reason to pad.
    attention_inputs(model, probe_batch(first))  # its refusals (the implementation) stand
    by_gradient = False
    if not _no_gradient_probe(inner):
        # the inner model: a DDP wrapper's reducer would wait for the probe's gradients
        with torch.inference_mode(False), torch.enable_grad():
            try:
                hidden, logits, rows = run(inner, first, with_logits=head is not None,
                                           leaf=leaf)
            except _UNPACKABLE as error:
                return padded_instead(error, inner)
            by_gradient = len(embedded) == 1 and hidden.requires_grad
            if by_gradient:
                detail = _leak_by_gradient(hidden, embedded[0], rows, gen)
    if not by_gradient:  # FSDP1, inference-mode parameters, or the embeddings not run once
        try:
            hidden, logits, _ = run(model, first, with_logits=head is not None)
            again, other = run(model, first)[0], run(model, other_first)[0]
        except _UNPACKABLE as error:
            return padded_instead(error, model)
        detail = _leak_by_forwards(inner, hidden.detach(), again, other)
    if not detail:
        (batch,) = pack([second], max_tokens=len(second))
        alone = _forward(model, batch.to(device), lambda hidden: hidden.float(),
                         torch.empty(0, dtype=torch.long, device=device))[0]
        detail = _differs(inner, alone, hidden.detach(), "from it run alone",
                          "; the model may not restart positions at each document")
    leak = None
    if detail:
        leak = (f"packed documents are not isolated in this model (model_type {model_type!r}): "
                f"a document's final hidden states depend on the tokens of the document "
                f"packed before it ({detail}). Some layers carry state along the packed row "
                "(state-space, convolution and linear-attention layers do), which attention "
                "masks cannot cut.")
    return leak, _head_mismatch(inner, head, logits, model_type)


def _head_mismatch(inner: nn.Module, head: LMHead | None, logits, model_type: str) -> str | None:
    """None, or how the head's reproduced logits differ from the model's own (`logits`: the
    pair from the probe's forward, None when the head was not checked)."""
    if logits is None:
        return None
    predicted, logits = logits
    error = float((predicted - logits).norm()) / max(float(logits.norm()), 1e-30)
    tolerance = _HEAD_TOLERANCE.get(getattr(inner, "dtype", None), _HALF_HEAD_TOLERANCE)
    if error <= tolerance:
        return None
    return (f"the model's logits are not its LM head's output as the fused log-probs "
            f"reproduce it (model_type {model_type!r}, softcap={head.softcap}, "
            f"logit_scale={head.logit_scale}): relative error {error:.3g} > "
            f"{tolerance:g}. The family transforms its logits in code or through a config "
            "field this engine does not read. (ALIGNFUSE_VERIFY_MODEL=0 skips the check, "
            "and the log-probs are then wrong; `final_hidden_states` needs no LM head.)")


def _no_gradient_probe(inner: nn.Module) -> bool:
    """Whether the probe must not run a backward through this model: under the legacy FSDP
    wrapper (FSDP1), whose flat parameters' hooks expect a whole training step, or with
    parameters made in inference mode, which autograd cannot save (a frozen reference
    loaded under `torch.inference_mode()`). FSDP2 (`fully_shard`) takes the probe's
    backward: tests/test_multiprocess.py's FSDP2 step, probe included, equals the
    single-process one."""
    if any(p.is_inference() for p in inner.parameters()):
        return True
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:  # torch built without distributed
        return False
    return any(isinstance(m, FullyShardedDataParallel) for m in inner.modules())


def _leak_by_gradient(hidden: torch.Tensor, embedded: torch.Tensor, rows, gen) -> str | None:
    """None, or how much the second document's states `hidden` depend on the first one's
    input embeddings: the gradient of a random projection of them, exactly 0 if isolated."""
    before_rows, own_rows = rows
    direction = torch.randn(hidden.shape, generator=gen).to(hidden.device)
    (grad,) = torch.autograd.grad((hidden * direction).sum(), embedded)
    grad = grad.reshape(-1, grad.shape[-1]).float()
    leaked, own = float(grad[before_rows].norm()), float(grad[own_rows].norm())
    if leaked == 0:
        return None
    return (f"the gradient with respect to them is {leaked / max(own, 1e-30):.3g} of the one "
            "with respect to its own; isolated, it is exactly 0")


def _leak_by_forwards(inner: nn.Module, hidden: torch.Tensor, again: torch.Tensor,
                      other: torch.Tensor) -> str | None:
    """None, or how much the second document's states change with the first one's tokens
    (`hidden` and `again`: the same first document, `other`: another one)."""
    return _differs(inner, hidden, other, "with those tokens", "",
                    noise=float((again - hidden).norm()))


def _differs(inner: nn.Module, expected: torch.Tensor, got: torch.Tensor, what: str,
             hint: str, noise: float = 0.0) -> str | None:
    """None, or how far `got` is from `expected` beyond `_NOISE_MARGIN` x `noise` plus the
    rounding floor of the model's dtype."""
    change = float((got - expected).norm())
    scale = max(float(expected.norm()), 1e-30)
    floor = _LEAK_FLOOR.get(getattr(inner, "dtype", None), _HALF_LEAK_FLOOR)
    if change <= _NOISE_MARGIN * noise + floor * scale:
        return None
    return (f"they differ by {change / scale:.3g} of their norm {what}"
            + (f"; run-to-run noise: {noise / scale:.3g}" if noise else "") + hint)


def _head_logits(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """`[n, V]` float32 logits of `hidden [n, H]` as the fused ops compute them (no
    temperature), from `lm_head_of`; called inside the forward (FSDP2 has the head)."""
    head = lm_head_of(model)
    raw = nn.functional.linear(hidden.float(), head.weight.float(),
                               None if head.bias is None else head.bias.float())
    if head.softcap is not None:
        raw = apply_softcap(raw, head.softcap)
    return raw * head.logit_scale


def final_hidden_states(model: nn.Module, packed) -> torch.Tensor:
    """`[N, H]` final hidden states of the packed tokens, documents isolated (for value and
    reward heads). Use `run_decoder` instead when the head's parameters are sharded by FSDP2
    with the root module."""
    return run_decoder(model, packed, lambda hidden: hidden)


def token_logprobs(model: nn.Module, packed, *, temperature: float = 1.0,
                   return_entropy: bool = False):
    """Per-token log-probs of `packed.targets` under a Hugging Face causal LM.

    model: a causal LM (`*ForCausalLM`), possibly wrapped in DDP, FSDP2 or PEFT.
    packed: a `PackedBatch` (`input_ids [N]`, `position_ids [N]`, `cu_seqlens [S+1]`,
        `max_seqlen`, `targets [N]` with -100 where no token is predicted).
    Returns `logps [N]` float32 (0 where the target is -100), or `(logps, entropy)` with
    `return_entropy=True`. Documents are isolated and no `[N, V]` tensor is built.
    `model` may also be a `lora.BaseReference` (a PEFT policy's base, adapters off).
    """
    if isinstance(model, BaseReference):
        with model.active() as policy:
            return token_logprobs(policy, packed, temperature=temperature,
                                  return_entropy=return_entropy)
    _check_packed(packed)
    lm_head_of(model).op_kwargs(temperature)  # refuse an unsupported head before running

    def gather(hidden: torch.Tensor):
        head = lm_head_of(model)  # read inside the forward: FSDP2 has gathered it
        return linear_logprobs(hidden, head.weight, packed.targets.reshape(-1),
                               **head.op_kwargs(temperature), ignore_index=IGNORE_INDEX,
                               return_entropy=return_entropy)

    return run_decoder(model, packed, gather, lm_head=True)


def sequence_logprobs(model: nn.Module, packed, *, temperature: float = 1.0) -> torch.Tensor:
    """`[S]` float32: the summed log-prob of each packed sequence's target tokens."""
    return segment_sum(token_logprobs(model, packed, temperature=temperature), packed.cu_seqlens)


@torch.no_grad()
def precompute_reference_logps(model: nn.Module, batches: Iterable, *,
                               temperature: float = 1.0) -> torch.Tensor:
    """Summed log-prob of every sequence under a frozen reference model, computed once.

    model: the reference, or a `lora.BaseReference` (a PEFT policy's base).
    batches: the `PackedBatch`es of a whole dataset (each sequence exactly once).
    Returns `[num_sequences]` float32 on the CPU, indexed by each sequence's original index
    (`packed.seq_index`), to store with the dataset (`torch.save`) and pass to `DPO`/`KTO`
    as `reference_logps=` instead of keeping a second model in memory during training.
    """
    owner = model.model if isinstance(model, BaseReference) else model
    was_training = unwrap_model(owner).training
    owner.eval()
    device = next(owner.parameters()).device
    found: dict[int, float] = {}
    try:
        for packed in batches:
            if packed.input_ids.device != device:
                packed = packed.to(device)
            logps = sequence_logprobs(model, packed, temperature=temperature).float().cpu()
            for index, value in zip(packed.seq_index.tolist(), logps.tolist()):
                if index in found:
                    raise ValueError(f"batches hold sequence {index} more than once")
                found[index] = value
    finally:
        owner.train(was_training)
    if not found:
        raise ValueError("batches is empty: no sequence to compute reference log-probs for")
    size = max(found) + 1
    missing = size - len(found)
    if missing:
        raise ValueError(f"batches must hold every sequence 0..{size - 1} exactly once; "
                         f"{missing} are missing")
    out = torch.empty(size, dtype=torch.float32)
    out[list(found)] = torch.tensor(list(found.values()), dtype=torch.float32)
    return out


def _check_packed(packed) -> None:
    for field in ("input_ids", "position_ids", "cu_seqlens", "targets"):
        if not isinstance(getattr(packed, field, None), torch.Tensor):
            raise TypeError(f"packed must be a PackedBatch with a tensor field {field!r}, "
                            f"got {type(packed).__name__} without it")
    n = packed.input_ids.numel()
    for field in ("position_ids", "targets"):
        if getattr(packed, field).numel() != n:
            raise ValueError(f"packed.{field} must have one entry per token ({n}), "
                             f"got {getattr(packed, field).numel()}")
    if int(packed.cu_seqlens[-1]) != n:
        raise ValueError(f"packed.cu_seqlens must end at the number of tokens {n}, "
                         f"got {int(packed.cu_seqlens[-1])}")
