"""Data loaders: JSONL and datasets.Dataset shapes, chat-template tokenization, prompt
masking through packing, and malformed records named by file, line and field."""

from __future__ import annotations

import json
import re
import warnings

import pytest
import torch

from alignfuse.engine.data import (DataError, DataFormatError, DataWarning, KTORecord,
                                   PreferenceRecord,
                                   RankedRecord, ScoredRecord, SFTRecord,
                                   PromptRecord, encode_prompt, encode_prompt_completion,
                                   load_dpo, load_kto, load_prompts, load_ranked, load_scored,
                                   load_sft, tokenize_records)
from alignfuse.engine.tiny import tiny_tokenizer

DPO_ROWS = [
    {"instruction": "Add", "input": "2+3", "chosen": "5", "rejected": "6"},
    {"instruction": "Say hi", "input": "", "chosen": "hi", "rejected": "no"},
    {"instruction": "Echo", "chosen": "a b", "rejected": "b"},  # "input" may be left out
]
SFT_ROWS = [  # the Alpaca shape
    {"instruction": "Add", "input": "2+3", "output": "5"},
    {"instruction": "Say hi", "output": "hi"},  # "input" may be left out
]
KTO_ROWS = [
    {"instruction": "Add", "input": "1+1", "output": "2", "kto_tag": True},
    {"instruction": "Add", "input": "1+1", "output": "3", "kto_tag": False},
]
SCORED_ROWS = [
    {"prompt": "2*3=", "completion": "6", "score": 1.0},
    {"prompt": "2*3=", "completion": "5", "score": -0.5},
    {"prompt": "9-9=", "completion": "0", "score": 2},
]
RANKED_ROWS = [
    {"prompt": "Best?", "responses": ["a", "b", "c"]},
    {"prompt": "Order", "responses": ["x", "y", "z"], "ranks": [2, 0, 1]},
]


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "\n")  # trailing blank line
    return str(path)


def test_load_dpo(tmp_path):
    records = load_dpo(write_jsonl(tmp_path / "dpo.jsonl", DPO_ROWS))
    assert records == [PreferenceRecord("Add\n2+3", "5", "6"),
                       PreferenceRecord("Say hi", "hi", "no"),
                       PreferenceRecord("Echo", "a b", "b")]


def test_load_kto(tmp_path):
    records = load_kto(write_jsonl(tmp_path / "kto.jsonl", KTO_ROWS))
    assert records == [KTORecord("Add\n1+1", "2", True), KTORecord("Add\n1+1", "3", False)]


def test_load_scored(tmp_path):
    records = load_scored(write_jsonl(tmp_path / "scored.jsonl", SCORED_ROWS))
    assert records == [ScoredRecord("2*3=", "6", 1.0), ScoredRecord("2*3=", "5", -0.5),
                       ScoredRecord("9-9=", "0", 2.0)]
    assert all(isinstance(r.score, float) for r in records)


def test_load_ranked_puts_responses_best_first(tmp_path):
    records = load_ranked(write_jsonl(tmp_path / "ranked.jsonl", RANKED_ROWS))
    assert records == [RankedRecord("Best?", ("a", "b", "c")),
                       RankedRecord("Order", ("y", "z", "x"))]


@pytest.mark.parametrize("loader, rows, bad_row, field, problem", [
    (load_dpo, DPO_ROWS, {"instruction": "x", "input": "", "rejected": "r"}, "chosen", "missing"),
    (load_dpo, DPO_ROWS, {"instruction": 3, "chosen": "c", "rejected": "r"}, "instruction",
     "expected a string"),
    (load_kto, KTO_ROWS, {"instruction": "x", "output": "o", "kto_tag": "yes"}, "kto_tag",
     "expected a bool"),
    (load_kto, KTO_ROWS, {"instruction": "x", "output": "o", "kto_tag": 1}, "kto_tag",
     "expected a bool"),
    (load_scored, SCORED_ROWS, {"prompt": "p", "completion": "c", "score": "high"}, "score",
     "expected a finite number"),
    (load_scored, SCORED_ROWS, {"prompt": "p", "completion": "c", "score": True}, "score",
     "expected a finite number"),
    (load_scored, SCORED_ROWS, {"prompt": "p", "score": 1.0}, "completion", "missing"),
    (load_ranked, RANKED_ROWS, {"prompt": "p", "responses": ["only one"]}, "responses",
     "list of >= 2 strings"),
    (load_ranked, RANKED_ROWS, {"prompt": "p", "responses": ["a", "b", "c"], "ranks": [0, 0, 1]},
     "ranks", "permutation"),
    # Listwise training packs [prompts, K] blocks: another K would fail mid-run.
    (load_ranked, RANKED_ROWS, {"prompt": "p", "responses": ["a", "b"]}, "responses",
     "expected 3 responses (as on line 1"),
])
def test_malformed_record_names_file_line_and_field(tmp_path, loader, rows, bad_row, field,
                                                    problem):
    # The bad record is the third line, after two good ones (so the whole file is validated).
    path = write_jsonl(tmp_path / "data.jsonl", rows[:2] + [bad_row] + rows[:1])
    with pytest.raises(DataFormatError) as info:
        loader(path)
    err = info.value
    assert (err.source, err.line, err.field) == (path, 3, field)
    message = str(err)
    assert path in message and "line 3" in message and repr(field) in message
    assert problem in message


def test_invalid_json_and_non_object_name_the_line(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text(json.dumps(DPO_ROWS[0]) + "\n" + '{"instruction": "x", \n')
    with pytest.raises(DataFormatError, match=r"broken\.jsonl: line 2: invalid JSON"):
        load_dpo(str(path))
    path.write_text(json.dumps(DPO_ROWS[0]) + "\n[1, 2]\n")
    with pytest.raises(DataFormatError, match=r"line 2: expected a JSON object, got list"):
        load_dpo(str(path))
    path.write_text("\n\n")
    with pytest.raises(ValueError, match="no records"):
        load_dpo(str(path))
    with pytest.raises(TypeError, match="source"):
        load_dpo(42)
    path.write_bytes(json.dumps(DPO_ROWS[0]).encode() + b"\n" + b'{"instruction": "\xff"}\n')
    with pytest.raises(DataFormatError, match=r"broken\.jsonl: line 2: invalid UTF-8"):
        load_dpo(str(path))


def test_chat_template_is_used():
    tokenizer = tiny_tokenizer()
    prompt_ids, completion_ids = encode_prompt_completion(tokenizer, "2+2=", "4")
    decode = lambda ids: tokenizer.decode(ids)  # noqa: E731
    assert decode(prompt_ids) == "<|user|>2+2=<|assistant|>"
    assert decode(completion_ids) == "4<eos>"
    full = tokenizer.apply_chat_template(
        [{"role": "user", "content": "2+2="}, {"role": "assistant", "content": "4"}],
        tokenize=False)
    assert tokenizer(full, add_special_tokens=False)["input_ids"] == prompt_ids + completion_ids


def test_encode_prompt_renders_the_generation_prompt():
    """encode_prompt (what online RL generates from, and the prompt ids offline records get):
    the chat template up to the assistant turn, else the tokenizer's own specials (bos)."""
    tokenizer = tiny_tokenizer()
    for prompt in ("2+2=", "say hi\nplease", ""):
        assert tokenizer.decode(encode_prompt(tokenizer, prompt)) == \
            f"<|user|>{prompt}<|assistant|>"
        assert encode_prompt(tokenizer, prompt) == encode_prompt_completion(tokenizer, prompt,
                                                                            "x")[0]
    tokenizer.chat_template = None
    assert encode_prompt(tokenizer, "2+2=") == tokenizer("2+2=")["input_ids"]


def test_load_prompts_keeps_the_other_fields_for_the_reward(tmp_path):
    rows = [{"prompt": "2+2=", "answer": "4", "tests": [1, 2]},
            {"instruction": "Add", "input": "3+4", "answer": "7"},
            {"instruction": "Say hi", "hint": None}]
    assert load_prompts(write_jsonl(tmp_path / "p.jsonl", rows)) == [
        PromptRecord("2+2=", {"answer": "4", "tests": [1, 2]}),
        PromptRecord("Add\n3+4", {"answer": "7"}),
        PromptRecord("Say hi", {})]
    for bad_row, field, problem in [
            ({"answer": "4"}, "prompt", "missing"),
            ({"prompt": "a", "instruction": "b"}, None, "both 'prompt' and 'instruction'"),
            ({"prompt": "a", "completion": "b"}, "completion", "rename this field"),
            ({"prompt": "a", "my-answer": "b"}, "my-answer", "not a Python identifier"),
            ({"prompt": 3}, "prompt", "expected a string")]:
        path = write_jsonl(tmp_path / "bad.jsonl", [rows[0], bad_row])
        with pytest.raises(DataFormatError, match=re.escape(problem)) as info:
            load_prompts(path)
        assert (info.value.line, info.value.field) == (2, field), bad_row


def test_plain_concatenation_without_chat_template():
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = None
    prompt_ids, completion_ids = encode_prompt_completion(tokenizer, "2+2=", "4")
    assert prompt_ids == tokenizer("2+2=")["input_ids"]
    assert completion_ids == tokenizer("4", add_special_tokens=False)["input_ids"] + \
        [tokenizer.eos_token_id]


def test_tokenized_dpo_packs_pairs_with_prompt_masked(tmp_path):
    tokenizer = tiny_tokenizer()
    records = load_dpo(write_jsonl(tmp_path / "dpo.jsonl", DPO_ROWS))
    data = tokenize_records(records, tokenizer)
    assert len(data) == 2 * len(records) and data.num_records == len(records)
    assert data.extras["chosen"] == [True, False] * len(records)
    batches = data.pack(max_tokens=64)
    seen = []
    for batch in batches:
        # The pair layout the DPO step reads: chosen at an even index, rejected right after.
        assert (batch.seq_index[0::2] % 2 == 0).all()
        assert torch.equal(batch.seq_index[1::2], batch.seq_index[0::2] + 1)
        for k in range(0, batch.num_seqs, 2):  # chosen then rejected, contiguous
            record = int(batch.group_index[k])
            assert int(batch.group_index[k + 1]) == record
            assert bool(batch.extras["chosen"][k]) and not bool(batch.extras["chosen"][k + 1])
            seen.append(record)
        # Loss only on completion tokens: the targets are exactly the completion ids.
        for k, (targets, s) in enumerate(zip(batch.unpack(batch.targets),
                                             batch.seq_index.tolist())):
            kept = targets[targets != -100].tolist()
            assert kept == data.completion_ids[s]
            record = records[int(batch.group_index[k])]
            answer = record.chosen if k % 2 == 0 else record.rejected
            assert tokenizer.decode(kept) == answer + "<eos>"
    assert sorted(seen) == list(range(len(records)))


def test_tokenized_subsets_and_extras(tmp_path):
    tokenizer = tiny_tokenizer()
    scored = tokenize_records(load_scored(write_jsonl(tmp_path / "s.jsonl", SCORED_ROWS)),
                              tokenizer)
    batches = scored.pack([2, 0], max_tokens=32)
    got = {int(g): float(v) for b in batches for g, v in zip(b.group_index, b.extras["score"])}
    assert got == {0: 1.0, 2: 2.0}
    # seq_index names the dataset's sequences, also for a subset.
    assert sorted(i for b in batches for i in b.seq_index.tolist()) == [0, 2]
    ranked = tokenize_records(load_ranked(write_jsonl(tmp_path / "r.jsonl", RANKED_ROWS)),
                              tokenizer)
    (batch,) = ranked.pack(max_tokens=64)
    assert batch.extras["rank"].tolist() == [0, 1, 2, 0, 1, 2]
    assert batch.group_index.tolist() == [0, 0, 0, 1, 1, 1]
    kto = tokenize_records(load_kto(write_jsonl(tmp_path / "k.jsonl", KTO_ROWS)), tokenizer)
    assert kto.extras["desirable"] == [True, False]
    with pytest.raises(ValueError, match="records"):
        scored.pack([0, 0], max_tokens=32)
    with pytest.raises(TypeError, match="one kind"):
        tokenize_records([ScoredRecord("p", "c", 1.0), KTORecord("p", "c", True)], tokenizer)


@pytest.mark.parametrize("loader, rows", [(load_dpo, DPO_ROWS), (load_kto, KTO_ROWS),
                                          (load_scored, SCORED_ROWS),
                                          (load_ranked, RANKED_ROWS), (load_sft, SFT_ROWS),
                                          (load_sft, DPO_ROWS)])
def test_datasets_equivalent_gives_the_same_records(tmp_path, loader, rows):
    datasets = pytest.importorskip("datasets")
    from_file = loader(write_jsonl(tmp_path / "d.jsonl", rows))
    # Same columns as the JSONL; a row without an optional column holds None there.
    columns = list(dict.fromkeys(k for row in rows for k in row))
    table = datasets.Dataset.from_list([{k: row.get(k) for k in columns} for row in rows])
    assert loader(table) == from_file
    # A folder written by save_to_disk is a source too (a path, like the JSONL file).
    table.save_to_disk(str(tmp_path / "saved"))
    assert loader(str(tmp_path / "saved")) == from_file
    assert loader(tmp_path / "saved") == from_file


def test_datasets_malformed_row_names_row_and_field():
    datasets = pytest.importorskip("datasets")
    rows = [dict(SCORED_ROWS[0]), {"prompt": "p", "completion": None, "score": 0.5}]
    with pytest.raises(DataFormatError, match=r"dataset: row 2: field 'completion': missing"):
        load_scored(datasets.Dataset.from_list(rows))
    # A column of the wrong type (here all scores are strings).
    bad = datasets.Dataset.from_list([{"prompt": "p", "completion": "c", "score": "high"}])
    with pytest.raises(DataFormatError, match=r"row 1: field 'score'"):
        load_scored(bad)


def test_datasets_dict_asks_for_a_split():
    datasets = pytest.importorskip("datasets")
    splits = datasets.DatasetDict({"train": datasets.Dataset.from_list(SCORED_ROWS),
                                   "test": datasets.Dataset.from_list(SCORED_ROWS)})
    with pytest.raises(TypeError, match=r"DatasetDict with splits \['train', 'test'\]"):
        load_scored(splits)
    assert load_scored(splits["train"]) == load_scored(datasets.Dataset.from_list(SCORED_ROWS))


def test_packed_tokens_match_the_tokenized_sequences(tmp_path):
    tokenizer = tiny_tokenizer()
    data = tokenize_records(load_kto(write_jsonl(tmp_path / "k.jsonl", KTO_ROWS)), tokenizer)
    for batch in data.pack(max_tokens=48, num_ranks=2, rank=0) + \
            data.pack(max_tokens=48, num_ranks=2, rank=1):
        for piece, s in zip(batch.unpack(batch.input_ids), batch.seq_index.tolist()):
            assert torch.equal(piece, torch.tensor(data.sequence(s)))


# ---------------------------------------------------------------------------------------
# SFT records


def test_load_sft_reads_the_alpaca_shape_and_preference_pairs(tmp_path):
    assert load_sft(write_jsonl(tmp_path / "sft.jsonl", SFT_ROWS)) == [
        SFTRecord("Add\n2+3", "5"), SFTRecord("Say hi", "hi")]
    # Preference pairs are SFT data too: the chosen answer is learned, the rejected dropped.
    assert load_sft(write_jsonl(tmp_path / "dpo.jsonl", DPO_ROWS)) == [
        SFTRecord("Add\n2+3", "5"), SFTRecord("Say hi", "hi"), SFTRecord("Echo", "a b")]


@pytest.mark.parametrize("rows, bad_row, field, problem", [
    # The first record decides the shape; the other shape is refused, naming its line.
    (SFT_ROWS, DPO_ROWS[0], None, "a preference record, but line 1 is an SFT record"),
    (DPO_ROWS, SFT_ROWS[0], None, "an SFT record, but line 1 is a preference record"),
    (SFT_ROWS, {"instruction": "x", "output": "o", "chosen": "c", "rejected": "r"}, None,
     "both 'output'"),
    (SFT_ROWS, {"instruction": "x", "answer": "o"}, "output", "missing"),
    (SFT_ROWS, {"instruction": "x", "output": 5}, "output", "expected a string"),
    (DPO_ROWS, {"instruction": "x", "chosen": "c"}, "rejected", "missing"),
    # KTO records hold undesirable outputs: not SFT data.
    (SFT_ROWS, KTO_ROWS[0], "kto_tag", "not SFT data"),
])
def test_load_sft_names_the_bad_line(tmp_path, rows, bad_row, field, problem):
    path = write_jsonl(tmp_path / "data.jsonl", rows[:2] + [bad_row] + rows[:1])
    with pytest.raises(DataFormatError) as info:
        load_sft(path)
    assert (info.value.source, info.value.line, info.value.field) == (path, 3, field)
    assert f"{path}: line 3: " in str(info.value) and problem in str(info.value)


def test_sft_records_tokenize_to_one_sequence_each(tmp_path):
    tokenizer = tiny_tokenizer()
    records = load_sft(write_jsonl(tmp_path / "sft.jsonl", SFT_ROWS))
    data = tokenize_records(records, tokenizer)
    assert len(data) == data.num_records == len(records)
    assert data.record_index == [0, 1] and data.extras == {}
    (batch,) = data.pack(max_tokens=64)
    for targets, s in zip(batch.unpack(batch.targets), batch.seq_index.tolist()):
        kept = targets[targets != -100].tolist()  # loss on the output only
        assert tokenizer.decode(kept) == records[s].completion + "<eos>"


# ---------------------------------------------------------------------------------------
# Saved dataset folders and the errors the command line prints as data errors


def test_saved_folder_errors_name_the_folder(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = [dict(SCORED_ROWS[0]), {"prompt": "p", "completion": None, "score": 0.5}]
    folder = str(tmp_path / "scored")
    datasets.Dataset.from_list(rows).save_to_disk(folder)
    with pytest.raises(DataFormatError, match=rf"{folder}: row 2: field 'completion': missing"):
        load_scored(folder)
    # A saved DatasetDict asks for one split's folder, which then loads.
    splits = str(tmp_path / "splits")
    datasets.DatasetDict({"train": datasets.Dataset.from_list(SCORED_ROWS)}).save_to_disk(splits)
    with pytest.raises(DataError, match=r"saved DatasetDict with splits \['train'\]; pass one "
                                        r"split's folder, e.g. .*splits/train"):
        load_scored(splits)
    assert load_scored(f"{splits}/train") == load_scored(datasets.Dataset.from_list(SCORED_ROWS))
    # Any other folder (here one holding a JSONL file) is named, not an IsADirectoryError.
    other = tmp_path / "other"
    other.mkdir()
    write_jsonl(other / "d.jsonl", SCORED_ROWS)
    with pytest.raises(DataError, match=rf"{other} is a folder but not a dataset saved"):
        load_scored(str(other))


def test_unusable_input_errors_are_data_errors(tmp_path):
    with pytest.raises(DataError, match="holds no records"):
        load_dpo(write_jsonl(tmp_path / "empty.jsonl", []))
    # KTO pairs each record with the next one's completion: one record cannot train.
    with pytest.raises(DataError, match=r"holds 1 record; KTO needs >= 2"):
        load_kto(write_jsonl(tmp_path / "one.jsonl", KTO_ROWS[:1]))
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = None
    tokenizer.eos_token = None
    with pytest.raises(DataError, match="neither a chat template nor an eos token"):
        encode_prompt_completion(tokenizer, "p", "c")
    tokenizer = tiny_tokenizer()  # an assistant turn rendered unlike the generation prompt
    tokenizer.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>{% if m['role'] == "
                               "'assistant' %}x{% endif %}{{ m['content'] }}{% endfor %}"
                               "{% if add_generation_prompt %}<|assistant|>y{% endif %}")
    with pytest.raises(DataError, match="chat template does not render"):
        encode_prompt_completion(tokenizer, "p", "c")


@pytest.mark.parametrize("rows, message", [
    (DPO_ROWS[:1] + [{"instruction": "x", "rejected": "r"}],
     "line 2: field 'chosen': missing"),
    ([], "holds no records"),
])
def test_cli_prints_a_data_error_as_one_line(tmp_path, capsys, rows, message):
    from alignfuse.engine.cli import main

    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    status = main(["train", "dpo", f"data={path}", "model=tiny-llama", "steps=1",
                   f"out_dir={tmp_path / 'run'}", "progress=false", "tensorboard=false"])
    err = capsys.readouterr().err
    assert status == 2
    assert err.startswith("alignfuse: data error: ") and message in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_ties_are_dropped_with_a_warning_kept_or_refused(tmp_path):
    tie = {"instruction": "Same", "chosen": "x", "rejected": "x"}
    path = write_jsonl(tmp_path / "ties.jsonl", [DPO_ROWS[0], tie, DPO_ROWS[1], tie])
    with pytest.warns(DataWarning, match=r"dropped 2 of 4 pairs .*: line 2, line 4;"):
        records = load_dpo(path)
    assert records == load_dpo(write_jsonl(tmp_path / "clean.jsonl", DPO_ROWS[:2]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        kept = load_dpo(path, ties="keep")
    assert kept[1] == kept[3] == PreferenceRecord("Same", "x", "x") and len(kept) == 4
    with pytest.raises(DataFormatError, match=r"line 2: field 'rejected': equal to 'chosen'"):
        load_dpo(path, ties="error")
    with pytest.raises(DataError, match="all 2 pairs are ties"):
        load_dpo(write_jsonl(tmp_path / "all.jsonl", [tie, tie]))
    with pytest.raises(ValueError, match="ties must be one of"):
        load_dpo(path, ties="skip")
    # An SFT source of pairs learns each chosen answer, ties included.
    assert len(load_sft(path)) == 4


def test_a_tie_gives_dpo_no_gradient():
    """Why ties are dropped: the pair's logit is 0 whatever the weights, so the loss is the
    constant log 2 and its gradient 0 (beside the other pairs, it only dilutes the mean)."""
    from alignfuse.kernels import dpo_loss

    logps = torch.randn(2, dtype=torch.float64, requires_grad=True)
    ref = torch.randn(2, dtype=torch.float64)
    loss = dpo_loss(logps[:1], logps[:1], ref[:1], ref[:1], beta=0.1, backend="torch")[0][0]
    loss.backward()
    assert torch.allclose(loss.detach(), torch.tensor(2.0, dtype=torch.float64).log())
    assert logps.grad.abs().max() == 0


def test_cli_reports_dropped_ties_in_one_line_and_trains(tmp_path, capsys):
    from alignfuse.engine.cli import main

    tie = {"instruction": "Same", "chosen": "x", "rejected": "x"}
    path = write_jsonl(tmp_path / "ties.jsonl", DPO_ROWS + [tie])
    status = main(["train", "dpo", f"data={path}", "model=tiny-llama", "steps=1",
                   "batch_size=2", f"out_dir={tmp_path / 'run'}", "progress=false",
                   "tensorboard=false", "export_model=false"])
    err = capsys.readouterr().err
    assert status == 0
    line = [x for x in err.splitlines() if "ties" in x or "dropped" in x]
    assert line == [f"alignfuse: data warning: {path}: dropped 1 of 4 pairs whose chosen equals "
                    "rejected (no gradient in DPO-style losses): line 4; ties='keep' keeps them"]
    assert main(["train", "dpo", f"data={path}", "ties=error", "steps=1",
                 f"out_dir={tmp_path / 'run2'}"]) == 2
    assert "line 4: field 'rejected': equal to 'chosen'" in capsys.readouterr().err
    assert main(["train", "kto", "ties=keep", f"out_dir={tmp_path / 'run3'}"]) == 2
    assert "ties is not used by algorithm=kto" in capsys.readouterr().err


def test_cli_keeps_the_traceback_of_other_value_errors(tmp_path, monkeypatch):
    from alignfuse.engine import cli, loop

    def bug(*args, **kwargs):
        raise ValueError("a bug, not the user's data")

    monkeypatch.setattr(loop, "train", bug)
    with pytest.raises(ValueError, match="a bug"):
        cli.main(["train", "dpo", f"out_dir={tmp_path / 'run'}"])
