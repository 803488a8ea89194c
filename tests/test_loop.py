"""The ready loop, checkpoints and the command line."""

from __future__ import annotations

import dataclasses
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from alignfuse.engine import checkpoint as ckpt
from alignfuse.engine.cli import main
from alignfuse.engine.data import DataFormatError
from alignfuse.engine.loop import (ALGORITHM_KNOBS, ALGORITHMS, ConfigError, TrainConfig,
                                   load_config_file, make_config, records_for_step, train)
from alignfuse.engine.metrics import read_metrics
from helpers import assert_rel_close

# A run small enough for a busy 2-core machine: tiny model, a few steps.
SMALL = ["num_examples=24", "batch_size=6", "max_tokens=64", "sft_warmup_steps=2",
         "lr=1e-3", "progress=false", "tensorboard=false", "num_threads=1"]


# The machine is shared: two oversubscribed threads were 5-15x slower than one here.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_unknown_or_bad_config_keys_are_named():
    with pytest.raises(ConfigError, match="'stepz'.*did you mean steps"):
        make_config(overrides=["stepz=3"])
    with pytest.raises(ConfigError, match="^steps must be int"):
        make_config(overrides=["steps=many"])
    with pytest.raises(ConfigError, match="^lr must be > 0"):
        make_config({"lr": 0})
    with pytest.raises(ConfigError, match="^reference must be one of"):
        make_config({"reference": "none"})
    with pytest.raises(ConfigError, match="rm_kind must be one of .*'pairwize'"):
        make_config(overrides=["algorithm=rm", "rm_kind=pairwize"])
    with pytest.raises(ConfigError, match="key=value"):
        make_config(overrides=["steps"])
    with pytest.raises(ConfigError, match="^max_grad_norm must be"):
        make_config({"max_grad_norm": "big"})
    assert make_config(overrides=["lr=1e-3", "max_grad_norm=null"]).lr == 1e-3
    # An unknown algorithm is named as such (not as one that does not read loss_type).
    with pytest.raises(ConfigError, match="^algorithm must be one of"):
        make_config(overrides=["algorithm=dpoo", "loss_type=ipo"])


@pytest.mark.parametrize("overrides, message", [
    (["loss_type=sigmoidd"], "dpo: loss_type must be one of .*'sigmoid'"),
    (["beta=0"], r"dpo: beta must be in \(0"),
    (["label_smoothing=0.5"], "dpo: label_smoothing must be in"),
    (["loss_type=hinge", "label_smoothing=0.1"], "label_smoothing is only used by"),
    (["algorithm=simpo", "beta=-1"], "simpo: beta must be"),
    (["algorithm=kto", "desirable_weight=-1"], "kto: desirable_weight must be"),
])
def test_loss_options_are_checked_before_the_run(tmp_path, capsys, overrides, message):
    with pytest.raises(ConfigError, match=message):
        make_config(overrides=overrides)
    algorithm = next((o.split("=")[1] for o in overrides if o.startswith("algorithm=")), "dpo")
    rest = [o for o in overrides if not o.startswith("algorithm=")]
    assert main(["train", algorithm, f"out_dir={tmp_path}", *SMALL, *rest]) == 2
    assert "config error" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # stopped before the warm-up wrote reference.pt
    make_config(overrides=["loss_type=ipo", "beta=0.5"])  # a valid choice passes


@pytest.mark.parametrize("algorithm, knob, readers", [
    ("kto", "loss_type=ipo", "only dpo reads it"),
    ("kto", "loss_type=sigmoid", "only dpo reads it"),        # the default value: still given
    ("kto", "loss_type=bogus", "only dpo reads it"),          # refused before its value
    ("sft", "beta=0.1", "only dpo, kto, orpo and simpo read it"),
    ("rm", "beta=0.5", "only dpo, kto, orpo and simpo read it"),
    ("orpo", "label_smoothing=0.1", "only dpo and simpo read it"),
    ("dpo", "gamma=1.0", "only simpo reads it"),
    ("simpo", "desirable_weight=2", "only kto reads it"),
    ("dpo", "undesirable_weight=1.0", "only kto reads it"),
    ("dpo", "rm_kind=pairwise", "only rm reads it"),
    ("orpo", "reference=model", "only dpo and kto read it"),
    ("sft", "reference=precompute", "only dpo and kto read it"),
])
def test_a_knob_the_algorithm_does_not_read_is_refused(tmp_path, capsys, algorithm, knob,
                                                       readers):
    key = knob.split("=")[0]
    message = f"{key} is not used by algorithm={algorithm} ({readers}); remove it"
    with pytest.raises(ConfigError, match=f"^{re.escape(message)}$"):
        make_config(overrides=[f"algorithm={algorithm}", knob])
    # As a keyword, at its default value: given is given.
    with pytest.raises(ConfigError, match=f"^{key} is not used by algorithm={algorithm} "):
        make_config(algorithm=algorithm, **{key: getattr(TrainConfig(), key)})
    # From the command line: exit status 2, the message on stderr, nothing written.
    assert main(["train", algorithm, f"out_dir={tmp_path}", *SMALL, knob]) == 2
    assert f"alignfuse: config error: {message}" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("algorithm, knobs", [
    ("dpo", {"beta": 0.3, "loss_type": "ipo", "label_smoothing": 0.0, "reference": "model"}),
    ("dpo", {"loss_type": "sigmoid", "label_smoothing": 0.1}),
    ("kto", {"beta": 0.2, "desirable_weight": 1.5, "undesirable_weight": 0.5,
             "reference": "precompute"}),
    ("orpo", {"beta": 0.2}),
    ("simpo", {"beta": 2.0, "gamma": 1.0, "label_smoothing": 0.1}),
    ("rm", {"rm_kind": "listwise"}),
])
def test_a_knob_is_accepted_by_the_algorithms_that_read_it(algorithm, knobs):
    overrides = [f"{key}={value}" for key, value in knobs.items()]
    cfg = make_config(overrides=[f"algorithm={algorithm}", *overrides])
    assert {key: getattr(cfg, key) for key in knobs} == knobs
    assert make_config({"algorithm": algorithm, **knobs}) == cfg     # YAML mapping
    assert make_config(algorithm=algorithm, **knobs) == cfg          # keywords


def test_knobs_left_at_their_defaults_never_raise():
    from alignfuse.engine.cli import DEMO_CONFIG

    for algorithm in ALGORITHMS:
        cfg = make_config(overrides=[f"algorithm={algorithm}", "steps=3", "lr=1e-3"])
        assert (cfg.loss_type, cfg.gamma, cfg.rm_kind) == ("sigmoid", 0.5, "pairwise")
    assert make_config(DEMO_CONFIG).beta == 0.1  # the demo (DPO) sets beta, which DPO reads
    # A config built in code from every field (as a checkpoint's config holds them all) is
    # not refused: only the keys given to make_config are checked.
    full = dataclasses.asdict(TrainConfig(algorithm="sft", loss_type="ipo", gamma=1.0))
    assert TrainConfig(**full).validate().loss_type == "ipo"


def test_a_config_file_with_a_knob_the_algorithm_does_not_read_is_refused(tmp_path, capsys):
    config = tmp_path / "kto.yaml"
    config.write_text("algorithm: kto\nsteps: 2\nbeta: 0.2\nlabel_smoothing: 0.1\n")
    run = f"out_dir={tmp_path / 'run'}"
    assert main(["train", "kto", "--config", str(config), run, *SMALL]) == 2
    assert ("config error: label_smoothing is not used by algorithm=kto (only dpo and simpo "
            "read it); remove it") in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
    with pytest.raises(ConfigError, match="^label_smoothing is not used by algorithm=kto"):
        make_config({"algorithm": "kto", "label_smoothing": 0.1})
    # The same file for an algorithm that reads every key in it passes the config stage.
    config.write_text("algorithm: simpo\nsteps: 2\nbeta: 0.2\nlabel_smoothing: 0.1\n")
    assert make_config(load_config_file(config), algorithm="simpo").label_smoothing == 0.1


def test_the_knob_table_is_what_make_algorithm_reads(monkeypatch):
    """ALGORITHM_KNOBS matches the code: give each knob a value of its own, build every
    algorithm through make_algorithm with recording stand-ins for the classes, and see which
    values reach which algorithm. (`reference` is read by `train`, not make_algorithm.)"""
    from alignfuse.engine import algorithms
    from alignfuse.engine.loop import make_algorithm

    calls = {}
    for name in ("SFT", "RewardModel", "DPO", "KTO", "ORPO", "SimPO"):
        monkeypatch.setattr(algorithms, name,
                            lambda *args, _name=name, **kwargs: calls.setdefault(_name, kwargs))
    distinct = {"beta": 0.123, "loss_type": "ipo", "label_smoothing": 0.0456, "gamma": 0.789,
                "desirable_weight": 1.25, "undesirable_weight": 2.5, "rm_kind": "listwise"}
    assert set(distinct) == set(ALGORITHM_KNOBS) - {"reference", "ties"}
    for algorithm in ALGORITHMS:
        calls.clear()
        make_algorithm(TrainConfig(algorithm=algorithm, **distinct), torch.nn.Linear(1, 1))
        (passed,) = calls.values()
        read = {key for key, value in distinct.items() if value in passed.values()}
        assert read == {key for key in distinct if algorithm in ALGORITHM_KNOBS[key]}, algorithm
    assert ALGORITHM_KNOBS["reference"] == ("dpo", "kto")  # train(): needs_reference


def test_the_ties_knob_is_what_load_records_reads(monkeypatch, tmp_path):
    """`ties` reaches load_dpo for exactly the algorithms ALGORITHM_KNOBS names (rm: the
    pairwise kind); the others load data that has no pairs."""
    from alignfuse.engine import data
    from alignfuse.engine.loop import load_records

    source = tmp_path / "d.jsonl"
    source.write_text("{}\n")
    read = set()
    monkeypatch.setattr(data, "load_dpo", lambda path, **kw: read.add(kw.get("ties")))
    for name in ("load_sft", "load_kto", "load_scored", "load_ranked"):
        monkeypatch.setattr(data, name, lambda path, **kw: kw and read.add("other"))
    for algorithm in ALGORITHMS:
        for rm_kind in ("pointwise", "pairwise", "listwise"):
            read.clear()
            load_records(TrainConfig(algorithm=algorithm, rm_kind=rm_kind, ties="keep"),
                         str(source), evaluation=False)
            reads = algorithm in ALGORITHM_KNOBS["ties"] and (algorithm != "rm"
                                                               or rm_kind == "pairwise")
            assert read == ({"keep"} if reads else set()), (algorithm, rm_kind)


def test_cli_reports_config_errors_with_the_key(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("algorithm: dpo\nbeta: [1, 2]\n")
    assert main(["train", "dpo", "--config", str(config)]) == 2
    assert "beta must be float" in capsys.readouterr().err
    config.write_text("algorithm: dpo\n  bad: : yaml\n")
    assert main(["train", "dpo", "--config", str(config)]) == 2
    assert "not valid YAML" in capsys.readouterr().err
    assert main(["train", "sft", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_cli_reports_usage_mistakes_as_config_errors(tmp_path, capsys, monkeypatch):
    run = f"out_dir={tmp_path / 'run'}"
    assert main(["train", "sft", "--resume", run, *SMALL]) == 2
    assert "resume: no checkpoint under" in capsys.readouterr().err
    assert main(["train", "dpo", "algorithm=sft", run, *SMALL]) == 2
    assert "the command line says algorithm='sft' but the command is `train dpo`" in \
        capsys.readouterr().err
    config = tmp_path / "c.yaml"
    config.write_text("algorithm: dpo\n")
    assert main(["train", "grpo", "--config", str(config), run]) == 2
    assert "says algorithm='dpo' but the command is `train grpo`" in capsys.readouterr().err
    assert main(["demo", "algorithm=kto", run]) == 2  # the demo is DPO (it printed DPO results)
    assert "says algorithm='kto' but the command is `demo --task dpo`" in capsys.readouterr().err
    assert main(["demo", "--task", "grpo", "algorithm=ppo", run]) == 2
    assert "but the command is `demo --task grpo`" in capsys.readouterr().err
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["train", "sft", "device=cuda", run, *SMALL]) == 2
    assert "torch sees no CUDA device" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="device must be a torch device"):
        make_config(overrides=["device=gpu"])
    # A record longer than a micro-batch: the message names the config key to change.
    assert main(["train", "dpo", run, *SMALL, "max_tokens=8"]) == 2
    err = capsys.readouterr().err
    assert "max_tokens=8 is too small" in err and "truncate" not in err


def test_malformed_data_stops_the_run_before_training(tmp_path):
    data = tmp_path / "pairs.jsonl"
    data.write_text('{"instruction": "1+1=", "chosen": "2", "rejected": "3"}\n'
                    '{"instruction": "2+2=", "chosen": 4, "rejected": "5"}\n')
    cfg = make_config(overrides=[f"data={data}", f"out_dir={tmp_path / 'run'}", *SMALL])
    with pytest.raises(DataFormatError, match=r"pairs.jsonl: line 2: field 'chosen'"):
        train(cfg)
    assert not (tmp_path / "run" / "checkpoints").exists()
    with pytest.raises(ConfigError, match="data: file .* does not exist"):
        train(make_config(overrides=[f"data={tmp_path / 'nope.jsonl'}", *SMALL]))
    with pytest.raises(ConfigError, match="^eval_data: file .* does not exist"):
        train(make_config(overrides=[f"eval_data={tmp_path / 'nope.jsonl'}",
                                     f"out_dir={tmp_path / 'run'}", *SMALL]))


def test_data_order_is_a_function_of_the_step():
    a = [records_for_step(50, 8, seed=3, step=s) for s in range(12)]
    b = [records_for_step(50, 8, seed=3, step=s) for s in range(12)]
    assert a == b
    epoch = sorted(sum(a[:6], []))
    assert len(set(epoch)) == 48  # one epoch: no record twice


def test_checkpoint_is_atomic(tmp_path, monkeypatch):
    root = tmp_path / "ck"
    ckpt.save_checkpoint(root, 1, {"value": torch.tensor([1.0])})
    real_replace = os.replace

    def crash_on_directory(src, dst):
        if Path(src).is_dir():
            raise OSError("simulated crash while switching the checkpoint")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crash_on_directory)
    with pytest.raises(OSError, match="simulated"):
        ckpt.save_checkpoint(root, 2, {"value": torch.tensor([2.0])})
    monkeypatch.setattr(os, "replace", real_replace)
    state = ckpt.load_checkpoint(root)
    assert state["step"] == 1 and float(state["value"]) == 1.0
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-000001"]
    ckpt.save_checkpoint(root, 2, {"value": torch.tensor([2.0])})
    assert ckpt.load_checkpoint(root)["step"] == 2


def test_checkpoint_pruning_orders_by_step_and_keeps_the_new_one(tmp_path):
    root = tmp_path / "ck"
    # Left over from an older run into the same folder: higher-numbered than the new run's.
    for step in (3, 4):
        ckpt.save_checkpoint(root, step, {"value": torch.tensor([float(step)])})
    ckpt.save_checkpoint(root, 1, {"value": torch.tensor([1.0])})
    assert ckpt.load_checkpoint(root)["step"] == 1
    ckpt.save_checkpoint(root, 2, {"value": torch.tensor([2.0])})
    assert sorted(p.name for p in root.glob("step-*")) == ["step-000001", "step-000002"]
    # Past 999999 the name outgrows its width and no longer sorts by step.
    for step in (999_999, 1_000_000, 1_000_001):
        ckpt.save_checkpoint(root, step, {"value": torch.tensor([float(step)])})
    assert sorted(p.name for p in root.glob("step-*")) == ["step-1000000", "step-1000001"]
    assert ckpt.load_checkpoint(root)["step"] == 1_000_001


def test_checkpoint_removes_temp_dirs_of_killed_saves(tmp_path):
    root = tmp_path / "ck"
    ckpt.save_checkpoint(root, 1, {"value": torch.tensor([1.0])})
    (root / ".step-000002.abc123").mkdir()  # a save SIGKILLed before its rename
    (root / ".step-000002.abc123" / ckpt.STATE).write_bytes(b"torn")
    (root / ".latest.k1ll3d.tmp").write_bytes(b"step-0")  # a pointer write killed before its rename
    ckpt.save_checkpoint(root, 2, {"value": torch.tensor([2.0])})
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-000001", "step-000002"]


def test_metrics_resume_drops_a_torn_last_line_and_rewrites_atomically(tmp_path, monkeypatch):
    from alignfuse.engine.metrics import MetricsLogger

    logger = MetricsLogger(tmp_path, tensorboard=False)
    for step in (1, 2, 3):
        logger.log(step, {"loss": 1.0 / step})
    logger.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "split": "tr')  # killed in the middle of a write
    before = (tmp_path / "metrics.jsonl").read_text()

    def killed(src, dst):
        raise OSError("killed while switching the file")

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(OSError, match="killed"):
        MetricsLogger(tmp_path, tensorboard=False, resume_step=2)
    assert (tmp_path / "metrics.jsonl").read_text() == before  # untouched by the failed cut
    monkeypatch.undo()
    MetricsLogger(tmp_path, tensorboard=False, resume_step=2).close()
    assert [row["step"] for row in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2]


def _cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "alignfuse.engine.cli", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=600)


def _train_rows(path: Path) -> list[dict]:
    return [{k: v for k, v in row.items() if k != "tokens_per_s"}
            for row in read_metrics(path) if row["split"] == "train"]


def assert_same_run(full: Path, cut: Path, steps: int) -> None:
    a = ckpt.load_checkpoint(full / "checkpoints", restore_rng=False)
    b = ckpt.load_checkpoint(cut / "checkpoints", restore_rng=False)
    assert a["step"] == b["step"] == steps
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(sa["exp_avg"], sb["exp_avg"])
        assert torch.equal(sa["exp_avg_sq"], sb["exp_avg_sq"])
    assert a["scheduler"] == b["scheduler"]
    assert _train_rows(full / "metrics.jsonl") == _train_rows(cut / "metrics.jsonl")


def test_crashed_run_resumes_exactly(tmp_path):
    """A run that dies after step 3 (checkpoint at 2) and is resumed ends bit-identical to
    the uninterrupted run: model, optimizer, scheduler, RNG and data position restored."""
    common = [*SMALL, "steps=4", "save_every=2", "eval_every=0"]
    full = _cli(["train", "dpo", f"out_dir={tmp_path / 'full'}", *common], tmp_path)
    assert full.returncode == 0, full.stderr[-3000:]
    crashed = _cli(["train", "dpo", f"out_dir={tmp_path / 'cut'}", *common,
                    "crash_after_steps=3"], tmp_path)
    assert crashed.returncode != 0 and "injected crash" in crashed.stderr
    assert (tmp_path / "cut" / "checkpoints" / "latest").read_text() == "step-000002"
    resumed = _cli(["train", "dpo", "--resume", f"out_dir={tmp_path / 'cut'}", *common],
                   tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_run(tmp_path / "full", tmp_path / "cut", 4)
    # Resuming the finished run evaluates again and replaces its final eval row, not adds one.
    again = _cli(["train", "dpo", "--resume", f"out_dir={tmp_path / 'cut'}", *common], tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    steps = [[(row["split"], row["step"]) for row in read_metrics(tmp_path / run / "metrics.jsonl")]
             for run in ("full", "cut")]
    assert steps[0] == steps[1] and steps[0].count(("eval", 4)) == 1, steps


def test_sigkilled_run_resumes_exactly(tmp_path):
    """SIGKILL at an arbitrary moment (possibly mid-checkpoint): the resumed run still ends
    bit-identical to the uninterrupted one."""
    common = [*SMALL, "steps=6", "save_every=1", "eval_every=0", "sft_warmup_steps=0"]
    full = _cli(["train", "sft", f"out_dir={tmp_path / 'full'}", *common], tmp_path)
    assert full.returncode == 0, full.stderr[-3000:]
    proc = subprocess.Popen([sys.executable, "-m", "alignfuse.engine.cli", "train", "sft",
                             f"out_dir={tmp_path / 'cut'}", *common], cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    latest = tmp_path / "cut" / "checkpoints" / "latest"
    deadline = time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline:
        if latest.exists() and latest.read_text() >= "step-000002":
            break
        time.sleep(0.02)
    proc.kill()
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    killed_at = latest.read_text()
    assert "step-000002" <= killed_at < "step-000006"
    resumed = _cli(["train", "sft", "--resume", f"out_dir={tmp_path / 'cut'}", *common],
                   tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_run(tmp_path / "full", tmp_path / "cut", 6)


def test_resume_refuses_a_changed_config(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="resume: no checkpoint under"):
        train(make_config(overrides=[*SMALL, f"out_dir={tmp_path}"]), resume=True)
    common = [*SMALL, "steps=2", f"out_dir={tmp_path}"]
    train(make_config(overrides=common))
    with pytest.raises(ConfigError, match=r"differs from the checkpoint's in \['beta'\]"):
        train(make_config(overrides=[*common, "beta=0.5"]), resume=True)
    # The LR schedule decays over `steps`: another value is a different run.
    with pytest.raises(ConfigError, match=r"in \['steps'\] \(steps: 2 -> 4\)"):
        train(make_config(overrides=[*common, "steps=4"]), resume=True)
    # A knob DPO does not read does not change the numbers: a checkpoint that holds another
    # value of it (one made before such knobs were refused) still resumes.
    summary = train(dataclasses.replace(make_config(overrides=common), gamma=0.9,
                                        rm_kind="listwise"), resume=True)
    assert summary["train"] == {}
    # A checkpoint made before a key existed (its config lacks it) had that key's default
    # behaviour: it resumes with the default, and is refused with another value.
    state_file = max((tmp_path / "checkpoints").glob("step-*")) / "state.pt"
    state = torch.load(state_file, weights_only=False)
    del state["config"]["disable_dropout"]
    torch.save(state, state_file)
    assert train(make_config(overrides=common), resume=True)["train"] == {}
    with pytest.raises(ConfigError, match=r"in \['disable_dropout'\] "
                                          r"\(disable_dropout: True -> False\)"):
        train(make_config(overrides=[*common, "disable_dropout=false"]), resume=True)
    # The same folder, spelled otherwise, is the same run.
    monkeypatch.chdir(tmp_path.parent)
    for spelling in (tmp_path.name, f"./{tmp_path.name}"):
        summary = train(make_config(overrides=[*SMALL, "steps=2", f"out_dir={spelling}"]),
                        resume=True)
        assert summary["train"] == {}  # already at its last step: nothing left to train


def test_demo_at_reduced_size(tmp_path, capsys):
    """The main job, shrunk: it runs end to end and DPO learns the training pairs. (At this
    size the held-out prompts do not improve yet; the full demo's numbers are in README.)"""
    rc = main(["demo", f"out_dir={tmp_path}", "num_examples=128", "steps=20",
               "sft_warmup_steps=20", "eval_every=10", "batch_size=16", "progress=false",
               "tensorboard=false", "lr=2e-3", "beta=0.2", "num_threads=1"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "before -> after dpo" in out and "reward accuracy" in out
    rows = read_metrics(tmp_path / "metrics.jsonl")
    evals = [r for r in rows if r["split"] == "eval"]
    assert [r["step"] for r in evals] == [0, 10, 20]
    # Before DPO the policy IS the reference: every implicit reward is exactly 0.
    assert evals[0]["rewards/accuracy"] == 0.0 and evals[0]["rewards/margin"] == 0.0
    train_rows = [r for r in rows if r["split"] == "train"]
    assert len(train_rows) == 20
    late = train_rows[-10:]
    assert sum(r["rewards/margin"] for r in late) / len(late) > 0.05
    assert sum(r["rewards/accuracy"] for r in late) / len(late) > 0.55
    assert sum(r["loss"] for r in late) / len(late) < 0.69  # below log 2, the starting loss
    assert (tmp_path / "curves.png").stat().st_size > 1000


@pytest.mark.parametrize("algorithm", ["sft", "sft-alpaca", "rm", "rm-pointwise",
                                       "rm-listwise", "kto", "orpo", "simpo"])
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_every_algorithm_trains_from_the_command_line(tmp_path, algorithm, lora):
    extra = ["lora_r=2"] if lora else []
    if algorithm == "sft-alpaca":  # SFT's own records: instruction, input, output
        data = tmp_path / "sft.jsonl"
        data.write_text("".join(f'{{"instruction": "add", "input": "{a}+{b}=", '
                                f'"output": "{a + b}"}}\n' for a in range(4) for b in range(3)))
        algorithm, extra = "sft", [*extra, f"data={data}"]
    if algorithm == "rm-pointwise":
        data = tmp_path / "scored.jsonl"
        data.write_text("".join(f'{{"prompt": "{a}+1=", "completion": "{a + 1 + b}", '
                                f'"score": {1.0 - b}}}\n' for a in range(5) for b in range(2)))
        algorithm, extra = "rm", [*extra, f"data={data}", "rm_kind=pointwise"]
    if algorithm == "rm-listwise":
        data = tmp_path / "ranked.jsonl"
        data.write_text("".join(f'{{"prompt": "{a}+2=", "responses": ["{a + 2}", "{a + 3}", '
                                f'"{a + 9}"]}}\n' for a in range(6)))
        algorithm, extra = "rm", [*extra, f"data={data}", "rm_kind=listwise"]
    if algorithm == "kto":
        data = tmp_path / "kto.jsonl"
        data.write_text("".join(
            f'{{"instruction": "{a}+{b}=", "output": "{a + b + (a % 2)}", '
            f'"kto_tag": {"true" if a % 2 == 0 else "false"}}}\n'
            for a in range(4) for b in range(3)))
        extra = [*extra, f"data={data}"]
    rc = main(["train", algorithm, f"out_dir={tmp_path / 'run'}", "steps=2", *SMALL, *extra])
    assert rc == 0
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in rows if r["split"] == "train"] == [1, 2]
    assert all(r["loss"] is not None for r in rows)
    assert (tmp_path / "run" / "adapter").is_dir() == lora
    if lora:  # the adapters alone (and a reward model's head) were trained and saved
        state = ckpt.load_checkpoint(tmp_path / "run" / "checkpoints", restore_rng=False)
        assert all(".lora_" in n or ".reward_head." in n for n in state["model"])


def test_a_model_that_runs_padded_is_packed_padded_everywhere(tmp_path, monkeypatch):
    """When the model runs on padded rows (`runs_padded`), every pack of the loop budgets the
    padded rows: SFT warm-up, reference log-probs, evaluation and training; and a record
    too wide for max_tokens in padded rows is a config error naming it."""
    from alignfuse.engine import data, forward, loop

    monkeypatch.setattr(forward, "runs_padded", lambda model, device=None: True)
    calls = []
    real_pack = data.TokenizedDataset.pack
    monkeypatch.setattr(data.TokenizedDataset, "pack",
                        lambda self, *a, **k: calls.append(k) or real_pack(self, *a, **k))
    rc = main(["train", "dpo", f"out_dir={tmp_path / 'run'}", "steps=2", "eval_every=1",
               "reference=precompute", *SMALL])
    assert rc == 0
    assert len(calls) >= 2 + 2 + 2 + 2  # warm-up, references, evaluations, steps
    assert all(k.get("padded") is True for k in calls)
    records = [data.PreferenceRecord("1+1=", "2" * 20, "3")]
    cfg = loop.make_config(algorithm="dpo", max_tokens=40)
    tokenizer = loop.load_model_and_tokenizer(cfg)[1]
    assert loop.build_dataset(cfg, records, tokenizer).num_records == 1
    with pytest.raises(loop.ConfigError, match=r"max_tokens=40 is too small: record 0 needs "
                                               r"\d+ padded slots \(2 sequences"):
        loop.build_dataset(cfg, records, tokenizer, padded=True)


def test_logged_lr_is_the_rate_the_step_ran_at(tmp_path):
    train(make_config(overrides=[*SMALL, "algorithm=sft", "sft_warmup_steps=0", "steps=3",
                                 "warmup_steps=2", "lr=1e-3", f"out_dir={tmp_path}"]))
    rows = [r for r in read_metrics(tmp_path / "metrics.jsonl") if r["split"] == "train"]
    # Linear warm-up over 2 steps, then the decay starts from the full rate.
    assert [r["lr"] for r in rows] == pytest.approx([5e-4, 1e-3, 1e-3])


def test_builtin_tasks_have_checkable_answers():
    from alignfuse.engine.tasks import (addition_preferences, arithmetic_problems,
                                        arithmetic_reward, held_out_addition_prompts, solve)

    held_out = held_out_addition_prompts()
    train_pairs = addition_preferences(300, seed=1, exclude=held_out)
    eval_pairs = addition_preferences(50, seed=2, only=held_out)
    assert not {p.prompt for p in train_pairs} & held_out
    assert {p.prompt for p in eval_pairs} <= held_out
    for pair in train_pairs + eval_pairs:
        assert arithmetic_reward(pair.prompt, pair.chosen) == 1.0
        assert arithmetic_reward(pair.prompt, pair.rejected) == 0.0
    for problem in arithmetic_problems(40, seed=3, ops="+-*"):
        right = str(problem["answer"])
        assert arithmetic_reward(problem["prompt"], right + "<eos>junk") == 1.0
        assert arithmetic_reward(problem["prompt"], str(problem["answer"] + 1)) == 0.0
        assert arithmetic_reward(problem["prompt"], "no number") == 0.0
    assert solve("12-30=") == -18
    with pytest.raises(ValueError, match="prompt must look like"):
        solve("what is 2+2?")


def test_bfloat16_steps_fp32_master_weights_and_resumes_them_exactly(tmp_path):
    """dtype=bfloat16: the model computes in bf16, AdamW updates fp32 masters. At lr 1e-4
    an RMSNorm weight of 1.0 moves by ~1e-4 a step, under half a bf16 step (2^-8): the bf16
    weight stays 1.0 while its master moves (bf16 AdamW alone would lose every such
    update). The masters are checkpointed: a crashed run resumes bit-identical."""
    common = [*SMALL, "dtype=bfloat16", "lr=1e-4", "steps=3", "save_every=1",
              "eval_every=0", "sft_warmup_steps=0"]
    train(make_config(overrides=[*common, f"out_dir={tmp_path / 'full'}"]))
    full = ckpt.load_checkpoint(tmp_path / "full" / "checkpoints", restore_rng=False)
    names = list(full["model"])
    assert all(t.dtype == torch.bfloat16 for t in full["model"].values())
    masters = dict(zip(names, full["master"]))  # every parameter is trainable here
    assert len(masters) == len(names) and all(m.dtype == torch.float32 for m in masters.values())
    norms = [n for n in names if n.endswith("norm.weight")]
    assert norms
    for n in norms:
        assert torch.equal(full["model"][n], torch.ones_like(full["model"][n])), n
        assert (masters[n] != 1.0).any(), n
    for n in names:  # the model holds its masters rounded to bf16
        assert torch.equal(full["model"][n], masters[n].to(torch.bfloat16)), n
    with pytest.raises(RuntimeError, match="injected crash"):
        train(make_config(overrides=[*common, f"out_dir={tmp_path / 'cut'}",
                                     "crash_after_steps=2"]))
    train(make_config(overrides=[*common, f"out_dir={tmp_path / 'cut'}"]), resume=True)
    cut = ckpt.load_checkpoint(tmp_path / "cut" / "checkpoints", restore_rng=False)
    assert all(torch.equal(a, b) for a, b in zip(full["master"], cut["master"]))
    assert_same_run(tmp_path / "full", tmp_path / "cut", 3)


def test_float16_training_is_refused_with_the_reason():
    with pytest.raises(ConfigError, match="dtype=float16 cannot train here.*bfloat16"):
        make_config(overrides=["dtype=float16"])


@pytest.mark.parametrize("disable", [True, False])
def test_dropout_is_off_unless_asked_for(tmp_path, monkeypatch, disable):
    """A model with attention and module dropout: the first DPO step's policy IS the
    reference, so its implicit rewards are 0 (to rounding: the reference log-probs were
    packed otherwise), unless dropout (left on with disable_dropout=false) makes the
    training forward differ from the reference's."""
    from alignfuse.engine import tiny

    real = tiny.tiny_model

    def with_dropout(*args, **kwargs):
        model = real(*args, **kwargs)
        model.config.attention_dropout = 0.3
        for layer in model.model.layers:
            layer.self_attn.attention_dropout = 0.3
            layer.mlp.down_proj = torch.nn.Sequential(layer.mlp.down_proj,
                                                      torch.nn.Dropout(0.2))
        return model

    monkeypatch.setattr(tiny, "tiny_model", with_dropout)
    train(make_config(overrides=[*SMALL, "steps=1", "sft_warmup_steps=0", "eval_every=0",
                                 f"disable_dropout={str(disable).lower()}",
                                 f"out_dir={tmp_path}"]))
    (row,) = _train_rows(tmp_path / "metrics.jsonl")
    rewards = max(abs(row["rewards/chosen"]), abs(row["rewards/rejected"]))
    assert rewards < 1e-6 if disable else rewards > 1e-3, rewards


def test_disable_dropout_zeroes_modules_attributes_and_config():
    from alignfuse.engine import disable_dropout
    from alignfuse.engine.tiny import tiny_model

    model = tiny_model("llama", 31, seed=0)
    model.config.attention_dropout = 0.1
    model.model.layers[0].self_attn.attention_dropout = 0.1
    model.extra = torch.nn.Dropout(0.5)
    assert disable_dropout(model) == 2
    assert model.extra.p == 0.0 and model.model.layers[0].self_attn.attention_dropout == 0.0
    assert model.config.attention_dropout == 0.0
    assert disable_dropout(model) == 0


def test_a_token_id_past_the_models_embeddings_is_a_config_error(tmp_path, monkeypatch):
    """A tokenizer with tokens the model has no embedding rows for (added, not resized):
    named up front, not an IndexError deep in torch (a device assert on a GPU)."""
    from alignfuse.engine import loop

    real = loop.load_model_and_tokenizer

    def small_embeddings(cfg):
        model, tokenizer = real(cfg)
        model.resize_token_embeddings(8)  # the addition task uses ids past 8 ("3" is 9)
        return model, tokenizer

    monkeypatch.setattr(loop, "load_model_and_tokenizer", small_embeddings)
    with pytest.raises(ConfigError, match=r"data: record \d+ has token id \d+, but the "
                                          r"model's input embeddings have \d+ rows"):
        train(make_config(overrides=[*SMALL, "steps=1", f"out_dir={tmp_path}"]))


def test_the_trained_model_is_exported_for_from_pretrained_and_a_next_run(tmp_path, capsys):
    """The end of a run writes out_dir/model (save_pretrained: weights and tokenizer): it
    loads with from_pretrained, gives the trained model's logits, and a later run (SFT, then
    DPO from it) takes it as `model=`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert main(["train", "sft", f"out_dir={tmp_path / 'sft'}", "steps=2", *SMALL]) == 0
    assert f"model:   {tmp_path / 'sft' / 'model'}" in capsys.readouterr().out
    state = ckpt.load_checkpoint(tmp_path / "sft" / "checkpoints", restore_rng=False)
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "sft" / "model")
    assert set(state["model"]) >= set(exported.state_dict())
    for name, tensor in exported.state_dict().items():
        assert torch.equal(tensor, state["model"][name]), name
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "sft" / "model")
    assert tokenizer("1+2=")["input_ids"][-4:] == [7, 69, 8, 73]
    assert not [p for p in (tmp_path / "sft").iterdir() if p.name.startswith(".model")]
    assert main(["train", "dpo", f"out_dir={tmp_path / 'dpo'}", "steps=1", *SMALL,
                 f"model={tmp_path / 'sft' / 'model'}"]) == 0
    assert main(["train", "sft", f"out_dir={tmp_path / 'off'}", "steps=1", *SMALL,
                 "export_model=false"]) == 0
    assert not (tmp_path / "off" / "model").exists()


def test_resume_refuses_data_that_changed_since_the_checkpoint(tmp_path):
    data = tmp_path / "pairs.jsonl"
    rows = [f'{{"instruction": "{a}+{b}=", "chosen": "{a + b}", "rejected": "{a + b + 1}"}}\n'
            for a in range(4) for b in range(4)]
    data.write_text("".join(rows))
    common = [*SMALL, "steps=2", "save_every=1", "sft_warmup_steps=0", f"data={data}",
              f"out_dir={tmp_path / 'run'}"]
    with pytest.raises(RuntimeError, match="injected crash"):
        train(make_config(overrides=[*common, "crash_after_steps=1"]))
    data.write_text("".join(rows[:-1]))  # one record fewer
    with pytest.raises(ConfigError, match=r"resume: data='.*pairs.jsonl' changed since the "
                                          r"checkpoint"):
        train(make_config(overrides=common), resume=True)
    data.write_text("".join(rows))  # restored: the run resumes
    assert train(make_config(overrides=common), resume=True)["train"]["loss"] > 0


LORA = ["lora_r=4", "lora_alpha=8", "lr=5e-3"]


def test_lora_trains_the_adapters_alone_resumes_exactly_and_exports_both_forms(tmp_path):
    """lora_r > 0: the base (the warmed-up model, reference.pt) stays frozen and checkpoints
    hold the adapters alone; a crashed run resumes bit-identical (its base rebuilt from
    reference.pt). The run ends with the adapter folder, which PEFT loads onto the base,
    and the merged model, which gives the same logits. Gradient checkpointing, on for the
    uninterrupted run only, changes none of the numbers."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from alignfuse.engine.tiny import tiny_model, tiny_tokenizer

    common = [*SMALL, *LORA, "steps=4", "save_every=2", "eval_every=0"]
    summary = train(make_config(overrides=[*common, f"out_dir={tmp_path / 'full'}",
                                           "gradient_checkpointing=true"]))
    assert summary["model"].is_gradient_checkpointing
    crashed = _cli(["train", "dpo", f"out_dir={tmp_path / 'cut'}", *common,
                    "crash_after_steps=3"], tmp_path)
    assert crashed.returncode != 0 and "injected crash" in crashed.stderr
    resumed = _cli(["train", "dpo", "--resume", f"out_dir={tmp_path / 'cut'}", *common],
                   tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "adapter: " in resumed.stdout
    assert_same_run(tmp_path / "full", tmp_path / "cut", 4)

    full = tmp_path / "full"
    state = ckpt.load_checkpoint(full / "checkpoints", restore_rng=False)
    assert state["model"] and all(".lora_A." in n or ".lora_B." in n for n in state["model"])
    base_weights = torch.load(full / "reference.pt")
    merged = AutoModelForCausalLM.from_pretrained(full / "model")
    adapted = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    for name, tensor in merged.state_dict().items():
        if name.split(".")[-2] in adapted:  # all-linear: every linear layer but the head
            assert not torch.equal(tensor, base_weights[name]), name
        else:
            assert torch.equal(tensor, base_weights[name]), name
    base = tiny_model("llama", len(tiny_tokenizer()))
    base.load_state_dict(base_weights)
    with_adapter = PeftModel.from_pretrained(base, full / "adapter").eval()
    ids = torch.tensor([tiny_tokenizer()("3+4=7")["input_ids"]])
    with torch.no_grad():
        assert_rel_close(merged(ids).logits, with_adapter(ids).logits, 1e-5, "merged logits")
    rows = [row for row in read_metrics(full / "metrics.jsonl") if row["split"] == "eval"]
    assert rows[-1]["loss"] < rows[0]["loss"], rows  # the adapters learned


def test_lora_keys_are_checked_before_training(tmp_path):
    with pytest.raises(ConfigError, match="lora_alpha is not used with lora_r=0"):
        make_config(overrides=["lora_alpha=8"])
    with pytest.raises(ConfigError, match="lora_targets is not used with lora_r=0"):
        make_config({"lora_targets": "q_proj"})
    with pytest.raises(ConfigError, match="^lora_r must be >= 0"):
        make_config(overrides=["lora_r=-1"])
    with pytest.raises(ConfigError, match="^lora_alpha must be > 0"):
        make_config(overrides=["lora_r=4", "lora_alpha=0"])
    run = [*SMALL, "steps=1", "lora_r=4", f"out_dir={tmp_path}"]
    # PEFT alone would adapt q_proj and silently skip the misspelt name.
    with pytest.raises(ConfigError, match="'vproj' matches no module.*did you mean v_proj"):
        train(make_config(overrides=[*run, "lora_targets=q_proj,vproj"]))
    with pytest.raises(ConfigError, match="'lm_head' is the LM head"):
        train(make_config(overrides=[*run, "lora_targets=q_proj,lm_head"]))
    assert not (tmp_path / "reference.pt").exists()  # refused before the warm-up
    summary = train(make_config(overrides=[*run, "lora_targets=q_proj,v_proj",
                                           "algorithm=sft", "dtype=bfloat16"]))
    adapters = [n for n, p in summary["model"].named_parameters()]  # merged: plain again
    assert not any("lora_" in n for n in adapters)
    state = ckpt.load_checkpoint(tmp_path / "checkpoints", restore_rng=False)
    assert sorted({n.split(".")[-4] for n in state["model"]}) == ["q_proj", "v_proj"]
    # PEFT keeps the adapters in fp32 under a bf16 base: they are their own masters.
    assert all(t.dtype == torch.float32 for t in state["model"].values()) and not state["master"]


def test_a_lora_reward_model_trains_its_head_whole_and_saves_it_with_the_adapters(tmp_path):
    """The reward head is not a LoRA target: it trains whole beside the adapters (PEFT's
    modules_to_save) and is in the adapter folder too, not only in the merged model."""
    from safetensors.torch import load_file

    train(make_config(overrides=[*SMALL, *LORA, "algorithm=rm", "steps=2",
                                 f"out_dir={tmp_path}"]))
    merged = load_file(tmp_path / "model" / "model.safetensors")
    adapter = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    for part in ("weight", "bias"):
        head = merged[f"reward_head.{part}"]
        assert head.abs().sum() > 0  # it starts at zero: it trained
        assert torch.equal(adapter[f"base_model.model.reward_head.{part}"], head)


def test_lora_reference_model_is_the_base_at_each_step(tmp_path):
    """With lora_r, reference=model computes the base's log-probs at each step with the
    adapters off (BaseReference, no copy of the model): the same run as precomputing them."""
    runs = {}
    for reference in ("precompute", "model"):
        out = tmp_path / reference
        train(make_config(overrides=[*SMALL, *LORA, "steps=3", f"reference={reference}",
                                     f"out_dir={out}"]))
        runs[reference] = _train_rows(out / "metrics.jsonl")
    assert len(runs["model"]) == 3 and runs["model"][-1]["rewards/margin"] != 0
    for live, saved in zip(runs["model"], runs["precompute"]):
        for key, value in saved.items():
            if isinstance(value, float) and key != "tokens_per_s":
                assert live[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
