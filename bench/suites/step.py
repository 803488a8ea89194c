"""`step`: one DPO and one GRPO training step (forward + backward) of a small HF model.

Both contenders get the same model weights (separate copies: the packed path may switch a
model's attention implementation) and the same sequences:
- alignfuse: the sequences packed into one row (`alignfuse.engine.pack`), the packed
  forward with documents isolated and log-probs gathered from the hidden states
  (`alignfuse.engine.forward`), and the fused losses. DPO is
  `alignfuse.engine.algorithms.DPO.loss` with a reference model; GRPO is `token_logprobs`
  + `policy_loss` (token-mean, clip 0.2, k3 KL beta 0.04): what `GRPO.loss`
  (engine/algorithms/grpo.py) computes with TIS off, without the Rollout that building a
  GRPO object needs.
- torch-eager: the same sequences right-padded to `[S, T]`, the model's own forward with an
  attention mask and full `[S, T, V]` logits, float32 log_softmax, gather, then the loss's
  torch reference. Its reference model runs the same way.
Recorded: median step time, tokens/s (real tokens, padding excluded: the mean over the
input sets the timed runs alternate between, over the median time), peak memory (GPU),
measured with every model's gradients freed first. The check compares each contender's
loss with the eager path run on a float32 (GPU) / float64 (CPU) copy of the models;
gradients are not compared here (the logprobs and losses suites check them op by op).
Floor: 6 · (parameters) · tokens for the policy (forward + backward) plus 2 · params ·
tokens for the reference forward, attention FLOPs ignored; bytes are not modelled. The
parameters counted are those of matmuls: an untied input embedding is a lookup and does no
FLOPs (42% of the tiny Qwen2's parameters), so it is left out; a tied one is the LM head's
weight too and counts once.
"""

from __future__ import annotations

import copy

import torch

from ..harness import Case, Contender, InputSet, run_case
from .common import alignfuse_op, dtype_name, op_unavailable, reference_dtype, tolerance

SUITE = "step"
BETA, CLIP, KL = 0.1, 0.2, 0.04


def _shape(cfg: dict) -> dict:
    """Head layout of a real model of that width: heads of 64, about 4 query heads per KV
    head (Qwen2.5-0.5B: hidden 896 = 14 heads, 2 KV heads)."""
    heads = max(2, cfg["hidden"] // 64)
    kv = max(d for d in range(1, max(2, heads // 4 + 1)) if heads % d == 0)
    return dict(hidden_size=cfg["hidden"], num_layers=cfg["layers"], num_attention_heads=heads,
                num_key_value_heads=kv, head_dim=cfg["hidden"] // heads,
                max_position_embeddings=max(512, 2 * cfg["T"]))


def _model(cfg: dict, dtype: torch.dtype, device: torch.device):
    from alignfuse.engine.tiny import tiny_model

    model = tiny_model(cfg["family"], cfg["vocab"], seed=0, **_shape(cfg))
    return model.to(device=device, dtype=dtype)


def _sequences(kind: str, cfg: dict, gen: torch.Generator):
    """Token lists, prompt lengths and group ids: DPO pairs or GRPO groups."""
    T, V, n = cfg["T"], cfg["vocab"], cfg["batch"]
    group = 2 if kind == "dpo" else cfg["group"]

    def randint(lo, hi):
        return int(torch.randint(lo, hi + 1, (), generator=gen))

    seqs, prompts, groups = [], [], []
    for g in range(n // group):
        p = randint(max(2, T // 8), max(2, T // 4))
        prompt = torch.randint(3, V, (p,), generator=gen)
        for _ in range(group):
            c = randint(max(2, T // 4), T - p)
            seqs.append(torch.cat([prompt, torch.randint(3, V, (c,), generator=gen)]))
            prompts.append(p)
            groups.append(g)
    return seqs, prompts, groups


def _padded(packed, **per_token):
    """The packed batch as right-padded `[S, T]` tensors (same rows, same order)."""
    ones = torch.ones_like(packed.input_ids)
    out = {"input_ids": packed.to_padded(packed.input_ids),
           "attention_mask": packed.to_padded(ones),
           "targets": packed.to_padded(packed.targets, pad_value=-100)}
    out.update({k: packed.to_padded(v) for k, v in per_token.items()})
    return out


def _eager_token_logps(model, padded) -> torch.Tensor:
    """`[S, T]` target log-probs from full logits (0 where the target is -100)."""
    logits = model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"],
                   use_cache=False).logits
    targets = padded["targets"]
    logps = logits.float().log_softmax(-1).gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    return torch.where(targets != -100, logps, 0.0)


def _eager_dpo(policy, ref, padded) -> torch.Tensor:
    dpo_loss = alignfuse_op("kernels", "dpo_loss")
    seq = _eager_token_logps(policy, padded).sum(-1)
    with torch.no_grad():
        ref_seq = _eager_token_logps(ref, padded).sum(-1)
    losses, _, _ = dpo_loss(seq[0::2], seq[1::2], ref_seq[0::2], ref_seq[1::2], beta=BETA,
                            backend="torch")
    return losses.mean()


def _eager_grpo(policy, padded) -> torch.Tensor:
    policy_loss = alignfuse_op("kernels", "policy_loss")
    logps = _eager_token_logps(policy, padded)
    mask = padded["targets"] != -100
    loss, _ = policy_loss(logps, padded["old_logps"], padded["advantages"], mask=mask,
                          ref_logps=padded["ref_logps"], clip_low=CLIP, clip_high=CLIP,
                          kl_coef=KL, kl_estimator="k3", loss_agg="token-mean", backend="torch")
    return loss


def _unavailable(kind: str):
    def why(device):
        needs = [("engine", "pack"), ("engine.forward", "token_logprobs"),
                 ("kernels", "dpo_loss" if kind == "dpo" else "policy_loss")]
        if kind == "dpo":
            needs.append(("engine.algorithms", "DPO"))
        for module, name in needs:
            why = op_unavailable(module, name)
            if why:
                return why
        return None

    return why


def step_case(kind: str, cfg: dict, dtype: torch.dtype, device: torch.device) -> Case:
    why = _unavailable(kind)(device)
    params = matmul_params = None
    if why is None:
        try:
            params, matmul_params = _count_params(cfg)
        except Exception as exc:  # e.g. a broken build or transformers: a skip, not a crash
            text = f"{type(exc).__name__}: {exc}".strip()[:400]
            why = f"the model cannot be configured here ({text})"
    models: dict = {}

    def get_models():
        # Built lazily (inside the case's setup) so that a missing op only skips the case.
        if not models:
            base = _model(cfg, dtype, device)
            # The reference model a few updates away from the policy: with equal weights
            # the DPO loss is exactly log 2 whatever the log-probs, and checks nothing.
            frozen = copy.deepcopy(base).requires_grad_(False)
            gen = torch.Generator().manual_seed(99)
            with torch.no_grad():
                for p in frozen.parameters():
                    noise = torch.randn(p.shape, generator=gen).to(p.device, torch.float32)
                    p.add_((0.05 * p.float().std() * noise).to(p.dtype))
            models["alignfuse"] = (base, frozen)
            models["eager"] = (copy.deepcopy(base), copy.deepcopy(frozen))
            dt = reference_dtype(device)
            models["reference"] = (copy.deepcopy(base).to(dt), copy.deepcopy(frozen).to(dt))
            for policy, ref in models.values():
                policy.config._attn_implementation = "sdpa"
                ref.config._attn_implementation = "sdpa"
        return models

    def make_inputs(seed: int) -> InputSet:
        pack = alignfuse_op("engine", "pack")
        gen = torch.Generator().manual_seed(7919 * seed + 1)
        seqs, prompts, groups = _sequences(kind, cfg, gen)
        total = sum(len(s) for s in seqs)
        (packed,) = pack(seqs, max_tokens=total, prompt_lengths=prompts, groups=groups)
        packed = packed.to(device)
        tensors = {"packed": packed}
        if kind == "grpo":
            policy, _ = get_models()["eager"]
            with torch.no_grad():
                current = _eager_token_logps(policy, _padded(packed))
            # token_logprobs' packed layout from the padded one: same rows, same positions.
            flat = current[torch.repeat_interleave(
                torch.arange(packed.num_seqs, device=device),
                torch.diff(packed.cu_seqlens).to(device)), packed.position_ids]
            noise = lambda: 0.05 * torch.randn(flat.shape, generator=gen).to(device)  # noqa: E731
            valid = packed.loss_mask
            tensors["old_logps"] = torch.where(valid, flat + noise(), 0.0)
            tensors["ref_logps"] = torch.where(valid, flat + noise(), 0.0)
            # Mean 1, not 0: a loss near zero would make its relative check meaningless.
            advantages = 1 + 0.5 * torch.randn(packed.num_seqs, generator=gen)
            tensors["advantages"] = advantages.to(device)
        tensors["padded"] = _padded(packed, **{k: tensors[k] for k in ("old_logps", "ref_logps")
                                             if k in tensors})
        if kind == "grpo":
            tensors["padded"]["advantages"] = tensors["advantages"]
        return InputSet(tensors, torch.randn((), generator=gen).abs().add(0.5).to(device))

    def alignfuse_run(t):
        policy, ref = get_models()["alignfuse"]
        policy.zero_grad(set_to_none=True)
        packed = t["packed"]
        if kind == "dpo":
            DPO = alignfuse_op("engine.algorithms", "DPO")
            loss, _ = DPO(policy, ref, beta=BETA).loss(packed)
            return {"loss": loss}
        token_logprobs = alignfuse_op("engine.forward", "token_logprobs")
        policy_loss = alignfuse_op("kernels", "policy_loss")
        logps = token_logprobs(policy, packed)
        loss, _ = policy_loss(logps, t["old_logps"], t["advantages"],
                              cu_seqlens=packed.cu_seqlens, mask=packed.loss_mask,
                              ref_logps=t["ref_logps"], clip_low=CLIP, clip_high=CLIP,
                              kl_coef=KL, kl_estimator="k3", loss_agg="token-mean")
        return {"loss": loss}

    def eager_with(which: str):
        def run(t):
            policy, ref = get_models()[which]
            policy.zero_grad(set_to_none=True)
            padded = t["padded"]
            if which == "reference":
                padded = {k: v.to(reference_dtype(device)) if v.is_floating_point() else v
                          for k, v in padded.items()}
            loss = _eager_dpo(policy, ref, padded) if kind == "dpo" else _eager_grpo(policy, padded)
            return {"loss": loss}

        return run

    def reference(s: InputSet):
        return {"loss": eager_with("reference")(s.tensors)["loss"].detach()}

    def reset():
        # Before each peak-memory baseline: the .grad a timed run left on any model would
        # count as live input, and the measured run frees its own (zero_grad set_to_none),
        # which understated the peak by the model's gradient size.
        for pair in models.values():
            for model in pair:
                model.zero_grad(set_to_none=True)

    name = f"{kind},{cfg['family']},H={cfg['hidden']},L={cfg['layers']},V={cfg['vocab']}," \
           f"S={cfg['batch']},T={cfg['T']},{dtype_name(dtype)}"
    case = Case(SUITE, name, {"S": cfg["batch"], "T": cfg["T"], "H": cfg["hidden"],
                              "layers": cfg["layers"], "V": cfg["vocab"],
                              "params": params, "matmul_params": matmul_params,
                              "dtype": dtype_name(dtype)},
                make_inputs, reference,
                [Contender("alignfuse", "subject", alignfuse_run),
                 Contender("torch-eager", "baseline", eager_with("eager"),
                           note="padded batch, full logits, float32 log_softmax, gather")],
                {"loss": 10 * tolerance(dtype) if dtype != torch.float32 else 1e-4},
                modes=("fwd+bwd",), grad_output="loss",
                unavailable=lambda device: why, reset=reset,
                notes=("one training step; tokens/s counts real tokens (no padding); loss "
                       "checked against the eager path on a higher-precision model copy"))
    case.flops_per_token = (None if matmul_params is None
                            else (6 + (2 if kind == "dpo" else 0)) * matmul_params)
    return case


def _count_params(cfg: dict) -> tuple[int, int]:
    """(all parameters, those of matmuls) of the configured model, without building its
    weights: the input embedding is a lookup, left out unless tied to the LM head."""
    from alignfuse.engine.tiny import tiny_config
    from transformers import AutoModelForCausalLM

    config = tiny_config(cfg["family"], cfg["vocab"], **_shape(cfg))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    total = sum(p.numel() for p in model.parameters())  # a tied weight is listed once
    embedding = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    tied = head is not None and head.weight is embedding
    return total, total - (0 if tied else embedding.numel())


def run(preset, device, cfg, ceilings, log, on_progress=None) -> list[dict]:
    if not preset.step:
        return []
    records = []
    for kind in ("dpo", "grpo"):
        case = step_case(kind, preset.step, preset.dtype, device)
        tokens: dict[int, int] = {}  # real tokens of each input set, by seed

        make = case.make_inputs

        def counting(seed, make=make, tokens=tokens):
            s = make(seed)
            tokens[seed] = int(s.tensors["packed"].num_tokens)
            return s

        def mean_tokens(tokens=tokens) -> float | None:
            # The timed runs alternate between the input sets, whose lengths differ.
            return sum(tokens.values()) / len(tokens) if tokens else None

        case.make_inputs = counting
        flops_per_token = case.flops_per_token
        case.work = lambda mode, n=mean_tokens, f=flops_per_token: (
            {"flops": f * n(), "bytes": 0} if n() is not None and f is not None else None)
        # run_case builds nothing once the deadline has passed (all skipped for time).
        record = run_case(case, device, cfg, ceilings, log, on_progress=on_progress)
        n = mean_tokens()
        for c in record["contenders"]:
            for m in c["modes"].values():
                if m.get("status") == "ok" and n is not None:
                    m["tokens_per_s"] = n / m["time_s"]["median"]
        record["metrics"] = {"tokens_per_step": n,
                             "tokens_per_input_set": [tokens[k] for k in sorted(tokens)],
                             "flops_per_token": flops_per_token}
        records.append(record)
        if on_progress is not None:
            on_progress(record)
    return records
