"""The embedded default: a tiny causal LM and a character tokenizer, built in code.

No downloads: the tokenizer's vocabulary is written here and the model comes from a config.
Shapes are chosen so that the vLLM CPU build accepts the model (NOTES.md: its attention
backend refuses head_dim=16; hidden 128 with 2 heads of 64 and 1 KV head works).
"""

from __future__ import annotations

import string

import torch

# Printable ASCII characters the built-in tasks use, plus chat markers.
_CHARS = string.digits + string.ascii_letters + " +-*/=?.,:;!'\"()[]<>#_\n"
SPECIAL_TOKENS = ["<pad>", "<bos>", "<eos>", "<unk>", "<|user|>", "<|assistant|>"]

# A minimal chat template: one user turn, then the assistant's answer.
CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'user' %}<|user|>{{ m['content'] }}"
    "{% elif m['role'] == 'assistant' %}<|assistant|>{{ m['content'] }}<eos>{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def tiny_tokenizer():
    """A character-level `PreTrainedTokenizerFast` with a chat template (vocab of ~90)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in _CHARS:
        vocab.setdefault(ch, len(vocab))
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    # Every character is its own token; special tokens are matched whole before splitting.
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()  # characters join back without spaces
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
        unk_token="<unk>", additional_special_tokens=["<|user|>", "<|assistant|>"],
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def tiny_config(family: str = "llama", vocab_size: int = 128, *, hidden_size: int = 128,
                num_layers: int = 2, tie_word_embeddings: bool = False, **overrides):
    """A tiny config of a real model family (`llama` or `qwen2`)."""
    from transformers import LlamaConfig, Qwen2Config

    common = dict(vocab_size=vocab_size, hidden_size=hidden_size,
                  intermediate_size=2 * hidden_size, num_hidden_layers=num_layers,
                  num_attention_heads=2, num_key_value_heads=1, head_dim=hidden_size // 2,
                  max_position_embeddings=512, tie_word_embeddings=tie_word_embeddings,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0)
    common.update(overrides)
    if family == "llama":
        return LlamaConfig(**common)
    if family == "qwen2":
        return Qwen2Config(**common)
    raise ValueError(f"family must be 'llama' or 'qwen2', got {family!r}")


def tiny_model(family: str = "llama", vocab_size: int = 128, *, seed: int = 0,
               dtype: torch.dtype = torch.float32, **config_overrides):
    """A randomly initialised tiny causal LM (deterministic for a given seed)."""
    from transformers import AutoModelForCausalLM

    config = tiny_config(family, vocab_size, **config_overrides)
    config._attn_implementation = "sdpa"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model
