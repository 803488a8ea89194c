"""The packed model forward: packed == unpacked per token, documents isolated, no [N, V].

The unpacked reference runs each sequence alone through the model's own forward (its logits,
log-softmax in float64), so it shares no code with the packed path.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import transformers

from alignfuse.engine import forward
from alignfuse.engine.algorithms import DPO, KTO, ORPO, SFT, RewardModel, SimPO, kto_sequences
from alignfuse.engine.forward import precompute_reference_logps, token_logprobs
from alignfuse.engine.packing import pack
from alignfuse.engine.tiny import tiny_model
from alignfuse.kernels.preference import dpo_loss, kto_kl, kto_loss, orpo_loss, simpo_loss
from alignfuse.kernels.reward_model import listwise_rm_loss, pairwise_rm_loss, pointwise_rm_loss
from helpers import (HYBRIDS, TRANSFORMED_HEADS, assert_rel_close, family_model,
                     hybrid_model, preference_pairs, transformed_head_model)

VOCAB = 97
FAMILIES = ("llama", "qwen2")


# The machine is shared: two oversubscribed threads were 5-15x slower than one here.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def random_sequences(gen: torch.Generator, lengths) -> list[list[int]]:
    return [torch.randint(6, VOCAB, (n,), generator=gen).tolist() for n in lengths]


def unpacked_token_logps(model, seq: list[int], prompt_len: int = 0) -> torch.Tensor:
    """`[L]` log-prob of each next token of one sequence run ALONE, 0 where not predicted."""
    ids = torch.tensor(seq)[None]
    logits = model(input_ids=ids).logits[0].double()
    logp = logits[:-1].log_softmax(-1).gather(1, ids[0, 1:, None])[:, 0]
    predicted = torch.arange(1, len(seq)) >= prompt_len  # target j+1 is learned
    return torch.cat([torch.where(predicted, logp, 0.0), logp.new_zeros(1)])


def unpacked_seq_logps(model, seqs, prompt_lens) -> torch.Tensor:
    return torch.stack([unpacked_token_logps(model, s, p).sum() for s, p in zip(seqs, prompt_lens)])


@pytest.fixture(params=FAMILIES)
def model(request):
    return tiny_model(request.param, VOCAB, seed=1).eval()


def test_token_logprobs_packed_equals_unpacked(model):
    gen = torch.Generator().manual_seed(2)
    lengths = [7, 13, 3, 21, 11]
    prompts = [2, 5, 1, 9, 4]
    seqs = random_sequences(gen, lengths)
    (batch,) = pack(seqs, max_tokens=sum(lengths), prompt_lengths=prompts)
    logps = token_logprobs(model, batch)
    assert logps.dtype == torch.float32 and logps.shape == (sum(lengths),)
    expected = torch.cat([unpacked_token_logps(model, seqs[i], prompts[i])
                          for i in batch.seq_index.tolist()])
    assert_rel_close(logps, expected, 1e-5, "packed vs unpacked token logps")
    assert float((logps.detach().double() - expected).abs().max()) < 1e-4


def test_gradients_packed_equal_unpacked(model):
    gen = torch.Generator().manual_seed(3)
    seqs = random_sequences(gen, [9, 5, 12])
    (batch,) = pack(seqs, max_tokens=26)
    token_logprobs(model, batch).sum().backward()
    packed_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    sum(unpacked_token_logps(model, s).sum() for s in seqs).backward()
    for name, p in model.named_parameters():
        assert_rel_close(packed_grads[name], p.grad, 1e-5, f"grad of {name}")


def test_entropy_packed_equals_unpacked(model):
    gen = torch.Generator().manual_seed(4)
    seqs = random_sequences(gen, [6, 10])
    (batch,) = pack(seqs, max_tokens=16)
    logps, entropy = token_logprobs(model, batch, temperature=0.7, return_entropy=True)
    parts = []
    for i in batch.seq_index.tolist():
        logits = model(input_ids=torch.tensor(seqs[i])[None]).logits[0].double() / 0.7
        ent = -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1)
        ent[-1] = 0.0  # the last token has no target
        parts.append(ent)
    assert_rel_close(entropy, torch.cat(parts), 1e-5, "entropy")


def test_isolation_trap_is_real_and_avoided(model):
    """Without the document mask, packed documents attend to each other (NOTES.md trap):
    the unmasked packed forward must differ, and `token_logprobs` must not."""
    gen = torch.Generator().manual_seed(5)
    seqs = random_sequences(gen, [12, 12])
    (batch,) = pack(seqs, max_tokens=24)
    expected = torch.cat([unpacked_token_logps(model, seqs[i]) for i in batch.seq_index.tolist()])
    # The trap: restarting position_ids alone, no mask.
    logits = model(input_ids=batch.input_ids[None], position_ids=batch.position_ids[None]).logits[0]
    valid = batch.targets != -100
    naive = torch.where(valid, logits.double().log_softmax(-1).gather(
        1, batch.targets.clamp(min=0)[:, None])[:, 0], 0.0)
    second = slice(12, 24)
    assert float((naive[second] - expected[second]).abs().max()) > 1e-3
    # Avoided: the same forward path with the mask equals the unpacked run.
    assert_rel_close(token_logprobs(model, batch), expected, 1e-5, "isolated")


def test_isolation_is_what_makes_it_correct(model, monkeypatch):
    """Replacing the document mask by a plain causal mask over the whole row (isolation
    removed) breaks packed == unpacked, so the tests above catch such a regression.

    (transformers 5.19 isolates documents by itself from restarting position_ids only when
    no mask AND no cache are passed; the plain call above uses the default cache and leaks.
    The engine does not rely on that heuristic: it always passes the document mask.)
    """
    gen = torch.Generator().manual_seed(6)
    seqs = random_sequences(gen, [10, 10])
    (batch,) = pack(seqs, max_tokens=20)
    expected = torch.cat([unpacked_token_logps(model, seqs[i]) for i in batch.seq_index.tolist()])
    assert_rel_close(token_logprobs(model, batch), expected, 1e-5, "isolated")

    def causal_only(cu_seqlens, window=None):
        n = int(cu_seqlens[-1])
        return torch.ones(n, n, dtype=torch.bool).tril()[None, None]

    monkeypatch.setattr(forward, "document_causal_mask", causal_only)
    broken = token_logprobs(model, batch).detach()
    assert float((broken.double() - expected).abs().max()) > 1e-3


def test_flex_attention_document_mask(model):
    """The CUDA fallback path (flex_attention + document BlockMask), checked forward-only on
    CPU, where flex_attention has no backward."""
    gen = torch.Generator().manual_seed(12)
    seqs = random_sequences(gen, [10, 7, 15])
    (batch,) = pack(seqs, max_tokens=32)
    logits, expected = flex_and_alone(model, seqs, batch,
                                      forward.document_block_mask(batch.cu_seqlens))
    assert_rel_close(logits, expected, 1e-5, "flex document mask")


def flex_and_alone(model, seqs, batch, mask):
    """(the model's logits on the packed batch under flex_attention with `mask`, the logits
    of each document run alone with the model's own attention), forward only."""
    with torch.no_grad():
        model.set_attn_implementation("flex_attention")
        try:
            logits = model(input_ids=batch.input_ids[None], position_ids=batch.position_ids[None],
                           attention_mask=mask).logits[0]
        finally:
            model.set_attn_implementation("sdpa")
        expected = torch.cat([model(input_ids=torch.tensor(seqs[i])[None]).logits[0]
                              for i in batch.seq_index.tolist()])
    return logits, expected


def test_tied_embeddings():
    model = tiny_model("qwen2", VOCAB, seed=2, tie_word_embeddings=True)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    gen = torch.Generator().manual_seed(7)
    seqs = random_sequences(gen, [8, 6])
    (batch,) = pack(seqs, max_tokens=14)
    logps = token_logprobs(model, batch)
    expected = torch.cat([unpacked_token_logps(model, seqs[i]) for i in batch.seq_index.tolist()])
    assert_rel_close(logps, expected, 1e-5, "tied")
    logps.sum().backward()
    assert model.get_input_embeddings().weight.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------
# Heads whose logits the model transforms after the matmul: Gemma-2's final soft-cap
# (c * tanh(raw / c)) and Cohere's logit_scale (raw * s). The reference is the model's own
# `logits` (transformers applies the transform itself), so it shares no code with the engine.

HEAD_VOCAB = 101


def head_ids(gen, lengths):
    return [torch.randint(6, HEAD_VOCAB, (n,), generator=gen).tolist() for n in lengths]


def model_logits(model, seq) -> torch.Tensor:
    """`[L, V]` float64: the model's own logits of one sequence run alone."""
    return model(input_ids=torch.tensor(seq)[None]).logits[0].double()


def untransformed_logps(model, seq, temperature) -> torch.Tensor:
    """`[L]` what a plain `hidden @ weight.T` head would give (no cap, no scale): the answer
    the transform must change."""
    ids = torch.tensor(seq)
    hidden = model.get_decoder()(input_ids=ids[None]).last_hidden_state[0].double()
    raw = hidden @ model.get_output_embeddings().weight.double().T / temperature
    logp = raw[:-1].log_softmax(-1).gather(1, ids[1:, None])[:, 0]
    return torch.cat([logp, logp.new_zeros(1)])


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("family", sorted(TRANSFORMED_HEADS))
def test_transformed_head_logprobs_and_entropy_equal_model_logits(family, attn):
    model = transformed_head_model(family, attn)
    gen = torch.Generator().manual_seed(21)
    lengths, prompts = [9, 4, 13, 7], [3, 1, 5, 2]
    seqs = head_ids(gen, lengths)
    (batch,) = pack(seqs, max_tokens=sum(lengths), prompt_lengths=prompts)
    T = 0.7
    with torch.no_grad():
        logps, entropy = token_logprobs(model, batch, temperature=T, return_entropy=True)
        exp_logps, exp_ent, plain = [], [], []
        for i in batch.seq_index.tolist():
            z = model_logits(model, seqs[i]) / T
            ids = torch.tensor(seqs[i])
            lp = z[:-1].log_softmax(-1).gather(1, ids[1:, None])[:, 0]
            learned = torch.arange(1, len(ids)) >= prompts[i]
            exp_logps.append(torch.cat([torch.where(learned, lp, 0.0), lp.new_zeros(1)]))
            ent = -(z[:-1].softmax(-1) * z[:-1].log_softmax(-1)).sum(-1)
            # 0 where no target is learned (prompt tokens, the last token)
            exp_ent.append(torch.cat([torch.where(learned, ent, 0.0), ent.new_zeros(1)]))
            pl = untransformed_logps(model, seqs[i], T)
            plain.append(torch.cat([torch.where(learned, pl[:-1], 0.0), pl.new_zeros(1)]))
    expected = torch.cat(exp_logps)
    assert_rel_close(logps, expected, 1e-5, f"{family} {attn} token logps")
    assert_rel_close(entropy, torch.cat(exp_ent), 1e-5, f"{family} {attn} entropy")
    # The transform bites: a plain linear head is far from the model's answer.
    assert float((torch.cat(plain) - expected).norm() / expected.norm()) > 0.3
    head = forward.lm_head_of(model)
    assert (head.softcap, head.logit_scale) == TRANSFORMED_HEADS[family]


@pytest.mark.parametrize("family", sorted(TRANSFORMED_HEADS))
def test_transformed_head_gradients_equal_model_logits(family):
    model = transformed_head_model(family, "eager", seed=2)
    gen = torch.Generator().manual_seed(22)
    seqs = head_ids(gen, [11, 6, 9])
    (batch,) = pack(seqs, max_tokens=26)
    T = 0.9
    weights = torch.rand(batch.num_tokens, generator=gen, dtype=torch.float64) + 0.5
    (token_logprobs(model, batch, temperature=T).double() * weights).sum().backward()
    packed_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    total = 0.0
    parts = weights.split(batch.seq_lengths.tolist())
    for w, i in zip(parts, batch.seq_index.tolist()):
        ids = torch.tensor(seqs[i])
        lp = (model_logits(model, seqs[i])[:-1] / T).log_softmax(-1).gather(1, ids[1:, None])
        total = total + (lp[:, 0] * w[:-1]).sum()
    total.backward()
    names = [n for n, _ in model.named_parameters()]
    assert "lm_head.weight" not in names  # tied: the head's gradient lands on the embedding
    for name, p in model.named_parameters():
        assert_rel_close(packed_grads[name], p.grad, 1e-5, f"{family} grad of {name}")


def sliding_model(family: str, attn: str, window: int):
    """A tiny model with a sliding window of `window` tokens: Gemma-2 (local and global
    layers, `layer_types`) or Mistral (every layer slides)."""
    if family == "gemma2":
        return transformed_head_model("gemma2", attn, sliding_window=window)
    from transformers import MistralConfig, MistralForCausalLM

    cfg = MistralConfig(vocab_size=HEAD_VOCAB, hidden_size=48, intermediate_size=80,
                        num_hidden_layers=2, num_attention_heads=3, num_key_value_heads=1,
                        head_dim=16, sliding_window=window, bos_token_id=1, eos_token_id=2,
                        pad_token_id=0)
    cfg._attn_implementation = attn
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        return MistralForCausalLM(cfg).eval()


@pytest.mark.parametrize("family, attn", [("gemma2", "sdpa"), ("gemma2", "eager"),
                                          ("mistral", "sdpa")])
def test_documents_longer_than_the_sliding_window(family, attn):
    """Packed documents longer than the model's sliding window (8 tokens here) give the
    log-probs of each document run alone, where transformers applies the window itself; the
    same batch without the window in the packed mask would not."""
    model = sliding_model(family, attn, window=8)
    gen = torch.Generator().manual_seed(23)
    seqs = head_ids(gen, [8, 5, 13, 19])
    (batch,) = pack(seqs, max_tokens=45)
    with torch.no_grad():
        logps = token_logprobs(model, batch)
        expected = []
        for i in batch.seq_index.tolist():
            ids = torch.tensor(seqs[i])
            lp = model_logits(model, seqs[i])[:-1].log_softmax(-1).gather(1, ids[1:, None])[:, 0]
            expected.append(torch.cat([lp, lp.new_zeros(1)]))
        expected = torch.cat(expected)
        assert_rel_close(logps, expected, 1e-5, f"{family} {attn} past the window")
        # the window matters: a document mask without it is far off on the long documents
        model.config.sliding_window = 1000
        unwindowed = token_logprobs(model, batch)
    assert float((unwindowed.double() - expected).norm() / expected.norm()) > 1e-3


def test_windowed_flex_masks_match_the_model_run_alone():
    """The CUDA fallback's masks (flex_attention BlockMasks, one per layer type) for a
    document past Gemma-2's sliding window, forward-only on CPU. Static shapes: after an
    earlier compile of flex_attention, dynamo would recompile with dynamic sizes, and
    Inductor's CPU flex template then fails to build (torch 2.13: 'cur_qSplitSize8 was
    not declared'); the CUDA path uses Triton templates instead."""
    import torch._dynamo

    torch._dynamo.reset()
    model = sliding_model("gemma2", "sdpa", window=8)
    gen = torch.Generator().manual_seed(24)
    seqs = head_ids(gen, [13, 6, 11])
    (batch,) = pack(seqs, max_tokens=30)
    masks = forward.document_masks(model.config, batch,
                                   lambda w: forward.document_block_mask(batch.cu_seqlens, w))
    assert set(masks) == {"full_attention", "sliding_attention"}
    # (config.patch, not monkeypatch: undoing a monkeypatch deletes the config entry, and
    # every later torch.compile, vLLM's included, then fails)
    with torch._dynamo.config.patch(automatic_dynamic_shapes=False):
        logits, expected = flex_and_alone(model, seqs, batch, masks)
    assert_rel_close(logits, expected, 1e-5, "flex windowed masks")


def test_unknown_layer_types_are_refused():
    model = sliding_model("gemma2", "sdpa", window=4)
    model.config.layer_types = ["sliding_attention", "chunked_attention"]
    (batch,) = pack([[7] * 9], max_tokens=9)
    with pytest.raises(NotImplementedError, match=r"layer_types include \['chunked_attention'\]"):
        token_logprobs(model, batch)


def test_plain_linear_head_has_no_transform(model):
    head = forward.lm_head_of(model)
    assert head.softcap is None and head.logit_scale == 1.0
    assert head.weight is model.get_output_embeddings().weight
    assert head.op_kwargs(0.8) == {"bias": None, "softcap": None, "temperature": 0.8}


@pytest.mark.parametrize("field,value,error", [
    ("final_logit_softcapping", 0.0, ValueError),  # transformers would divide by it
    ("final_logit_softcapping", -3.0, ValueError),
    ("final_logit_softcapping", float("inf"), ValueError),
    ("logit_scale", 0.0, ValueError),
    ("logit_scale", -0.5, ValueError),
    ("logit_scale", float("nan"), ValueError),
    ("logit_scale", 0.25, NotImplementedError),  # with a softcap: the order would matter
    # other families' scaling fields: Granite's divides only for model_type granite*, and
    # Falcon-H1's multiplier and MiniCPM's hidden-state scaling are not taken over
    ("logits_scaling", 8.0, NotImplementedError),
    ("lm_head_multiplier", 2.0, NotImplementedError),
    ("dim_model_base", 256, NotImplementedError),
])
def test_unsupported_head_transforms_are_refused(field, value, error):
    model = transformed_head_model("gemma2")
    object.__setattr__(model.config, field, value)
    (batch,) = pack([[6, 7, 8, 9, 10]], max_tokens=5)
    with pytest.raises(error, match=field):
        token_logprobs(model, batch)


# ---------------------------------------------------------------------------------------
# The model check (`forward.verify_packed_model`): what no config field tells. Tiny hybrids
# with layers that carry state along the row leak one packed document into the next (in
# float64 as much as in float32: not rounding); heads transformed in code are caught too.

@pytest.fixture(params=["gradient", "forwards"])
def leak_check(request, monkeypatch):
    """Which isolation check runs: by gradient, or by forwards (FSDP1, inference mode)."""
    monkeypatch.setattr(forward, "_no_gradient_probe", lambda inner: request.param == "forwards")
    return request.param


def assert_equal_to_each_alone(model, seqs, batch, logps):
    """`logps` (token_logprobs of `batch`) and their gradients equal each document run alone."""
    order = batch.seq_index.tolist()
    with torch.no_grad():
        expected = torch.cat([unpacked_token_logps(model, seqs[i]) for i in order])
    assert_rel_close(logps, expected, 1e-5, "padded vs alone")
    model.zero_grad()
    logps.sum().backward()
    padded_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert padded_grads
    model.zero_grad()
    sum(unpacked_token_logps(model, seqs[i]).sum() for i in order).backward()
    for name, p in model.named_parameters():
        if p.grad is not None:
            assert_rel_close(padded_grads[name], p.grad, 1e-5, f"grad of {name}")


@pytest.mark.parametrize("model_type", sorted(HYBRIDS))
def test_models_whose_layers_carry_state_across_documents_run_padded(model_type, leak_check):
    """Packed, these models' second document depends on the first one's tokens (shown with
    the check off: packed != each document alone). The check finds it, says so once, and
    the model runs on right-padded rows instead: log-probs, gradients and hidden states
    equal each document run alone."""
    model = hybrid_model(model_type)
    gen = torch.Generator().manual_seed(13)
    seqs = random_sequences(gen, [7, 9, 4])
    (batch,) = pack(seqs, max_tokens=20)
    order = batch.seq_index.tolist()
    with torch.no_grad():
        expected = torch.cat([unpacked_token_logps(model, seqs[i]) for i in order])
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("ALIGNFUSE_VERIFY_MODEL", "0")
            leaked = token_logprobs(model, batch).double()
    assert float((leaked - expected).abs().max()) > 1e-5
    with pytest.warns(UserWarning, match=rf"not isolated .*'{model_type}'.*right-padded rows") \
            as record:
        logps = token_logprobs(model, batch)
    # attributed to the caller's line, not to the engine's
    assert {w.filename for w in record if "not isolated" in str(w.message)} == {__file__}
    with pytest.raises(forward.ModelCheckError, match="runs such a model on right-padded rows"):
        forward.verify_packed_model(model, "cpu")
    assert_equal_to_each_alone(model, seqs, batch, logps)
    with torch.no_grad():
        hidden = forward.final_hidden_states(model, batch)
        alone = torch.cat([model.get_decoder()(input_ids=torch.tensor(seqs[i])[None])
                           .last_hidden_state[0] for i in order])
    assert_rel_close(hidden, alone, 1e-5, "hidden states")


def test_a_model_made_in_inference_mode_is_checked_by_forwards_and_runs_packed():
    """Parameters made under `torch.inference_mode()` (a frozen reference loaded so) cannot
    be saved for a backward: the check runs forwards instead, and packing stays."""
    with torch.inference_mode():
        model = tiny_model("llama", VOCAB, seed=1).eval()
    assert all(p.is_inference() for p in model.parameters())
    seqs = random_sequences(torch.Generator().manual_seed(17), [6, 9, 4])
    (batch,) = pack(seqs, max_tokens=19)
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("error")  # no padded-rows warning
        logps = token_logprobs(model, batch)
        expected = torch.cat([unpacked_token_logps(model, seqs[i])
                              for i in batch.seq_index.tolist()])
    assert not forward.runs_padded(model)
    assert_rel_close(logps, expected, 1e-5, "inference-mode model, packed")


def test_warnings_point_at_the_callers_line_through_torch_decorators():
    """`precompute_reference_logps` is wrapped in `torch.no_grad()`: the warning still names
    the line that called it."""
    model = hybrid_model("lfm2")
    (batch,) = pack(random_sequences(torch.Generator().manual_seed(18), [5, 7]), max_tokens=12)
    with pytest.warns(UserWarning, match="not isolated") as record:
        precompute_reference_logps(model, [batch])
    assert {w.filename for w in record if "not isolated" in str(w.message)} == {__file__}


def test_runs_padded_names_the_models_that_run_on_padded_rows():
    """`runs_padded` is the check's verdict, for packing with `pack(..., padded=True)`."""
    assert not forward.runs_padded(tiny_model("llama", VOCAB, seed=1))
    with pytest.warns(UserWarning, match="not isolated"):
        assert forward.runs_padded(hybrid_model("lfm2"))
    fields, attention = UNPACKABLE["bloom"]
    with pytest.warns(UserWarning, match="cannot run packed documents"):
        assert forward.runs_padded(family_model("bloom", fields, attention=attention), "cpu")


def test_a_deep_copy_keeps_the_verdict():
    """The reference model and PPO's critic are deep copies of the policy: they keep its
    verdict (the architecture's, not the weights'), so the check neither probes nor warns
    again; another model of the same architecture is still probed."""
    model = hybrid_model("lfm2")
    with pytest.warns(UserWarning, match="not isolated"):
        assert forward.runs_padded(model)
    copied = copy.deepcopy(model)
    forwards = []
    copied.register_forward_hook(lambda *args: forwards.append(1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert forward.runs_padded(copied)
    assert not forwards
    with pytest.warns(UserWarning, match="not isolated"):
        assert forward.runs_padded(hybrid_model("lfm2", seed=4))


UNPACKABLE = {  # model_type: (fields, attention); ALiBi built from a 2-D attention mask
    "bloom": (dict(n_layer=2, n_head=4), "eager"),
    "falcon": (dict(alibi=True, new_decoder_architecture=False, multi_query=True,
                    parallel_attn=True), "sdpa"),
}


@pytest.mark.parametrize("model_type", sorted(UNPACKABLE))
def test_models_that_take_no_document_mask_run_padded(model_type, leak_check):
    """Bloom and ALiBi Falcon build their position bias from a 2-D attention mask, so they
    cannot take the packed row's document mask (their forward raises, shown with the check
    off). The check says so once, and they run on right-padded rows, exactly."""
    fields, attention = UNPACKABLE[model_type]
    model = family_model(model_type, fields, attention=attention)
    seqs = random_sequences(torch.Generator().manual_seed(15), [7, 9, 4])
    (batch,) = pack(seqs, max_tokens=20)
    with pytest.MonkeyPatch.context() as patch, pytest.raises(ValueError):
        patch.setenv("ALIGNFUSE_VERIFY_MODEL", "0")
        token_logprobs(model, batch)
    with pytest.warns(UserWarning, match=rf"cannot run packed documents in one row .*"
                                         rf"'{model_type}'.*ValueError.*right-padded rows"):
        logps = token_logprobs(model, batch)
    with pytest.raises(forward.ModelCheckError, match="cannot run packed documents"):
        forward.verify_packed_model(model, "cpu")
    assert_equal_to_each_alone(model, seqs, batch, logps)
    (one,) = pack(seqs[1:2], max_tokens=20)  # one document runs padded too (its 2-D mask)
    assert_equal_to_each_alone(model, seqs[1:2], one, token_logprobs(model, one))


class FailingLlama(transformers.LlamaForCausalLM):
    """A model whose forward raises `error` on every call, packed or padded."""

    error: Exception = ValueError("broken on purpose")
    calls = 0

    def forward(self, *args, **kwargs):
        type(self).calls += 1
        raise self.error


@pytest.mark.parametrize("error", [ValueError("broken on purpose"),
                                   torch.OutOfMemoryError("out of memory on purpose")])
def test_an_error_that_padding_does_not_cure_reaches_the_caller(error, monkeypatch):
    """The padded retry is no place to hide errors: one that the padded forward raises too
    reaches the caller, and an out-of-memory error is not retried at all."""
    model = tiny_model("llama", VOCAB, seed=1)
    model.__class__ = FailingLlama
    monkeypatch.setattr(FailingLlama, "error", error)
    monkeypatch.setattr(FailingLlama, "calls", 0)
    (batch,) = pack(random_sequences(torch.Generator().manual_seed(16), [5, 6]), max_tokens=11)
    with pytest.raises(type(error), match="on purpose"):
        token_logprobs(model, batch)
    assert FailingLlama.calls == (1 if isinstance(error, torch.OutOfMemoryError) else 2)


MIXTURES = {"qwen3_moe": dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                              head_dim=16),
            "mixtral": dict(num_local_experts=8, num_experts_per_tok=2)}


@pytest.mark.parametrize("model_type", sorted(MIXTURES))
def test_mixtures_of_experts_pass_the_check(model_type, leak_check):
    """In a mixture of experts the first document's routing changes the rounding of the
    second one's rows (the experts' batch sizes change), not their value: the gradient check
    sees exactly 0, the forward check allows the rounding, and packed equals each document
    alone."""
    model = family_model(model_type, MIXTURES[model_type], layers=3, seed=5).eval()
    seqs = random_sequences(torch.Generator().manual_seed(14), [8, 11, 5])
    (batch,) = pack(seqs, max_tokens=24)
    with torch.no_grad():
        expected = torch.cat([unpacked_token_logps(model, seqs[i])
                              for i in batch.seq_index.tolist()])
        assert_rel_close(token_logprobs(model, batch), expected, 1e-5, model_type)


class HalvedLogitsLlama(transformers.LlamaForCausalLM):
    """A family that transforms its logits in code, with no config field to read."""

    def forward(self, *args, **kwargs):
        output = super().forward(*args, **kwargs)
        output.logits = output.logits * 0.5
        return output


def test_head_transformed_in_code_is_refused():
    config = tiny_model("llama", VOCAB).config
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(4)
        model = HalvedLogitsLlama(config).eval()
    (batch,) = pack([[6, 7, 8, 9, 10, 11]], max_tokens=6)
    with pytest.raises(forward.ModelCheckError, match="logits are not its LM head's output"):
        token_logprobs(model, batch)
    # the hidden states alone (reward and value heads) do not depend on the LM head
    assert forward.final_hidden_states(model, batch).shape == (6, config.hidden_size)


def test_head_field_the_engine_did_not_read_is_caught(monkeypatch):
    """Without its entry in the table of scaling fields, Cohere's logit_scale would be
    silently dropped; the check compares with the model's own logits and refuses."""
    model = transformed_head_model("cohere")
    monkeypatch.setattr(forward, "_LOGIT_SCALES", ())
    (batch,) = pack([[6, 7, 8, 9, 10]], max_tokens=5)
    with pytest.raises(forward.ModelCheckError, match=r"'cohere'.*logit_scale=1\.0"):
        token_logprobs(model, batch)


@pytest.mark.parametrize("by, probes", [("gradient", 2), ("forwards", 4)])
def test_model_check_runs_once_and_leaves_the_model_as_it_was(model, monkeypatch, by, probes):
    """The probe's forwards at the first call only (one with a backward and the document
    alone, or four under FSDP1); the train/eval mode of every module, the parameters' gradients and
    the global RNG (which a resumed run replays) are untouched."""
    monkeypatch.setattr(forward, "_no_gradient_probe", lambda inner: by == "forwards")
    model.train()
    model.model.layers[0].eval()
    modes = [m.training for m in model.modules()]
    forwards = []
    model.get_decoder().register_forward_hook(lambda *args: forwards.append(1))
    (batch,) = pack([[6, 7, 8, 9, 10], [11, 12, 13]], max_tokens=8)
    rng = torch.get_rng_state()
    token_logprobs(model, batch)
    assert torch.equal(torch.get_rng_state(), rng)  # no dropout: the tiny model has none
    assert len(forwards) == probes + 1 and [m.training for m in model.modules()] == modes
    assert all(p.grad is None for p in model.parameters())
    token_logprobs(model, batch)
    forward.final_hidden_states(model, batch)  # the LM head check covers the plain one
    assert len(forwards) == probes + 3


def test_leak_found_in_inference_mode_too():
    """A first call in inference mode still runs the gradient check (its verdict is kept for
    training), so a bf16 hybrid's leak, under the forward check's half-precision floor, is
    found."""
    model = hybrid_model("lfm2").to(torch.bfloat16)
    seqs = random_sequences(torch.Generator().manual_seed(15), [7, 9])
    (batch,) = pack(seqs, max_tokens=16)
    with torch.inference_mode(), pytest.warns(UserWarning, match="not isolated .*'lfm2'"):
        token_logprobs(model, batch)
    with pytest.raises(forward.ModelCheckError, match="gradient with respect to them"):
        forward.verify_packed_model(model, "cpu")


class AbsolutePositionsGPT2(transformers.GPT2LMHeadModel):
    """Learned absolute positions that ignore the packed `position_ids` (counted along the
    row instead): no token of the first document leaks, its length does."""

    def forward(self, *args, position_ids=None, **kwargs):
        return super().forward(*args, **kwargs)


def test_positions_that_do_not_restart_are_found_and_run_padded():
    config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2,
                                     n_positions=64, attn_implementation="sdpa")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(6)
        model = AbsolutePositionsGPT2(config).eval()
    seqs = random_sequences(torch.Generator().manual_seed(16), [7, 9, 5])
    (batch,) = pack(seqs, max_tokens=21)
    with pytest.warns(UserWarning, match="from it run alone; the model may not restart"):
        logps = token_logprobs(model, batch)
    with torch.no_grad():
        expected = torch.cat([unpacked_token_logps(model, seqs[i])
                              for i in batch.seq_index.tolist()])
    assert_rel_close(logps, expected, 1e-5, "padded vs alone")


def test_padding_cost_is_warned_about():
    """Padded rows cost documents x the longest: one long document among short ones (4 x 12
    slots for 15 tokens) is worth a warning; close lengths are not."""
    model = hybrid_model("lfm2")
    with pytest.warns(UserWarning, match="right-padded rows"):  # the check, once
        token_logprobs(model, pack([[6] * 5, [7] * 5], max_tokens=10)[0])
    with pytest.warns(UserWarning, match="more than twice the batch's tokens"):
        token_logprobs(model, pack([list(range(6, 18)), [6], [7], [8]], max_tokens=15)[0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        token_logprobs(model, pack([[6] * 5, [7] * 4, [8] * 6], max_tokens=15)[0])


def test_model_check_can_be_skipped(monkeypatch):
    model = hybrid_model("bamba")
    (batch,) = pack([[6, 7, 8, 9, 10], [11, 12, 13]], max_tokens=8)
    monkeypatch.setenv("ALIGNFUSE_VERIFY_MODEL", "0")
    assert token_logprobs(model, batch).shape == (8,)


def test_non_linear_head_is_refused(model):
    model.set_output_embeddings(torch.nn.Sequential(model.get_output_embeddings()))
    (batch,) = pack([[6, 7, 8, 9]], max_tokens=4)
    with pytest.raises(NotImplementedError, match="nn.Linear"):
        token_logprobs(model, batch)


def test_whole_model_compile_is_refused_and_layer_compile_works(model):
    (batch,) = pack([[5, 6, 7], [8, 9, 10, 11]], max_tokens=7)
    expected = token_logprobs(model, batch).detach()
    with pytest.raises(TypeError, match=r"compile its decoder layers instead"):
        token_logprobs(torch.compile(model, backend="eager"), batch)
    for layer in model.model.layers:
        layer.compile(backend="eager")
    try:
        logps = token_logprobs(model, batch)
        logps.sum().backward()
    finally:
        torch._dynamo.reset()
    assert_rel_close(logps, expected, 1e-6, "layers compiled")
    assert model.model.layers[0].mlp.up_proj.weight.grad is not None


def test_bad_packed_input_is_named(model):
    with pytest.raises(TypeError, match="PackedBatch"):
        token_logprobs(model, {"input_ids": torch.zeros(3, dtype=torch.long)})


def test_precompute_reference_logps_over_several_batches(model):
    gen = torch.Generator().manual_seed(8)
    lengths = [9, 4, 11, 7, 5, 8]
    seqs = random_sequences(gen, lengths)
    prompts = [3, 1, 2, 2, 1, 4]
    batches = pack(seqs, max_tokens=16, prompt_lengths=prompts)
    assert len(batches) > 1
    ref = precompute_reference_logps(model, batches)
    assert ref.shape == (len(seqs),)
    assert_rel_close(ref, unpacked_seq_logps(model, seqs, prompts), 1e-5, "reference logps")
    with pytest.raises(ValueError, match="exactly once"):
        precompute_reference_logps(model, batches[1:])


# ---------------------------------------------------------------------------------------
# Each algorithm's loss, packed, against the same loss from unpacked per-sequence values.


def completion_lengths(seqs, prompts):
    return torch.tensor([len(s) - p for s, p in zip(seqs, prompts)], dtype=torch.float64)


@pytest.mark.parametrize("name", ["sft", "dpo", "kto", "orpo", "simpo", "rm"])
def test_algorithm_loss_packed_equals_unpacked(model, name):
    gen = torch.Generator().manual_seed(9)
    ref_model = tiny_model(model.config.model_type, VOCAB, seed=11).eval()
    seqs, prompts, groups = preference_pairs(gen, VOCAB, 3)
    lengths = completion_lengths(seqs, prompts)
    if name == "kto":
        data = kto_sequences([s[:p] for s, p in zip(seqs[::2], prompts[::2])],
                             [s[p:] for s, p in zip(seqs[::2], prompts[::2])],
                             [True, False, True])
        seqs, prompts, groups = data["sequences"], data["prompt_lengths"], data["groups"]
        (batch,) = pack(seqs, max_tokens=200, prompt_lengths=prompts, groups=groups,
                        extras=data["extras"])
    else:
        (batch,) = pack(seqs, max_tokens=200, prompt_lengths=prompts, groups=groups)
    with torch.no_grad():
        pol = unpacked_seq_logps(model, seqs, prompts)
        ref = unpacked_seq_logps(ref_model, seqs, prompts)
    c, r = slice(0, None, 2), slice(1, None, 2)
    algo = {"sft": lambda: SFT(model), "dpo": lambda: DPO(model, ref_model, beta=0.2),
            "kto": lambda: KTO(model, ref_model, beta=0.2), "orpo": lambda: ORPO(model),
            "simpo": lambda: SimPO(model), "rm": lambda: RewardModel(model)}[name]()
    if name == "rm":
        head = model.reward_head
        torch.nn.init.normal_(head.weight, std=0.1)
        with torch.no_grad():
            scores = torch.stack([head(model.model(input_ids=torch.tensor(s)[None])
                                       .last_hidden_state[0, -1])[0] for s in seqs])
    with torch.no_grad():
        packed_loss, _ = algo.loss(batch)
        if name == "sft":
            expected = -pol.sum() / lengths.sum()
        elif name == "dpo":
            expected = dpo_loss(pol[c], pol[r], ref[c], ref[r], beta=0.2)[0].mean()
        elif name == "kto":
            z0 = kto_kl(pol[r], ref[r])
            expected = kto_loss(pol[c], ref[c], torch.tensor([True, False, True]), z0,
                                beta=0.2)[0].mean()
        elif name == "orpo":
            avg = pol / lengths
            expected = orpo_loss(avg[c], avg[r], -avg[c])[0].mean()
        elif name == "simpo":
            expected = simpo_loss(pol[c], pol[r], lengths[c], lengths[r])[0].mean()
        else:
            expected = pairwise_rm_loss(scores[c], scores[r])
    assert_rel_close(packed_loss, expected, 1e-5, f"{name} loss")


@pytest.mark.parametrize("kind", ["pointwise", "listwise"])
def test_reward_model_kinds_packed_equal_unpacked(model, kind):
    gen = torch.Generator().manual_seed(10)
    seqs = random_sequences(gen, [5, 8, 6, 9, 4, 7])
    rm = RewardModel(model, kind=kind)
    torch.nn.init.normal_(model.reward_head.weight, std=0.1)
    with torch.no_grad():
        scores = torch.stack([model.reward_head(model.model(input_ids=torch.tensor(s)[None])
                                                .last_hidden_state[0, -1])[0] for s in seqs])
    if kind == "pointwise":
        target = torch.randn(len(seqs), generator=gen)
        (batch,) = pack(seqs, max_tokens=64, extras={"score": target})
        expected = pointwise_rm_loss(scores, target)
    else:
        (batch,) = pack(seqs, max_tokens=64, groups=[0, 0, 0, 1, 1, 1])
        expected = listwise_rm_loss(scores.reshape(2, 3), torch.arange(3).expand(2, 3))
    with torch.no_grad():
        loss, _ = rm.loss(batch)
    assert_rel_close(loss, expected, 1e-5, f"{kind} rm loss")


@pytest.mark.parametrize("family", FAMILIES)
def test_gradient_checkpointing_keeps_fewer_activations_and_the_same_numbers(family):
    """With Hugging Face's gradient checkpointing on (non-reentrant, as the ready loop's
    `gradient_checkpointing=true` sets it), the packed forward keeps a fraction of the
    activations for the backward, and its log-probs and every gradient are the same."""
    gen = torch.Generator().manual_seed(31)
    lengths = [61, 127, 37]
    (batch,) = pack(random_sequences(gen, lengths), max_tokens=400, prompt_lengths=[3, 11, 5])
    weights = torch.randn(batch.num_tokens, generator=gen)
    results = {}
    for checkpointing in (False, True):
        model = tiny_model(family, VOCAB, seed=32).train()
        if checkpointing:
            model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False})
        token_logprobs(model, batch)  # the model check, once per model
        kept = [0]

        def keep(t: torch.Tensor) -> torch.Tensor:
            kept[0] += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
            logps = token_logprobs(model, batch)
        (logps * weights).sum().backward()
        results[checkpointing] = (kept[0], logps.detach(),
                                  {n: p.grad for n, p in model.named_parameters()})
    (plain_bytes, plain, plain_grads), (gc_bytes, gc, gc_grads) = results[False], results[True]
    assert gc_bytes < 0.25 * plain_bytes, (gc_bytes, plain_bytes)
    assert_rel_close(gc, plain, 1e-6, "log-probs with checkpointing")
    for name, grad in plain_grads.items():
        assert_rel_close(gc_grads[name], grad, 1e-6, f"grad {name} with checkpointing")
