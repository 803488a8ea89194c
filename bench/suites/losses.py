"""`losses`: each fused loss against its eager torch reference, plus linear + loss paths.

Per-op cases (`policy_loss`, `group_advantages`, `dpo_loss`, `kto_loss`):
- alignfuse/<backend> for the fused backends (triton, cuda); the eager baseline is the
  same op's `backend="torch"`, the readable reference every backend is tested against.
- Reference values: that torch backend evaluated in float64 on the same inputs.
- Floor: these are elementwise, so bytes only (each input read once, each output written
  once, and in the modes with a backward each input gradient written once); at these
  sizes launch overhead dominates, which is what fusing removes.

Linear + loss cases. `linear_dpo`: sigmoid DPO from policy and reference hidden states,
against eager and Liger's `LigerFusedLinearDPOLoss` (see `linear_dpo_case`).
`linear_grpo`: the token-mean GRPO loss (PPO clip 0.2, k3 KL to a
reference with beta=0.04) from the LM head's input:
- linear_policy_loss/<backend>: `alignfuse.kernels.linear_policy_loss`, one fused op;
- alignfuse/<backend>: `linear_logprobs` then `policy_loss` (gather-then-loss, fused parts);
- torch-eager: logits, float32 log_softmax, gather, then `policy_loss(backend="torch")`;
- liger: `LigerFusedLinearGRPOLoss(loss_type="bnpo")`, the same token-mean formula
  (sum over valid tokens of -min(r·A, clip(r)·A) + beta·k3, divided by their count).
  Liger's chunked losses (GRPO here, DPO below) compute the gradients chunk by chunk in
  their forward (torch.func), so their bwd is nearly free (compare fwd+bwd), and
  accumulate grad_weight in the weight's dtype (bf16 on GPU; alignfuse in float32).
"""

from __future__ import annotations

import torch

from ..harness import Case, Contender, InputSet
from .common import (alignfuse_op, backend_unavailable, dtype_name, generator, randn,
                     reference_dtype, tolerance, triton_baseline_unavailable)
from .logprobs import _eager as eager_logprobs

SUITE = "losses"
FUSED = ("triton", "cuda")


def _float_copy(s: InputSet, dtype: torch.dtype, grads: tuple[str, ...]) -> InputSet:
    tensors = {}
    for k, v in s.tensors.items():
        v = v.detach()
        v = v.to(dtype) if v.is_floating_point() else v
        tensors[k] = v.requires_grad_(k in grads)
    return InputSet(tensors, s.upstream)


def _torch_reference(op_call, grads: tuple[str, ...], grad_output: str | None):
    """The op's torch backend in float64 (float32 on GPU) with autograd gradients."""

    def reference(s: InputSet) -> dict[str, torch.Tensor]:
        dt = torch.float64
        c = _float_copy(s, dt, grads)
        out = op_call(c.tensors, "torch")
        ref = {k: v.detach() for k, v in out.items()}
        if grad_output is not None:
            values = torch.autograd.grad(out[grad_output], [c.tensors[g] for g in grads],
                                         s.upstream.to(dt))
            ref.update({f"grad_{g}": v for g, v in zip(grads, values)})
        return ref

    return reference


def _op_case(op: str, name: str, sizes: dict, make_inputs, call, grads: tuple[str, ...],
             grad_output: str | None, nbytes: int, dtype: torch.dtype,
             grad_bytes: int = 0) -> Case:
    """`nbytes`: the inputs read and outputs written once; `grad_bytes`: the input
    gradients a backward writes (added in bwd and fwd+bwd)."""
    def contender(cname: str, role: str, backend: str) -> Contender:
        return Contender(cname, role, lambda t: call(t, backend),
                         lambda device: backend_unavailable(op, backend, device))

    # The compiled CUDA backend last: a fault there breaks the CUDA context for the rest.
    contenders = [contender("alignfuse/triton", "subject", "triton"),
                  contender("torch-eager", "baseline", "torch"),
                  contender("alignfuse/cuda", "subject", "cuda")]
    modes = ("fwd", "bwd", "fwd+bwd") if grad_output else ("fwd",)
    tol = tolerance(dtype) if dtype != torch.float32 else 1e-5
    return Case(SUITE, name, sizes, make_inputs, _torch_reference(call, grads, grad_output),
                contenders, {"*": tol}, modes=modes, grad_inputs=grads,
                grad_output=grad_output,
                work=lambda mode: {"flops": 0,
                                   "bytes": nbytes + (grad_bytes if mode != "fwd" else 0)},
                notes="eager baseline: the op's backend='torch' reference; floor: bytes only "
                      "(inputs read once, outputs written once, plus the input gradients "
                      "written once in bwd and fwd+bwd)",
                unavailable=lambda device: backend_unavailable(op, "torch", device))


def policy_loss_case(S: int, T: int, device: torch.device) -> Case:
    def make_inputs(seed: int) -> InputSet:
        gen = generator(device, seed)
        logps = (-randn((S, T), device=device, dtype=torch.float32, gen=gen).abs() - 0.5)
        old = logps + 0.1 * randn((S, T), device=device, dtype=torch.float32, gen=gen)
        ref = logps + 0.1 * randn((S, T), device=device, dtype=torch.float32, gen=gen)
        lengths = torch.randint(T // 2, T + 1, (S,), device=device, generator=gen)
        mask = torch.arange(T, device=device)[None, :] < lengths[:, None]
        adv = randn((S,), device=device, dtype=torch.float32, gen=gen)
        return InputSet({"logps": logps.requires_grad_(), "old_logps": old, "ref_logps": ref,
                         "advantages": adv, "mask": mask},
                        randn((), device=device, dtype=torch.float32, gen=gen))

    def call(t, backend):
        fn = alignfuse_op("kernels", "policy_loss")
        loss, _metrics = fn(t["logps"], t["old_logps"], t["advantages"], mask=t["mask"],
                            ref_logps=t["ref_logps"], kl_coef=0.04, kl_estimator="k3",
                            loss_agg="token-mean", backend=backend)
        return {"loss": loss}

    nbytes = S * T * (4 * 3 + 1) + S * 4
    return _op_case("policy_loss", f"policy_loss,S={S},T={T}", {"S": S, "T": T, "N": S * T},
                    make_inputs, call, ("logps",), "loss", nbytes, torch.float32,
                    grad_bytes=S * T * 4)


def group_advantages_case(S: int, G: int, device: torch.device) -> Case:
    def make_inputs(seed: int) -> InputSet:
        gen = generator(device, seed)
        return InputSet({"rewards": randn((S,), device=device, dtype=torch.float32, gen=gen)})

    def call(t, backend):
        fn = alignfuse_op("kernels", "group_advantages")
        return {"advantages": fn(t["rewards"], G, estimator="grpo", backend=backend)}

    return _op_case("group_advantages", f"group_advantages,S={S},G={G}", {"S": S, "G": G},
                    make_inputs, call, (), None, S * 8, torch.float32)


def dpo_loss_case(S: int, device: torch.device) -> Case:
    names = ("policy_chosen", "policy_rejected", "ref_chosen", "ref_rejected")

    def make_inputs(seed: int) -> InputSet:
        gen = generator(device, seed)
        # Sequence log-probs of a few hundred tokens: large negative, policy near reference.
        ref_c, ref_r = (-200 + 20 * randn((S,), device=device, dtype=torch.float32, gen=gen)
                        for _ in range(2))
        pol_c = ref_c + randn((S,), device=device, dtype=torch.float32, gen=gen)
        pol_r = ref_r + randn((S,), device=device, dtype=torch.float32, gen=gen)
        return InputSet(dict(zip(names, (pol_c.requires_grad_(), pol_r.requires_grad_(),
                                         ref_c, ref_r))),
                        randn((S,), device=device, dtype=torch.float32, gen=gen))

    def call(t, backend):
        fn = alignfuse_op("kernels", "dpo_loss")
        losses, chosen, rejected = fn(*(t[n] for n in names), beta=0.1, loss_type="sigmoid",
                                      backend=backend)
        return {"losses": losses, "chosen_rewards": chosen, "rejected_rewards": rejected}

    return _op_case("dpo_loss", f"dpo_loss,S={S}", {"S": S}, make_inputs, call,
                    names[:2], "losses", S * 4 * 7, torch.float32, grad_bytes=2 * S * 4)


def kto_loss_case(S: int, device: torch.device) -> Case:
    def make_inputs(seed: int) -> InputSet:
        gen = generator(device, seed)
        ref = -200 + 20 * randn((S,), device=device, dtype=torch.float32, gen=gen)
        policy = ref + randn((S,), device=device, dtype=torch.float32, gen=gen)
        desirable = torch.rand((S,), device=device, generator=gen) < 0.5
        kl = randn((), device=device, dtype=torch.float32, gen=gen).abs()
        return InputSet({"policy_logps": policy.requires_grad_(), "ref_logps": ref,
                         "desirable": desirable, "kl": kl},
                        randn((S,), device=device, dtype=torch.float32, gen=gen))

    def call(t, backend):
        fn = alignfuse_op("kernels", "kto_loss")
        losses, rewards = fn(t["policy_logps"], t["ref_logps"], t["desirable"], t["kl"],
                             beta=0.1, backend=backend)
        return {"losses": losses, "rewards": rewards}

    return _op_case("kto_loss", f"kto_loss,S={S}", {"S": S}, make_inputs, call,
                    ("policy_logps",), "losses", S * (4 * 4 + 1), torch.float32,
                    grad_bytes=S * 4)


# ---------------------------------------------------------------------------------------
# Linear + GRPO loss

GRPO = dict(clip=0.2, beta=0.04)


def _grpo_from_logps(logps, t, backend):
    fn = alignfuse_op("kernels", "policy_loss")
    loss, _ = fn(logps, t["old_logps"], t["advantages"], mask=t["mask"],
                 ref_logps=t["ref_logps"], clip_low=GRPO["clip"], clip_high=GRPO["clip"],
                 kl_coef=GRPO["beta"], kl_estimator="k3", loss_agg="token-mean",
                 backend=backend)
    return loss


def linear_grpo_case(S: int, T: int, H: int, V: int, dtype: torch.dtype,
                     device: torch.device) -> Case:
    N = S * T

    def make_inputs(seed: int) -> InputSet:
        gen = generator(device, seed)
        hidden = randn((N, H), device=device, dtype=dtype, gen=gen, requires_grad=True)
        weight = randn((V, H), device=device, dtype=dtype, gen=gen, scale=H ** -0.5,
                       requires_grad=True)
        targets = torch.randint(0, V, (S, T), device=device, generator=gen)
        # Old and reference log-probs near the current ones (a few steps of training apart).
        with torch.no_grad():
            current = eager_logprobs({"hidden": hidden, "weight": weight,
                                      "targets": targets.reshape(-1)})["logps"].reshape(S, T)
        old = current + 0.05 * randn((S, T), device=device, dtype=torch.float32, gen=gen)
        ref = current + 0.05 * randn((S, T), device=device, dtype=torch.float32, gen=gen)
        lengths = torch.randint(T // 2, T + 1, (S,), device=device, generator=gen)
        mask = torch.arange(T, device=device)[None, :] < lengths[:, None]
        return InputSet({"hidden": hidden, "weight": weight, "targets": targets,
                         "old_logps": old, "ref_logps": ref, "mask": mask,
                         # Mean 1, not 0: keeps the loss away from 0 for its relative check.
                         "advantages": 1 + 0.5 * randn((S,), device=device,
                                                       dtype=torch.float32, gen=gen)},
                        randn((), device=device, dtype=torch.float32, gen=gen))

    def two_ops(backend):
        def run(t):
            fn = alignfuse_op("kernels", "linear_logprobs")
            logps = fn(t["hidden"], t["weight"], t["targets"].reshape(-1), backend=backend)
            return {"loss": _grpo_from_logps(logps.reshape(S, T), t, backend)}

        def unavailable(device):
            return (backend_unavailable("linear_logprobs", backend, device)
                    or backend_unavailable("policy_loss", backend, device))

        return Contender(f"alignfuse/{backend}", "subject", run, unavailable,
                         note="linear_logprobs then policy_loss")

    def fused(backend):
        def run(t):
            fn = alignfuse_op("kernels", "linear_policy_loss")
            loss, _metrics = fn(t["hidden"].reshape(S, T, H), t["weight"], t["targets"],
                                t["old_logps"], t["advantages"], mask=t["mask"],
                                ref_logps=t["ref_logps"], clip_low=GRPO["clip"],
                                clip_high=GRPO["clip"], kl_coef=GRPO["beta"],
                                kl_estimator="k3", loss_agg="token-mean", backend=backend)
            return {"loss": loss}

        return Contender(f"linear_policy_loss/{backend}", "subject", run,
                         lambda device: backend_unavailable("linear_policy_loss", backend,
                                                            device),
                         note="alignfuse.kernels.linear_policy_loss: one fused op")

    def eager(t):
        logps = eager_logprobs({"hidden": t["hidden"], "weight": t["weight"],
                                "targets": t["targets"].reshape(-1)})["logps"]
        return {"loss": _grpo_from_logps(logps.reshape(S, T), t, "torch")}

    liger_fn = {}

    def liger(t):
        if "fn" not in liger_fn:
            from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

            liger_fn["fn"] = LigerFusedLinearGRPOLoss(
                beta=GRPO["beta"], epsilon_low=GRPO["clip"], epsilon_high=GRPO["clip"],
                loss_type="bnpo", use_ref_model=True,
                # torch.compile of its chunk function costs minutes on a CPU.
                compiled=t["hidden"].is_cuda)
        loss, _metrics = liger_fn["fn"](t["hidden"].reshape(S, T, H), t["weight"], t["targets"],
                                        t["mask"].to(torch.int64), t["advantages"],
                                        ref_per_token_logps=t["ref_logps"],
                                        old_per_token_logps=t["old_logps"])
        return {"loss": loss}

    def reference(s: InputSet) -> dict[str, torch.Tensor]:
        dt = reference_dtype(device)
        c = _float_copy(s, dt, ("hidden", "weight"))
        logps = torch.log_softmax(c.tensors["hidden"] @ c.tensors["weight"].T, -1).gather(
            -1, c.tensors["targets"].reshape(-1, 1)).reshape(S, T)
        loss = _grpo_from_logps(logps, c.tensors, "torch")
        gh, gw = torch.autograd.grad(loss, (c.tensors["hidden"], c.tensors["weight"]),
                                     s.upstream.to(dt))
        return {"loss": loss.detach(), "grad_hidden": gh, "grad_weight": gw}

    size = torch.tensor([], dtype=dtype).element_size()

    def work(mode: str) -> dict:
        base = N * H * size + V * H * size + N * (8 + 4 * 3 + 1)
        grads = N * H * size + V * H * size
        flops = {"fwd": 2, "bwd": 4, "fwd+bwd": 6}[mode] * N * H * V
        return {"flops": flops, "bytes": base + (0 if mode == "fwd" else grads)}

    # Order = priority when the time budget runs out: the fused op and the baselines first;
    # the compiled CUDA backend last (a fault there breaks the CUDA context for the rest).
    contenders = [
        fused("triton"),
        Contender("torch-eager", "baseline", eager,
                  lambda device: backend_unavailable("policy_loss", "torch", device),
                  note="logits, float32 log_softmax, gather, then policy_loss(backend='torch')"),
        Contender("liger", "baseline", liger,
                  lambda device: triton_baseline_unavailable("liger_kernel", "liger-kernel",
                                                             device),
                  note="LigerFusedLinearGRPOLoss(loss_type='bnpo', beta=0.04); it computes "
                       "gradients in its forward, so its bwd is nearly free: compare fwd+bwd; "
                       "grad_weight accumulated in the weight's dtype (bf16 on GPU)"),
        two_ops("triton"), fused("torch"), two_ops("torch"), fused("cuda"), two_ops("cuda"),
    ]
    tol = tolerance(dtype)
    return Case(SUITE, f"linear_grpo,S={S},T={T},H={H},V={V},{dtype_name(dtype)}",
                {"S": S, "T": T, "N": N, "H": H, "V": V, "dtype": dtype_name(dtype)},
                make_inputs, reference, contenders, {"*": tol},
                grad_inputs=("hidden", "weight"), grad_output="loss", work=work,
                notes="token-mean GRPO loss (clip 0.2, k3 KL beta 0.04) from hidden states; "
                      "floor as logprobs (2/4/6 NHV FLOPs)",
                unavailable=lambda device: backend_unavailable("policy_loss", "torch", device))


# ---------------------------------------------------------------------------------------
# Linear + DPO loss


def linear_dpo_case(P: int, T: int, H: int, V: int, dtype: torch.dtype,
                    device: torch.device) -> Case:
    """Sigmoid DPO (beta 0.1) from the hidden states of P pairs, policy and reference.

    Rows are [chosen_0..chosen_{P-1}, rejected_0..rejected_{P-1}] (Liger's layout), each
    of T positions with the prompt and the padding at ignore_index; sequence log-probs are
    sums over the completion. The reference log-probs come from the reference model's own
    hidden states and head, under no_grad, inside each contender (as Liger does).
    """
    N = 2 * P * T

    def make_inputs(seed: int) -> InputSet:
        gen = generator(device, seed)
        tensors = {
            "hidden": randn((N, H), device=device, dtype=dtype, gen=gen, requires_grad=True),
            "weight": randn((V, H), device=device, dtype=dtype, gen=gen, scale=H ** -0.5,
                            requires_grad=True),
            "ref_hidden": randn((N, H), device=device, dtype=dtype, gen=gen),
            "ref_weight": randn((V, H), device=device, dtype=dtype, gen=gen, scale=H ** -0.5)}
        targets = torch.randint(0, V, (2 * P, T), device=device, generator=gen)
        pos = torch.arange(T, device=device)[None, :]
        prompt = torch.randint(T // 8, T // 4 + 1, (2 * P, 1), device=device, generator=gen)
        end = torch.randint(T // 2, T + 1, (2 * P, 1), device=device, generator=gen)
        tensors["targets"] = torch.where((pos >= prompt) & (pos < end), targets, -100)
        return InputSet(tensors, randn((), device=device, dtype=torch.float32, gen=gen))

    def dpo_from_sequence_logps(seq, ref_seq, backend):
        fn = alignfuse_op("kernels", "dpo_loss")
        losses, _, _ = fn(seq[:P], seq[P:], ref_seq[:P], ref_seq[P:], beta=0.1,
                          loss_type="sigmoid", backend=backend)
        return losses.mean()

    def two_ops(backend):
        def run(t):
            fn = alignfuse_op("kernels", "linear_logprobs")
            flat = t["targets"].reshape(-1)
            seq = fn(t["hidden"], t["weight"], flat, backend=backend).reshape(2 * P, T).sum(-1)
            with torch.no_grad():
                ref_seq = fn(t["ref_hidden"], t["ref_weight"], flat,
                             backend=backend).reshape(2 * P, T).sum(-1)
            return {"loss": dpo_from_sequence_logps(seq, ref_seq, backend)}

        def unavailable(device):
            return (backend_unavailable("linear_logprobs", backend, device)
                    or backend_unavailable("dpo_loss", backend, device))

        return Contender(f"alignfuse/{backend}", "subject", run, unavailable,
                         note="linear_logprobs, per-sequence sum, then dpo_loss")

    def eager_seq(hidden, weight, targets):
        logps = (hidden @ weight.T).float().log_softmax(-1).gather(
            -1, targets.clamp(min=0).reshape(-1, 1)).reshape(2 * P, T)
        return torch.where(targets != -100, logps, 0.0).sum(-1)

    def eager(t):
        seq = eager_seq(t["hidden"], t["weight"], t["targets"])
        with torch.no_grad():
            ref_seq = eager_seq(t["ref_hidden"], t["ref_weight"], t["targets"])
        return {"loss": dpo_from_sequence_logps(seq, ref_seq, "torch")}

    liger_fn = {}

    def liger(t):
        if "fn" not in liger_fn:
            from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss

            liger_fn["fn"] = LigerFusedLinearDPOLoss(beta=0.1, use_ref_model=True,
                                                     average_log_prob=False,
                                                     compiled=t["hidden"].is_cuda)
        out = liger_fn["fn"](t["weight"], t["hidden"].reshape(2 * P, T, H), t["targets"],
                             ref_input=t["ref_hidden"].reshape(2 * P, T, H),
                             ref_weight=t["ref_weight"])
        return {"loss": out[0] if isinstance(out, tuple) else out}

    def reference(s: InputSet) -> dict[str, torch.Tensor]:
        dt = reference_dtype(device)
        c = _float_copy(s, dt, ("hidden", "weight"))
        seq = eager_seq(c.tensors["hidden"], c.tensors["weight"], c.tensors["targets"])
        ref_seq = eager_seq(c.tensors["ref_hidden"], c.tensors["ref_weight"], c.tensors["targets"])
        loss = dpo_from_sequence_logps(seq, ref_seq, "torch")
        gh, gw = torch.autograd.grad(loss, (c.tensors["hidden"], c.tensors["weight"]),
                                     s.upstream.to(dt))
        return {"loss": loss.detach(), "grad_hidden": gh, "grad_weight": gw}

    size = torch.tensor([], dtype=dtype).element_size()

    def work(mode: str) -> dict:
        read = 2 * (N * H * size + V * H * size) + N * 8
        grads = N * H * size + V * H * size
        # The reference forward (2NHV) is in every mode that runs a forward.
        flops = {"fwd": 4, "bwd": 4, "fwd+bwd": 8}[mode] * N * H * V
        return {"flops": flops, "bytes": read + (0 if mode == "fwd" else grads)}

    contenders = [two_ops("triton"),
                  Contender("torch-eager", "baseline", eager,
                            note="logits, float32 log_softmax, gather, sum, "
                                 "dpo_loss(backend='torch')"),
                  Contender("liger", "baseline", liger,
                            lambda device: triton_baseline_unavailable("liger_kernel",
                                                                       "liger-kernel", device),
                            note="LigerFusedLinearDPOLoss(beta=0.1, sum of log-probs); it "
                                 "computes gradients in its forward: compare fwd+bwd; "
                                 "grad_weight accumulated in the weight's dtype (bf16 on GPU)"),
                  two_ops("torch"), two_ops("cuda")]
    return Case(SUITE, f"linear_dpo,P={P},T={T},H={H},V={V},{dtype_name(dtype)}",
                {"P": P, "T": T, "N": N, "H": H, "V": V, "dtype": dtype_name(dtype)},
                make_inputs, reference, contenders, {"*": tolerance(dtype)},
                grad_inputs=("hidden", "weight"), grad_output="loss", work=work,
                notes="sigmoid DPO (beta 0.1) from policy and reference hidden states; "
                      "floor: policy 2/4/6 NHV plus the reference forward 2NHV",
                unavailable=lambda device: backend_unavailable("dpo_loss", "torch", device))


def cases(preset, device: torch.device) -> list[Case]:
    out = []
    for s in preset.losses:
        out += [policy_loss_case(s["S"], s["T"], device),
                group_advantages_case(s["S"] * s["G"], s["G"], device),
                dpo_loss_case(s["S"] * s["G"], device),
                kto_loss_case(s["S"] * s["G"], device)]
    for s in preset.linear_losses:
        out.append(linear_grpo_case(s["S"], s["T"], s["H"], s["V"], preset.dtype, device))
        out.append(linear_dpo_case(max(1, s["S"] // 2), s["T"], s["H"], s["V"], preset.dtype,
                                   device))
    return out
