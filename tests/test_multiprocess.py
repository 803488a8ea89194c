"""`torchrun --nproc_per_node 2` on CPU (gloo): a DPO step with the policy under FSDP2
(`fully_shard`) and under DDP matches the single-process step on the same global batch, in
loss and in every gradient; so does a KTO step under DDP (z0 gathered across ranks).

So does a DPO step under FSDP2 of two models that run on right-padded rows (`runs_padded`),
packed with `pack(..., padded=True)`: Bloom, whose packed forward raises (ALiBi from a 2-D
mask) inside FSDP2's forward, after its pre-forward hooks gathered the parameters and before
its post-forward hooks ran, and is then run again padded through the same FSDP2 module; and
LFM2, whose short convolutions leak between packed documents. The model check's probe runs
inside the first `algo.step`, under FSDP2, and its verdict is warned once per model.

The pytest process spawns torchrun on this same file (its `__main__` part is the worker).
Each rank gets its share of the pairs from `pack(..., num_ranks=2, rank=r)`; each micro-
batch's loss is scaled by `units * world / global_units`, because DDP and FSDP2 average
gradients over ranks: the sum over ranks then equals the global mean over pairs.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import warnings

import pytest
import torch
from helpers import preference_pairs

VOCAB = 53
NUM_PAIRS = 6


def make_pairs():
    return preference_pairs(torch.Generator().manual_seed(21), VOCAB, NUM_PAIRS)


def make_models(family: str = "llama"):
    """(policy, frozen reference) of `family`: "llama", or one that runs padded (`PADDED`)."""
    if family == "llama":
        from alignfuse.engine.tiny import tiny_model

        return tiny_model("llama", VOCAB, seed=22), tiny_model("llama", VOCAB, seed=23).eval()
    from helpers import family_model, hybrid_model

    def make(seed):
        if family == "bloom":
            return family_model("bloom", dict(n_layer=2, n_head=4), attention="eager",
                                vocab=VOCAB, seed=seed)
        return hybrid_model(family, vocab=VOCAB, seed=seed)

    return make(22), make(23).eval()


# Families that run padded, each with the verdict its warning names (the policy's and the
# reference's, each warned once), and where its decoder layers are (FSDP2 shards each).
PADDED = {"bloom": ("cannot run packed documents in one row", lambda m: m.transformer.h),
          "lfm2": ("packed documents are not isolated", lambda m: m.model.layers)}


def make_kto_examples():
    gen = torch.Generator().manual_seed(24)
    prompts = [torch.randint(6, VOCAB, (3,), generator=gen).tolist() for _ in range(6)]
    completions = [torch.randint(6, VOCAB, (4,), generator=gen).tolist() for _ in range(6)]
    return prompts, completions, [True, False, True, True, False, False]


def worker(out_path: str) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    from alignfuse.engine import forward
    from alignfuse.engine.algorithms import DPO
    from alignfuse.engine.packing import pack

    root = os.path.dirname(os.path.dirname(os.path.abspath(forward.__file__)))
    own_code = tuple(os.path.join(root, folder, "") for folder in ("engine", "kernels"))
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    seqs, prompts, groups = make_pairs()
    batches = pack(seqs, max_tokens=40, prompt_lengths=prompts, groups=groups,
                   num_ranks=world, rank=rank)
    padded_batches = pack(seqs, max_tokens=40, prompt_lengths=prompts, groups=groups,
                          padded=True, num_ranks=world, rank=rank)
    results = {}
    mesh = init_device_mesh("cpu", (world,))
    for mode in ("fsdp2", "ddp", *(f"fsdp2-{family}" for family in PADDED)):
        family = mode.partition("-")[2] or "llama"
        policy, ref = make_models(family)
        if mode.startswith("fsdp2"):
            layers = PADDED[family][1](policy) if family in PADDED else policy.model.layers
            for layer in layers:
                fully_shard(layer, mesh=mesh)
            fully_shard(policy, mesh=mesh)
            model = policy
        else:
            model = torch.nn.parallel.DistributedDataParallel(policy)
        algo = DPO(model, ref, beta=0.3)
        mine = padded_batches if family in PADDED else batches
        local = torch.tensor(float(sum(algo.num_units(b) for b in mine)))
        total = local.clone()
        dist.all_reduce(total)
        weighted_loss = torch.zeros(())
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            for batch in mine:  # the first step checks the model, under FSDP2
                units = algo.num_units(batch)
                metrics = algo.step(batch, loss_scale=units * world / float(total))
                weighted_loss += metrics["loss"] * units
        dist.all_reduce(weighted_loss)
        grads = {}
        for name, p in policy.named_parameters():
            g = p.grad
            grads[name.replace("module.", "")] = (g.full_tensor() if isinstance(g, DTensor)
                                                  else g).detach().clone()
        results[mode] = {"loss": float(weighted_loss / total), "grads": grads,
                         "num_batches": len(mine),
                         "warnings": [str(w.message) for w in record
                                      if "right-padded rows" in str(w.message)],
                         # e.g. torch's on a float() of a tensor that requires grad
                         "warnings_from_alignfuse": [f"{w.filename}:{w.lineno}: {w.message}"
                                                     for w in record
                                                     if w.filename.startswith(own_code)],
                         "runs_padded": (forward.runs_padded(policy),
                                         forward.runs_padded(ref))}
    # KTO: z0 comes from the mismatched pairs of every rank (gathered), as in one process.
    from alignfuse.engine.algorithms import KTO, kto_sequences

    data = kto_sequences(*make_kto_examples())
    (kto_batch,) = pack(data["sequences"], max_tokens=400, prompt_lengths=data["prompt_lengths"],
                        groups=data["groups"], extras=data["extras"], num_ranks=world, rank=rank)
    policy, ref = make_models()
    model = torch.nn.parallel.DistributedDataParallel(policy)
    algo = KTO(model, ref, beta=0.3)
    units = algo.num_units(kto_batch)
    total = torch.tensor(float(units))
    dist.all_reduce(total)
    metrics = algo.step(kto_batch, loss_scale=units * world / float(total))
    weighted_loss = torch.tensor(metrics["loss"] * units)
    dist.all_reduce(weighted_loss)
    results["kto-ddp"] = {"loss": float(weighted_loss / total), "num_batches": 1,
                          "grads": {n: p.grad.detach().clone()
                                    for n, p in policy.named_parameters()}}
    if rank == 0:
        torch.save(results, out_path)
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.slow
def test_torchrun_two_processes_match_one(tmp_path):
    from alignfuse.engine.algorithms import DPO
    from alignfuse.engine.packing import pack
    from helpers import assert_rel_close

    torchrun = shutil.which("torchrun") or os.path.join(os.path.dirname(sys.executable),
                                                        "torchrun")
    out = tmp_path / "grads.pt"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([torchrun, "--standalone", "--nproc_per_node", "2",
                           __file__, str(out)], capture_output=True, text=True, env=env,
                          timeout=600, cwd=os.path.dirname(__file__))
    assert proc.returncode == 0, proc.stderr[-4000:]

    seqs, prompts, groups = make_pairs()
    results = torch.load(out, weights_only=False)
    kto_result = results.pop("kto-ddp")
    for mode, result in results.items():
        family = mode.partition("-")[2] or "llama"
        # the one-process reference runs padded too (its own probe's verdict); padded
        # packing puts pairs of unlike lengths in separate micro-batches
        wholes = pack(seqs, max_tokens=400, prompt_lengths=prompts, groups=groups,
                      padded=family in PADDED)
        policy, ref = make_models(family)
        algo = DPO(policy, ref, beta=0.3)
        total = sum(algo.num_units(b) for b in wholes)
        loss = 0.0
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the verdicts: asserted on the ranks' below
            for whole in wholes:
                units = algo.num_units(whole)
                loss += algo.step(whole, loss_scale=units / total)["loss"] * units / total
        assert result["num_batches"] >= 1
        assert result["runs_padded"] == ((True, True) if family in PADDED else (False, False)), mode
        if family in PADDED:  # policy and reference, each warned once, with the verdict
            assert len(result["warnings"]) == 2, (mode, result["warnings"])
            assert all(PADDED[family][0] in w for w in result["warnings"]), result["warnings"]
        else:
            assert result["warnings"] == [], (mode, result["warnings"])
        assert result["warnings_from_alignfuse"] == [], (mode, result["warnings_from_alignfuse"])
        assert abs(result["loss"] - loss) <= 1e-5 * max(1.0, abs(loss)), mode
        for name, p in policy.named_parameters():
            assert_rel_close(result["grads"][name], p.grad, 1e-5, f"{mode} grad {name}")

    # KTO under DDP: z0 from both ranks' mismatched pairs equals the one-process z0.
    from alignfuse.engine.algorithms import KTO, kto_sequences

    data = kto_sequences(*make_kto_examples())
    (whole,) = pack(data["sequences"], max_tokens=400, prompt_lengths=data["prompt_lengths"],
                    groups=data["groups"], extras=data["extras"])
    policy, ref = make_models()
    metrics = KTO(policy, ref, beta=0.3).step(whole)
    assert abs(kto_result["loss"] - metrics["loss"]) <= 1e-5 * max(1.0, abs(metrics["loss"]))
    for name, p in policy.named_parameters():
        assert_rel_close(kto_result["grads"][name], p.grad, 1e-5, f"kto grad {name}")


if __name__ == "__main__":
    worker(sys.argv[1])
