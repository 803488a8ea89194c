"""Training data: JSONL / Hugging Face `datasets` loaders, tokenization, and packing.

Sources: a path to a JSONL file (one JSON object per line), a path to a folder written by
`datasets.Dataset.save_to_disk`, or an in-memory `datasets.Dataset`, with the same fields
(columns) in each. A `DatasetDict` (in memory or saved) holds splits: pass one split
(`dd["train"]`, or the split's folder `path/train`).

Record shapes:

- `load_sft` -> `SFTRecord`: `instruction` str, `input` str (optional), `output` str (the
  Alpaca shape; KTO's without `kto_tag`). A source of preference records (the `load_dpo`
  shape) is SFT data too: its `chosen` is the output, `rejected` is validated and dropped.
  The first record's keys decide the shape of the whole source; a record of the other shape
  is an error naming its line.
- `load_dpo` -> `PreferenceRecord`: `instruction` str, `input` str (optional), `chosen` str,
  `rejected` str. Ties (chosen == rejected) are dropped with a `DataWarning` by default
  (`ties=`).
- `load_kto` -> `KTORecord`: `instruction`, `input` (optional), `output` str, `kto_tag` bool
  (true = desirable).
- `load_scored` -> `ScoredRecord`: `prompt` str, `completion` str, `score` finite number.
- `load_ranked` -> `RankedRecord`: `prompt` str, `responses` list of >= 2 str (best first),
  `ranks` list of int (optional).
- `load_prompts` -> `PromptRecord` (online GRPO/PPO): `prompt` str, or `instruction` +
  `input` (optional); every other field (e.g. `answer`) goes to the reward function as a
  keyword. No `completion` field: the reward's completion is the sampled one.

- The prompt of an instruction record is `instruction + ("\\n" + input if input)`.
- `ranks` (ranked lists): `ranks[k]` is the rank of `responses[k]`, 0 = best, a permutation
  of `0..K-1`; without it the responses are already best first. Records always hold them
  best first. Pairwise reward-model data uses the DPO shape.
- Loaders validate the whole source before returning, so a bad record stops the run at
  start-up, not halfway: a `DataFormatError` names the file, the line number (or dataset
  row) and the field. Every unusable-input error here (bad record, empty source, a folder
  that is no saved dataset, a tokenizer that cannot encode the records) is a `DataError`
  (a `ValueError`), which the `alignfuse` command prints as one line (exit status 2).

Tokenization (`tokenize_records`): with a chat template, the prompt is the user turn and the
completion the assistant turn; the prompt ids are the template rendered up to the assistant
turn (`add_generation_prompt=True`), the completion ids the rest of the rendered
conversation. Without a template, prompt ids are `tokenizer(prompt)` (its own special
tokens, e.g. BOS) and completion ids `tokenizer(completion) + [eos]`. Every sequence carries
its prompt length, so `pack` gives prompt tokens no targets. An empty completion is
accepted: its targets are the end tokens alone (eos, or the template's end of turn), which
teaches the model to answer with nothing.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch

from .packing import PackedBatch, pack


class DataError(ValueError):
    """Training data (or the tokenizer that encodes it) that cannot be used, a mistake in the
    user's input rather than a bug: the `alignfuse` command prints it as one line."""


class DataWarning(UserWarning):
    """Records that load but teach nothing, e.g. a preference pair whose chosen equals its
    rejected; `warnings.simplefilter("error", DataWarning)` makes them errors."""


class DataFormatError(DataError):
    """A malformed record: `source` (file, saved dataset folder or "dataset"), `line`
    (1-based line or row), and `field` (None when the record itself is bad, e.g. invalid
    JSON). `unit` is "line" or "row"; by default "row" for the in-memory "dataset"."""

    def __init__(self, source: str, line: int, field: str | None, problem: str, *,
                 unit: str | None = None):
        unit = unit or ("row" if source == "dataset" else "line")
        super().__init__(f"{source}: {unit} {line}: " + (f"field {field!r}: " if field else "")
                         + problem)
        self.source, self.line, self.field, self.unit = source, line, field, unit


# ---------------------------------------------------------------------------------------
# Records


@dataclass(frozen=True)
class SFTRecord:
    """A prompt and the completion to learn (supervised fine-tuning)."""

    prompt: str
    completion: str


@dataclass(frozen=True)
class PreferenceRecord:
    """A prompt with a preferred (`chosen`) and a dispreferred (`rejected`) completion."""

    prompt: str
    chosen: str
    rejected: str


@dataclass(frozen=True)
class KTORecord:
    """A prompt and one completion labelled desirable (True) or undesirable (False)."""

    prompt: str
    completion: str
    desirable: bool


@dataclass(frozen=True)
class ScoredRecord:
    """A prompt and a completion with a scalar score (reward-model or PPO-style data)."""

    prompt: str
    completion: str
    score: float


@dataclass(frozen=True)
class PromptRecord:
    """A prompt of online RL, and the fields its reward function gets as keywords."""
    prompt: str
    fields: dict = field(default_factory=dict, hash=False)


@dataclass(frozen=True)
class RankedRecord:
    """A prompt and K >= 2 responses, best first (listwise reward models)."""

    prompt: str
    responses: tuple[str, ...]


def instruction_prompt(instruction: str, input: str = "") -> str:
    """The prompt of an instruction record: `instruction + ("\\n" + input if input)`."""
    return instruction + ("\n" + input if input else "")


# ---------------------------------------------------------------------------------------
# Reading and validating


def _rows(source) -> Iterator[tuple[str, str, int, Any]]:
    """(source name, "line" or "row", 1-based line or row, parsed object) for a JSONL path, a
    saved dataset folder or a Dataset."""
    if isinstance(source, (str, os.PathLike)):
        name = os.fspath(source)
        if os.path.isdir(name):
            for number, row in enumerate(_saved_dataset(name), start=1):
                yield name, "row", number, row
            return
        # Bytes, decoded line by line: a text-mode read raises a bad byte's error with no
        # line number.
        with open(name, "rb") as f:
            for number, raw in enumerate(f, start=1):
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError as err:
                    raise DataFormatError(name, number, None, f"invalid UTF-8 ({err.reason} "
                                          f"at byte {err.start})") from None
                if not text.strip():
                    continue  # blank lines (e.g. a trailing newline) are not records
                try:
                    yield name, "line", number, json.loads(text)
                except json.JSONDecodeError as err:
                    raise DataFormatError(name, number, None, f"invalid JSON ({err.msg} at "
                                          f"column {err.colno})") from None
        return
    if isinstance(getattr(source, "column_names", None), dict):  # a DatasetDict: its splits
        raise TypeError(f"source is a DatasetDict with splits {list(source.column_names)}; "
                        "pass one split, e.g. source[\"train\"]")
    if hasattr(source, "column_names") and hasattr(source, "__iter__"):  # datasets.Dataset
        for number, row in enumerate(source, start=1):
            yield "dataset", "row", number, row
        return
    raise TypeError("source must be a path (a JSONL file or a saved dataset folder) or a "
                    f"datasets.Dataset, got {type(source).__name__}")


def _saved_dataset(path: str):
    """The `datasets.Dataset` saved in folder `path` (by `save_to_disk`)."""
    try:
        import datasets
    except ImportError:
        raise DataError(f"{path} is a folder: reading a saved dataset needs the `datasets` "
                        "package (pip install datasets); or pass a JSONL file") from None
    try:
        loaded = datasets.load_from_disk(path)
    except FileNotFoundError as err:  # what datasets raises for a folder of anything else
        raise DataError(f"{path} is a folder but not a dataset saved by save_to_disk ({err}); "
                        "pass a JSONL file or such a folder") from None
    if isinstance(loaded, datasets.DatasetDict):
        splits = list(loaded)
        raise DataError(f"{path} is a saved DatasetDict with splits {splits}; pass one split's "
                        f"folder, e.g. {os.path.join(path, splits[0] if splits else 'train')}")
    return loaded


class _Fields:
    """Typed access to one record's fields; every failure names source, line and field."""

    def __init__(self, source: str, unit: str, line: int, row: Any):
        if not isinstance(row, dict):
            raise DataFormatError(source, line, None,
                                  f"expected a JSON object, got {type(row).__name__}", unit=unit)
        self.source, self.unit, self.line, self.row = source, unit, line, row

    def fail(self, name: str | None, problem: str):
        raise DataFormatError(self.source, self.line, name, problem, unit=self.unit)

    def has(self, name: str) -> bool:
        """Whether the record holds `name` (a Dataset row holds None in a column it lacks)."""
        return self.row.get(name) is not None

    def get(self, name: str, check: Callable[[Any], bool], expected: str, *,
            optional: bool = False, default: Any = None) -> Any:
        if name not in self.row or self.row[name] is None:
            if optional:
                return default
            self.fail(name, "missing")
        value = self.row[name]
        if not check(value):
            self.fail(name, f"expected {expected}, got {type(value).__name__} {value!r:.60}")
        return value

    def text(self, name: str, **kwargs) -> str:
        return self.get(name, lambda v: isinstance(v, str), "a string", **kwargs)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _source_name(source) -> str:
    return os.fspath(source) if isinstance(source, (str, os.PathLike)) else "dataset"


def _load(source, parse: Callable[[_Fields], Any]) -> list:
    records = [parse(_Fields(name, unit, line, row)) for name, unit, line, row in _rows(source)]
    if not records:
        raise DataError(f"source {_source_name(source)!r:.80} holds no records")
    return records


TIES = ("drop", "keep", "error")


def _check_ties(ties: Any) -> None:
    if ties not in TIES:
        raise ValueError(f"ties must be one of {TIES}, got {ties!r}")


def load_sft(source) -> list[SFTRecord]:
    """SFT examples from JSONL, a saved dataset folder or a Dataset: `instruction`, `input`
    (optional), `output`; or preference records (`load_dpo`'s shape), whose `chosen` is the
    output. The first record decides the shape; every record must have it."""
    first: list[tuple[str, int]] = []  # (shape, line) of the first record

    def parse(r: _Fields) -> SFTRecord:
        if r.has("kto_tag"):  # SFT would learn the undesirable outputs as well
            r.fail("kto_tag", "a KTO record is not SFT data (its output may be undesirable); "
                              "drop kto_tag from the desirable records to learn them")
        if r.has("output") and r.has("chosen"):
            r.fail(None, "both 'output' (an SFT record) and 'chosen' (a preference record): "
                         "expected one of them")
        if not r.has("output") and not r.has("chosen"):
            r.fail("output", "missing (an SFT record has instruction, input (optional), "
                             "output; a preference record instruction, input, chosen, rejected)")
        shape = "an SFT" if r.has("output") else "a preference"
        if not first:
            first.append((shape, r.line))
        elif shape != first[0][0]:
            r.fail(None, f"{shape} record, but {r.unit} {first[0][1]} is {first[0][0]} record; "
                         "a source holds records of one shape")
        prompt = instruction_prompt(r.text("instruction"), r.text("input", optional=True,
                                                                  default=""))
        if r.has("output"):
            return SFTRecord(prompt, r.text("output"))
        r.text("rejected")  # validated as in load_dpo, so a malformed pair is not half-read
        return SFTRecord(prompt, r.text("chosen"))
    return _load(source, parse)


def load_dpo(source, *, ties: str = "drop") -> list[PreferenceRecord]:
    """Preference pairs from JSONL or a Dataset: `instruction`, `input`, `chosen`, `rejected`.

    A tie (`chosen == rejected`, the same text) is a pair with no preference: the policy's
    log-probs of its two answers are equal, so DPO/IPO/SimPO/Bradley-Terry give it a
    constant loss and no gradient, yet it counts in the batch mean and as a miss in the
    reward accuracy. `ties="drop"` (default) drops ties with a `DataWarning` giving their
    count and first lines, `"keep"` keeps them (ORPO's SFT term still learns the answer),
    `"error"` refuses the source at the first tie.
    """
    _check_ties(ties)
    tie_lines: list[str] = []

    def parse(r: _Fields) -> PreferenceRecord | None:
        prompt = instruction_prompt(r.text("instruction"), r.text("input", optional=True,
                                                                  default=""))
        record = PreferenceRecord(prompt, r.text("chosen"), r.text("rejected"))
        if record.chosen != record.rejected or ties == "keep":
            return record
        if ties == "error":
            r.fail("rejected", "equal to 'chosen' (a tie teaches no preference); drop the "
                               "record, or pass ties='drop' / 'keep'")
        tie_lines.append(f"{r.unit} {r.line}")
        return None

    parsed = _load(source, parse)
    records = [r for r in parsed if r is not None]
    if tie_lines:
        name = _source_name(source)
        if not records:
            raise DataError(f"source {name!r:.80}: all {len(parsed)} pairs are ties "
                            "(chosen == rejected); no preference to learn")
        shown = ", ".join(tie_lines[:5]) + (", ..." if len(tie_lines) > 5 else "")
        warnings.warn(f"{name}: dropped {len(tie_lines)} of {len(parsed)} pairs whose chosen "
                      f"equals rejected (no gradient in DPO-style losses): {shown}; "
                      "ties='keep' keeps them", DataWarning, stacklevel=2)
    return records


def load_kto(source) -> list[KTORecord]:
    """Labelled completions from JSONL or a Dataset: `instruction`, `input`, `output`,
    `kto_tag` (bool: desirable). At least 2 records (KTO pairs each with the next one)."""
    def parse(r: _Fields) -> KTORecord:
        prompt = instruction_prompt(r.text("instruction"), r.text("input", optional=True,
                                                                  default=""))
        tag = r.get("kto_tag", lambda v: isinstance(v, bool), "a bool (true/false)")
        return KTORecord(prompt, r.text("output"), tag)
    records = _load(source, parse)
    if len(records) < 2:  # else `kto_dataset` fails later, after the model has loaded
        raise DataError(f"source {_source_name(source)!r:.80} holds {len(records)} record; KTO "
                        "needs >= 2 (each is paired with the next record's completion to "
                        "estimate its reference point)")
    return records


def load_scored(source) -> list[ScoredRecord]:
    """Scored completions from JSONL or a Dataset: `prompt`, `completion`, `score` (finite)."""
    def parse(r: _Fields) -> ScoredRecord:
        score = r.get("score", _is_number, "a finite number")
        return ScoredRecord(r.text("prompt"), r.text("completion"), float(score))
    return _load(source, parse)


def load_prompts(source) -> list[PromptRecord]:
    """Prompts for online GRPO/PPO from JSONL or a Dataset: `prompt` (str), or `instruction`
    and `input` (optional) as in `load_sft`. The record's other fields (`answer`, test
    cases, ...) reach the reward function as keywords; `completion` is refused (the reward
    gets the sampled completion under that name)."""
    def parse(r: _Fields) -> PromptRecord:
        if r.has("prompt") and r.has("instruction"):
            r.fail(None, "both 'prompt' and 'instruction': expected one of them")
        if r.has("prompt"):
            prompt, used = r.text("prompt"), {"prompt"}
        elif r.has("instruction"):
            prompt = instruction_prompt(r.text("instruction"),
                                        r.text("input", optional=True, default=""))
            used = {"instruction", "input"}
        else:
            r.fail("prompt", "missing (a prompt record has prompt, or instruction and input "
                             "(optional); its other fields go to the reward function)")
        if r.has("completion"):
            r.fail("completion", "a prompt record's fields go to the reward function as "
                                 "keywords, and its completion is the sampled one; rename "
                                 "this field (e.g. reference)")
        bad = [k for k in r.row if not isinstance(k, str) or not k.isidentifier()]
        if bad:
            r.fail(bad[0], "not a Python identifier, so it cannot reach the reward function "
                           "as a keyword; rename it")
        return PromptRecord(prompt, {k: v for k, v in r.row.items()
                                     if k not in used and v is not None})
    return _load(source, parse)


def load_ranked(source) -> list[RankedRecord]:
    """Ranked lists from JSONL or a Dataset: `prompt`, `responses` (>= 2 strings, best first
    unless `ranks` says otherwise, the same number K in every record), optional `ranks`
    (rank of each response, 0 = best)."""
    first: list[tuple[int, int]] = []  # (K, line) of the first record

    def parse(r: _Fields) -> RankedRecord:
        responses = r.get("responses", lambda v: isinstance(v, list) and len(v) >= 2
                          and all(isinstance(x, str) for x in v), "a list of >= 2 strings")
        # The listwise loss scores a [prompts, K] block per micro-batch: a record with
        # another K would stop the run halfway, in whichever step first packs it.
        if not first:
            first.append((len(responses), r.line))
        elif len(responses) != first[0][0]:
            r.fail("responses", f"expected {first[0][0]} responses (as on line {first[0][1]}; "
                                f"every record needs the same number), got {len(responses)}")
        ranks = r.get("ranks", lambda v: isinstance(v, list) and all(
            isinstance(x, int) and not isinstance(x, bool) for x in v),
            "a list of ints", optional=True)
        if ranks is not None:
            if sorted(ranks) != list(range(len(responses))):
                r.fail("ranks", f"expected a permutation of 0..{len(responses) - 1} (one rank "
                                f"per response), got {ranks!r:.60}")
            responses = [response for _, response in sorted(zip(ranks, responses))]
        return RankedRecord(r.text("prompt"), tuple(responses))
    return _load(source, parse)


# ---------------------------------------------------------------------------------------
# Tokenization


def encode_prompt_completion(tokenizer, prompt: str,
                             completion: str) -> tuple[list[int], list[int]]:
    """Token ids of a prompt and its completion (see the module docstring for the format)."""
    if getattr(tokenizer, "chat_template", None):
        user = [{"role": "user", "content": prompt}]
        prompt_text = _chat_prompt(tokenizer, prompt)
        full_text = tokenizer.apply_chat_template(
            user + [{"role": "assistant", "content": completion}], tokenize=False)
        if not full_text.startswith(prompt_text):
            raise DataError("tokenizer's chat template does not render the conversation as "
                             "the generation prompt followed by the answer; cannot split the "
                             "prompt from the completion")
        # Encoded apart, so the prompt length is exact; the template carries the specials.
        return (encode_prompt(tokenizer, prompt),
                tokenizer(full_text[len(prompt_text):], add_special_tokens=False)["input_ids"])
    if tokenizer.eos_token_id is None:
        raise DataError("tokenizer has neither a chat template nor an eos token: the end of "
                        "a completion cannot be marked")
    return (encode_prompt(tokenizer, prompt),
            tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id])


def _chat_prompt(tokenizer, prompt: str) -> str:
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                         add_generation_prompt=True, tokenize=False)


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    """The token ids of a prompt: the chat template rendered up to the assistant turn, or the
    prompt with the tokenizer's own special tokens. The prompt ids of
    `encode_prompt_completion` and what online RL generates from, so online RL samples from
    the prompts the offline algorithms train on."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer(_chat_prompt(tokenizer, prompt), add_special_tokens=False)["input_ids"]
    return tokenizer(prompt)["input_ids"]


@dataclass
class TokenizedDataset:
    """Tokenized records as sequences ready for `pack`: prompt + completion per sequence.

    A record becomes one sequence (SFT, KTO, scored) or several that are packed together as one
    group (DPO: chosen then rejected, so chosen sequences have even indices; ranked: K
    responses best first). The fields below are per sequence.
    """

    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]
    record_index: list[int]  # the record (= packing group) of each sequence
    # Per-sequence values: "chosen" (DPO, bool), "desirable" (KTO, bool), "score" (float),
    # "rank" (ranked lists, 0 = best).
    extras: dict[str, list] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.prompt_ids)

    @property
    def num_records(self) -> int:
        return self.record_index[-1] + 1 if self.record_index else 0

    @property
    def prompt_lengths(self) -> list[int]:
        return [len(ids) for ids in self.prompt_ids]

    def sequence(self, i: int) -> list[int]:
        """Prompt then completion ids of sequence i."""
        return self.prompt_ids[i] + self.completion_ids[i]

    def pack(self, records: Sequence[int] | None = None, *, max_tokens: int,
             **pack_kwargs) -> list[PackedBatch]:
        """Pack the sequences of `records` (default: all), each record's sequences together.

        In each batch `seq_index` indexes this dataset's sequences, `group_index` is the
        record index and `extras` carries the per-sequence values. `pack_kwargs` go to
        `alignfuse.engine.pack` (num_ranks, rank, truncate, ...).
        """
        if records is None:
            selected = list(range(len(self)))
        else:
            wanted = set(int(r) for r in records)
            if len(wanted) != len(records) or not all(0 <= r < self.num_records for r in wanted):
                raise ValueError(f"records must be distinct indices in [0, {self.num_records})")
            selected = [i for i in range(len(self)) if self.record_index[i] in wanted]
        batches = pack([self.sequence(i) for i in selected], max_tokens=max_tokens,
                       prompt_lengths=[len(self.prompt_ids[i]) for i in selected],
                       groups=[self.record_index[i] for i in selected],
                       extras={k: [v[i] for i in selected] for k, v in self.extras.items()},
                       **pack_kwargs)
        sequence_ids = torch.tensor(selected, dtype=torch.int64)
        for batch in batches:  # positions in `selected` -> this dataset's sequence indices
            batch.seq_index = sequence_ids[batch.seq_index]
        return batches


def tokenize_records(records: Iterable, tokenizer) -> TokenizedDataset:
    """Tokenize loaded records (all of one kind) into a `TokenizedDataset`."""
    out = TokenizedDataset([], [], [])
    kind = None
    for index, record in enumerate(records):
        if kind is None:
            kind = type(record)
        elif type(record) is not kind:
            raise TypeError(f"records must all be of one kind; records[{index}] is "
                            f"{type(record).__name__}, records[0] is {kind.__name__}")
        if isinstance(record, SFTRecord):
            items = [(record.completion, {})]
        elif isinstance(record, PreferenceRecord):
            items = [(record.chosen, {"chosen": True}), (record.rejected, {"chosen": False})]
        elif isinstance(record, KTORecord):
            items = [(record.completion, {"desirable": record.desirable})]
        elif isinstance(record, ScoredRecord):
            items = [(record.completion, {"score": record.score})]
        elif isinstance(record, RankedRecord):
            items = [(response, {"rank": k}) for k, response in enumerate(record.responses)]
        else:
            raise TypeError(f"records[{index}] must be a record from a load_* function, "
                            f"got {type(record).__name__}")
        for completion, values in items:
            prompt_ids, completion_ids = encode_prompt_completion(tokenizer, record.prompt,
                                                                  completion)
            out.prompt_ids.append(prompt_ids)
            out.completion_ids.append(completion_ids)
            out.record_index.append(index)
            for name, value in values.items():
                out.extras.setdefault(name, []).append(value)
    if kind is None:
        raise ValueError("records is empty")
    return out
