"""Sequence packing: variable-length sequences into token-budgeted micro-batches.

`pack(sequences, max_tokens=...)` returns the micro-batches of one data-parallel rank as
`PackedBatch`es: the sequences of a micro-batch are concatenated into one row `[N]` with
`cu_seqlens` (flash-attn varlen layout), positions restarting at 0 per document, and
next-token `targets` with `ignore_index` where no loss is taken.

How micro-batches are formed (`plan_micro_batches`):
1. Units. A unit is one sequence, or all sequences of one group (a DPO chosen/rejected pair,
   the n GRPO samples of a prompt): a unit is never split across micro-batches, so the loss
   that needs all its members can be formed inside one micro-batch.
2. Best-fit decreasing (BFD). Units in decreasing token count (ties: lower unit index first)
   each go to the open bin with the least room that still fits (ties: the bin opened first),
   else to a new bin. No bin exceeds `max_tokens`.
   Padded (`padded=True`, for a model that runs on right-padded rows, one per sequence, as
   `engine.forward.run_decoder` runs a model whose packed documents are not isolated): a
   micro-batch costs its sequence count times its longest sequence, and that is what stays
   within `max_tokens`. Units in decreasing width (a unit's longest sequence; ties: lower
   index first) go to the newest bin if its rows times its width (its first unit's) still
   fit and the unit is wider than half of that width, else to a new bin (next-fit
   decreasing: lengths alike share a micro-batch). So every row is less than twice as
   wide as its widest sequence, and a wide bin with rows to spare does not take a short
   sequence as a row of padding. A padded micro-batch then costs its rows times the cost
   of its widest sequence (below): every row runs at that width.
3. Equal counts across ranks. Under DDP/FSDP every rank must run the same number of
   gradient-accumulation steps, so the bin count is raised to a multiple of `num_ranks` by
   splitting bins: the costliest bin holding two or more units (ties: lower bin id) is split
   in two, its units dealt greedily (in placement order) to the cheaper half. If there are
   too few units to give every rank the same count, `pack` raises a ValueError.
4. Karmarkar-Karp balancing. Bins are partitioned into `num_ranks` sets of equal size by the
   largest-differencing method (Karmarkar & Karp 1982; the equal-cardinality variant of
   verl's seqlen balancing), using a workload model per sequence
   `cost(L) = linear_cost * L + attention_cost * L**2` (matmuls are linear in tokens,
   attention within a document is quadratic).
5. Each rank's micro-batches are ordered by decreasing cost, so that the k-th micro-batches
   of all ranks (which run in lock-step under FSDP) have similar cost.

The C++ path (`csrc/host/packing.cpp`, `alignfuse.engine._host.plan_bins`) and the Python
path (`_plan_bins_python`) implement steps 2-5 identically, tie-breaking included; tests
check that they give identical plans. Both compute with the same float64 operations in the
same order, so float ties resolve the same way.
"""

from __future__ import annotations

import bisect
import heapq
import math
import numbers
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

# A 4k-hidden transformer: matmuls cost ~24*H^2 FLOPs per token per layer, attention
# ~4*H*L per token, so the quadratic-to-linear ratio is about 1 / (6 * H).
DEFAULT_ATTENTION_COST = 1.0 / (6 * 4096)


# ---------------------------------------------------------------------------------------
# The packed micro-batch


@dataclass
class PackedBatch:
    """One micro-batch of S sequences (N tokens) packed into a single row.

    Token fields are `[N]`; sequence fields are `[S]`. `targets[i]` is the next token of the
    same document, or `ignore_index` at each document's last token and where the next token
    is excluded from the loss (prompt tokens in SFT/DPO). `loss_mask` is `targets !=
    ignore_index`, aligned with `targets`: sum per sequence with `cu_seqlens` to get a
    sequence log-prob. Members of a group are contiguous and in their original order, so a
    DPO batch packed from `[chosen0, rejected0, chosen1, ...]` with groups `[0, 0, 1, ...]`
    has chosen at even and rejected at odd positions.
    """

    input_ids: torch.Tensor     # [N] int64
    position_ids: torch.Tensor  # [N] int64, restarting at 0 per document
    cu_seqlens: torch.Tensor    # [S+1] int32
    max_seqlen: int
    targets: torch.Tensor       # [N] int64, ignore_index where no loss
    loss_mask: torch.Tensor     # [N] bool, targets != ignore_index
    seq_index: torch.Tensor     # [S] int64, index of each sequence in the input to `pack`
    group_index: torch.Tensor   # [S] int64, the group id of each sequence (seq_index if none)
    extras: dict[str, torch.Tensor] = field(default_factory=dict)  # per-sequence [S] values
    ignore_index: int = -100

    @property
    def num_tokens(self) -> int:
        return self.input_ids.numel()

    @property
    def num_seqs(self) -> int:
        return self.seq_index.numel()

    @property
    def seq_lengths(self) -> torch.Tensor:
        """`[S]` int64 token count of each sequence."""
        return (self.cu_seqlens[1:] - self.cu_seqlens[:-1]).to(torch.int64)

    def unpack(self, values: torch.Tensor) -> list[torch.Tensor]:
        """Split per-token `values [N, ...]` into one tensor per sequence (`[L_s, ...]`)."""
        if values.dim() == 0 or values.shape[0] != self.num_tokens:
            raise ValueError(f"values must have {self.num_tokens} rows (one per packed token), "
                             f"got shape {tuple(values.shape)}")
        return list(torch.split(values, self.seq_lengths.tolist()))

    def to_padded(self, values: torch.Tensor, pad_value: float = 0) -> torch.Tensor:
        """Per-token `values [N, ...]` to right-padded `[S, max_seqlen, ...]`."""
        if values.dim() == 0 or values.shape[0] != self.num_tokens:
            raise ValueError(f"values must have {self.num_tokens} rows (one per packed token), "
                             f"got shape {tuple(values.shape)}")
        out = values.new_full((self.num_seqs, self.max_seqlen, *values.shape[1:]), pad_value)
        out[self._padded_index(values.device)] = values
        return out

    def from_padded(self, values: torch.Tensor) -> torch.Tensor:
        """Right-padded `values [S, max_seqlen, ...]` back to per-token `[N, ...]` (the
        inverse of `to_padded`; padding dropped)."""
        if values.dim() < 2 or values.shape[0] != self.num_seqs \
                or values.shape[1] < self.max_seqlen:
            raise ValueError(f"values must be [{self.num_seqs}, >= {self.max_seqlen}, ...] "
                             f"(one right-padded row per sequence), got shape "
                             f"{tuple(values.shape)}")
        return values[self._padded_index(values.device)]

    def _padded_index(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(row, column) of each packed token in the right-padded layout."""
        seq = torch.repeat_interleave(torch.arange(self.num_seqs, device=device),
                                      self.seq_lengths.to(device))
        return seq, self.position_ids.to(device)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "PackedBatch":
        """A copy with every tensor on `device`."""
        def move(t: torch.Tensor) -> torch.Tensor:
            return t.to(device, non_blocking=non_blocking)

        return PackedBatch(
            input_ids=move(self.input_ids), position_ids=move(self.position_ids),
            cu_seqlens=move(self.cu_seqlens), max_seqlen=self.max_seqlen,
            targets=move(self.targets), loss_mask=move(self.loss_mask),
            seq_index=move(self.seq_index), group_index=move(self.group_index),
            extras={k: move(v) for k, v in self.extras.items()}, ignore_index=self.ignore_index)


# ---------------------------------------------------------------------------------------
# Planning: which sequences go to which micro-batch of which rank


def _as_int_array(name: str, values, length: int | None = None) -> np.ndarray:
    array = np.asarray(values.cpu() if isinstance(values, torch.Tensor) else values)
    if array.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {array.shape}")
    if array.size and not np.issubdtype(array.dtype, np.integer):
        raise TypeError(f"{name} must hold integers, got dtype {array.dtype}")
    if length is not None and array.size != length:
        raise ValueError(f"{name} must have one entry per sequence ({length}), got {array.size}")
    return array.astype(np.int64, copy=False)


def _units(num_seqs: int, groups) -> tuple[np.ndarray, np.ndarray]:
    """Unit (group) of each sequence, numbered by first appearance; and sequences by unit.

    Returns `unit_of_seq [num_seqs]` and `seq_order [num_seqs]`: sequences sorted by unit,
    and by original index within a unit.
    """
    group_ids = _as_int_array("groups", groups, num_seqs)
    _, first, inverse = np.unique(group_ids, return_index=True, return_inverse=True)
    # np.unique numbers groups by value; renumber by first appearance (the documented order).
    rank_by_first = np.empty(first.size, dtype=np.int64)
    rank_by_first[np.argsort(first, kind="stable")] = np.arange(first.size)
    unit_of_seq = rank_by_first[inverse.reshape(-1)]
    return unit_of_seq, np.argsort(unit_of_seq, kind="stable")


def plan_micro_batches(lengths, *, max_tokens: int, groups=None, num_ranks: int = 1,
                       linear_cost: float = 1.0, attention_cost: float = DEFAULT_ATTENTION_COST,
                       padded: bool = False, backend: str = "auto") -> list[list[np.ndarray]]:
    """Assign sequences to micro-batches and ranks (steps 1-5 of the module docstring).

    Args:
        lengths: `[num_seqs]` token count of each sequence (>= 1).
        max_tokens: token budget of one micro-batch; with `padded`, of its padded rows
            (sequences x the longest).
        groups: optional `[num_seqs]` group id per sequence; a group is packed as one unit.
        num_ranks: number of data-parallel ranks; every rank gets the same number of
            micro-batches.
        linear_cost, attention_cost: workload model `linear_cost*L + attention_cost*L**2`.
        padded: budget (and cost) the right-padded rows a padded forward runs, not the tokens.
        backend: "auto" (C++ when built), "cpp" or "python" (identical results).

    Returns:
        `plan[rank][micro_batch]`: int64 arrays of sequence indices. Within a micro-batch,
        groups are contiguous, ordered by first appearance, members in original order.
    """
    lengths = _as_int_array("lengths", lengths)
    _check_positive_ints(max_tokens=max_tokens, num_ranks=num_ranks)
    if not (isinstance(linear_cost, numbers.Real) and math.isfinite(linear_cost)
            and linear_cost > 0):
        raise ValueError(f"linear_cost must be a finite number > 0, got {linear_cost!r}")
    if not (isinstance(attention_cost, numbers.Real) and math.isfinite(attention_cost)
            and attention_cost >= 0):
        raise ValueError(f"attention_cost must be a finite number >= 0, got {attention_cost!r}")
    if not isinstance(padded, (bool, np.bool_)):
        raise TypeError(f"padded must be a bool, got {padded!r}")
    if lengths.size == 0:
        raise ValueError("lengths must hold at least one sequence")
    if lengths.min() < 1:
        bad = int(np.argmin(lengths))
        raise ValueError(f"every sequence needs at least 1 token; sequence {bad} has "
                         f"{int(lengths[bad])}")

    # Costs are computed once here and passed to both paths, so both sum identical doubles.
    lengths_f = lengths.astype(np.float64)
    seq_cost = linear_cost * lengths_f + attention_cost * lengths_f * lengths_f
    if groups is None:  # every sequence is its own unit
        unit_tokens, unit_cost = lengths, seq_cost
        unit_width, unit_count = lengths, np.ones_like(lengths)
    else:
        unit_of_seq, seq_order = _units(lengths.size, groups)
        unit_sizes = np.bincount(unit_of_seq)
        member_starts = np.zeros(unit_sizes.size + 1, dtype=np.int64)
        np.cumsum(unit_sizes, out=member_starts[1:])
        unit_tokens = np.add.reduceat(lengths[seq_order], member_starts[:-1])
        unit_cost = np.add.reduceat(seq_cost[seq_order], member_starts[:-1])
        unit_width = np.maximum.reduceat(lengths[seq_order], member_starts[:-1])
        unit_count = unit_sizes.astype(np.int64)
    # what each unit takes of a micro-batch's budget: its tokens, or its padded rows
    unit_size = unit_count * unit_width if padded else unit_tokens
    too_big = np.flatnonzero(unit_size > max_tokens)
    if too_big.size:
        u = int(too_big[0])
        what = (f"groups: group {np.asarray(groups)[seq_order[member_starts[u]]].item()!r}"
                if groups is not None else f"sequences[{u}]")
        if padded:
            raise ValueError(f"{what} needs {int(unit_size[u])} padded slots ({int(unit_count[u])} "
                             f"sequences x its longest, {int(unit_width[u])} tokens), more than "
                             f"max_tokens={max_tokens}; raise max_tokens")
        raise ValueError(f"{what} has {int(unit_tokens[u])} tokens, more than max_tokens="
                         f"{max_tokens}; raise max_tokens or pass truncate=True to pack")

    if padded:  # the cost of one row padded to the unit's width; a bin's rows take its widest's
        width_f = unit_width.astype(np.float64)
        row_cost = linear_cost * width_f + attention_cost * width_f * width_f
        units_by_bin, bin_offsets, schedule = _plan_bins(
            None, row_cost, int(max_tokens), int(num_ranks), backend,
            widths=unit_width, counts=unit_count)
    else:
        units_by_bin, bin_offsets, schedule = _plan_bins(unit_tokens, unit_cost,
                                                         int(max_tokens), int(num_ranks), backend)
    if groups is None:
        seqs_by_bin, seq_offsets = units_by_bin, bin_offsets
    else:  # expand each unit into its members, in original order
        counts = unit_sizes[units_by_bin]
        ends = np.cumsum(counts)
        within = np.arange(ends[-1], dtype=np.int64) - np.repeat(ends - counts, counts)
        seqs_by_bin = seq_order[np.repeat(member_starts[units_by_bin], counts) + within]
        seq_offsets = np.concatenate([[0], ends])[bin_offsets]
    per_rank = schedule.size // num_ranks
    return [[seqs_by_bin[seq_offsets[b]:seq_offsets[b + 1]]
             for b in schedule[r * per_rank:(r + 1) * per_rank]]
            for r in range(num_ranks)]


def _plan_bins(unit_tokens: np.ndarray | None, unit_cost: np.ndarray, max_tokens: int,
               num_ranks: int, backend: str, widths: np.ndarray | None = None,
               counts: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Steps 2-5 on units (padded: by `widths` and `counts` instead of `unit_tokens`, and
    `unit_cost` is the cost of one of a unit's rows at its width).
    Returns `units_by_bin [U]` (units grouped by bin, ascending within a bin), `bin_offsets
    [B+1]` and `schedule [num_ranks * M]` (bin ids, rank-major: rank r runs bins
    `schedule[r*M:(r+1)*M]` in order)."""
    if backend not in ("auto", "cpp", "python"):
        raise ValueError(f"backend must be 'auto', 'cpp' or 'python', got {backend!r}")
    entry = "plan_bins" if widths is None else "plan_padded_bins"
    host = _host_module(entry) if backend != "python" else None
    if backend == "cpp" and host is None:
        raise RuntimeError(f"backend='cpp' but alignfuse.engine._host has no {entry}; rebuild "
                           "with: ALIGNFUSE_BUILD_CUDA=0 python setup.py build_ext --inplace")
    # C++ std::invalid_argument (e.g. too few units) arrives as ValueError.
    if widths is not None:
        if host is not None:
            return host.plan_padded_bins(widths, counts, unit_cost, max_tokens, num_ranks)
        return _plan_bins_python(None, unit_cost.tolist(), max_tokens, num_ranks,
                                 widths=widths.tolist(), counts=counts.tolist())
    if host is not None:
        return host.plan_bins(unit_tokens, unit_cost, max_tokens, num_ranks)
    return _plan_bins_python(unit_tokens.tolist(), unit_cost.tolist(), max_tokens, num_ranks)


def _host_module(entry: str = "plan_bins"):
    try:
        from . import _host
    except ImportError:
        return None
    return _host if hasattr(_host, entry) else None


def _plan_bins_python(tokens: list[int] | None, cost: list[float], max_tokens: int,
                      num_ranks: int, widths: list[int] | None = None,
                      counts: list[int] | None = None
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The readable reference of `_host.plan_bins` and `_host.plan_padded_bins` (keep them
    in step): by `tokens`, or padded by `widths` and `counts` (`cost` per row, then)."""
    bins: list[list[int]] = []        # units of each bin, in placement order
    bin_cost: list[float] = []
    if widths is not None:
        # Step 2, padded: next-fit decreasing on width. A bin is as wide as its first unit.
        # `cost` is a unit's cost per row; every row of a micro-batch is padded to its widest,
        # so a bin costs its rows times its costliest row.
        rows = width = 0
        row_cost = 0.0
        for u in sorted(range(len(widths)), key=lambda u: (-widths[u], u)):
            if not bins or 2 * widths[u] <= width or (rows + counts[u]) * width > max_tokens:
                bins.append([])
                bin_cost.append(0.0)
                rows, width, row_cost = 0, widths[u], 0.0
            bins[-1].append(u)
            rows += counts[u]
            row_cost = max(row_cost, cost[u])
            bin_cost[-1] = rows * row_cost
    else:
        # Step 2: best-fit decreasing. `open_bins` is sorted (room left, bin id), so bisect
        # finds the least room that still fits, and among equal room the bin opened first.
        open_bins: list[tuple[int, int]] = []
        for u in sorted(range(len(tokens)), key=lambda u: (-tokens[u], u)):
            i = bisect.bisect_left(open_bins, (tokens[u], -1))
            if i < len(open_bins):
                room, b = open_bins.pop(i)
            else:
                room, b = max_tokens, len(bins)
                bins.append([])
                bin_cost.append(0.0)
            bins[b].append(u)
            bin_cost[b] += cost[u]
            if room - tokens[u] > 0:  # a full bin takes nothing more (every unit has a token)
                bisect.insort(open_bins, (room - tokens[u], b))

    # Step 3: split bins until every rank can get the same number.
    target = num_ranks * -(-len(bins) // num_ranks)
    while len(bins) < target:
        splittable = [b for b in range(len(bins)) if len(bins[b]) >= 2]
        if not splittable:
            raise ValueError(_too_few_units_message(len(cost), num_ranks, target))
        b = max(splittable, key=lambda b: (bin_cost[b], -b))
        halves: list[list[int]] = [[], []]
        half_cost = [0.0, 0.0]
        half_rows, half_row_cost = [0, 0], [0.0, 0.0]  # padded: as in step 2
        for u in bins[b]:
            h = 0 if half_cost[0] <= half_cost[1] else 1
            halves[h].append(u)
            if widths is None:
                half_cost[h] += cost[u]
            else:
                half_rows[h] += counts[u]
                half_row_cost[h] = max(half_row_cost[h], cost[u])
                half_cost[h] = half_rows[h] * half_row_cost[h]
        bins[b], bin_cost[b] = halves[0], half_cost[0]
        bins.append(halves[1])
        bin_cost.append(half_cost[1])

    # Step 4: equal-size Karmarkar-Karp. A state is num_ranks subsets, each (sum, bins), kept
    # sorted by (sum desc, first bin asc); the state with the largest spread is merged first.
    by_cost = sorted(range(len(bins)), key=lambda b: (-bin_cost[b], b))
    heap: list[tuple[float, int, list[tuple[float, list[int]]]]] = []
    for k in range(0, len(by_cost), num_ranks):
        state = [(bin_cost[b], [b]) for b in by_cost[k:k + num_ranks]]
        heap.append((-(state[0][0] - state[-1][0]), len(heap), state))
    heapq.heapify(heap)
    next_id = len(heap)
    while len(heap) > 1:
        _, _, a = heapq.heappop(heap)
        _, _, b = heapq.heappop(heap)
        # Largest sums of `a` with smallest of `b` (b is sorted desc, so reverse it).
        merged = [(sa + sb, ba + bb) for (sa, ba), (sb, bb) in zip(a, reversed(b))]
        merged.sort(key=lambda s: (-s[0], s[1][0]))
        heapq.heappush(heap, (-(merged[0][0] - merged[-1][0]), next_id, merged))
        next_id += 1
    ranks = heap[0][2]

    # Step 5: each rank's bins by decreasing cost (ties: lower bin id).
    schedule = [b for _, rank_bins in ranks
                for b in sorted(rank_bins, key=lambda b: (-bin_cost[b], b))]
    units_by_bin = np.asarray([u for units in bins for u in sorted(units)], dtype=np.int64)
    bin_offsets = np.cumsum([0] + [len(units) for units in bins], dtype=np.int64)
    return units_by_bin, bin_offsets, np.asarray(schedule, dtype=np.int64)


def _check_positive_ints(**values) -> None:
    for name, value in values.items():
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")


def _too_few_units_message(num_units: int, num_ranks: int, target: int) -> str:
    return (f"cannot give num_ranks={num_ranks} ranks the same number of micro-batches: "
            f"{target} micro-batches are needed but there are only {num_units} "
            f"sequences/groups; pass more sequences per step or fewer ranks")


# ---------------------------------------------------------------------------------------
# pack


def _token_array(name: str, seq, integer: bool = True) -> np.ndarray:
    """A 1-D numpy view of a list / array / tensor (no copy when it already is one)."""
    if isinstance(seq, torch.Tensor):
        seq = seq.detach().cpu().numpy()
    array = seq if isinstance(seq, np.ndarray) else np.asarray(seq)
    if array.ndim != 1:
        raise ValueError(f"{name} must be a 1-D sequence, got shape {array.shape}")
    if integer and array.size and array.dtype.kind not in "iu":
        raise TypeError(f"{name} must hold integer token ids, got dtype {array.dtype}")
    return array


# Tokens materialized per chunk of micro-batches in `pack` (see the comment there).
_CHUNK_TOKENS = 1 << 20


def _chunks(plan: list[np.ndarray], lengths: np.ndarray):
    """Consecutive runs of micro-batches with about `_CHUNK_TOKENS` tokens in all."""
    chunk, tokens = [], 0
    for seqs in plan:
        chunk.append(seqs)
        tokens += int(lengths[seqs].sum())
        if tokens >= _CHUNK_TOKENS:
            yield chunk
            chunk, tokens = [], 0
    if chunk:
        yield chunk


def pack(sequences: Sequence, *, max_tokens: int, prompt_lengths=None,
         loss_masks: Sequence | None = None, groups=None,
         extras: dict[str, object] | None = None, num_ranks: int = 1, rank: int = 0,
         linear_cost: float = 1.0, attention_cost: float = DEFAULT_ATTENTION_COST,
         truncate: bool = False, ignore_index: int = -100, padded: bool = False,
         backend: str = "auto") -> list[PackedBatch]:
    """Pack token sequences into micro-batches of at most `max_tokens` tokens.

    Every rank calls `pack` with the same arguments and gets its own share (the plan is
    deterministic); all ranks get the same number of micro-batches.

    Args:
        sequences: num_seqs sequences of token ids (lists, 1-D arrays or tensors).
        max_tokens: token budget of one micro-batch.
        prompt_lengths: optional `[num_seqs]`; the first `prompt_lengths[s]` tokens of
            sequence s are prompt and are never predicted (their targets are ignore_index).
        loss_masks: optional per-sequence per-token 0/1 masks, the general form of
            `prompt_lengths` (multi-turn): token j is predicted only where mask[j] is 1.
        groups: optional `[num_seqs]` group ids; sequences sharing an id (a chosen/rejected
            pair, a GRPO group) always land in the same micro-batch, contiguously.
        extras: optional per-sequence values (`name -> [num_seqs]`) carried into each
            batch's `extras` in its sequence order (e.g. KTO labels, scores).
        num_ranks, rank: data-parallel world size and this rank.
        linear_cost, attention_cost: the workload model used to balance ranks.
        truncate: cut sequences longer than `max_tokens` to their first `max_tokens` tokens
            instead of raising.
        ignore_index: the target value where no loss is taken.
        padded: budget `max_tokens` for right-padded rows (sequences x the longest), as a
            model that runs padded needs (`engine.forward.runs_padded(model)`): the batches
            keep the packed layout, and `to_padded` fits the budget.
        backend: "auto", "cpp" or "python" planner (identical results).

    Returns:
        This rank's micro-batches, `list[PackedBatch]`.
    """
    if isinstance(sequences, (str, bytes, torch.Tensor)) or not hasattr(sequences, "__len__"):
        raise TypeError("sequences must be a list of token-id sequences")
    _check_positive_ints(max_tokens=max_tokens, num_ranks=num_ranks)
    if not isinstance(rank, (int, np.integer)) or not 0 <= rank < num_ranks:
        raise ValueError(f"rank must be an int in [0, num_ranks={num_ranks}), got {rank!r}")
    if prompt_lengths is not None and loss_masks is not None:
        raise ValueError("pass prompt_lengths or loss_masks, not both")
    num_seqs = len(sequences)
    if num_seqs == 0:
        raise ValueError("sequences must hold at least one sequence")
    arrays = [_token_array(f"sequences[{i}]", seq) for i, seq in enumerate(sequences)]
    full_lengths = np.fromiter(map(len, arrays), dtype=np.int64, count=num_seqs)
    masks = None  # per sequence, per token: may this token be predicted?
    if loss_masks is not None:
        if len(loss_masks) != num_seqs:
            raise ValueError(f"loss_masks must have one mask per sequence ({num_seqs}), "
                             f"got {len(loss_masks)}")
        masks = [_token_array(f"loss_masks[{i}]", m, integer=False)
                 for i, m in enumerate(loss_masks)]
        for i, m in enumerate(masks):
            if m.size != full_lengths[i]:
                raise ValueError(f"loss_masks[{i}] must have the length of sequences[{i}] "
                                 f"({full_lengths[i]}), got {m.size}")
            if m.size and not np.isin(m, (0, 1)).all():
                raise ValueError(f"loss_masks[{i}] must be bool or 0/1")
    prompts = None
    if prompt_lengths is not None:
        prompts = _as_int_array("prompt_lengths", prompt_lengths, num_seqs)
        if prompts.min() < 0:
            raise ValueError("prompt_lengths must be >= 0")
        if (prompts > full_lengths).any():
            bad = int(np.argmax(prompts > full_lengths))
            raise ValueError(f"prompt_lengths[{bad}]={int(prompts[bad])} is longer than "
                             f"sequences[{bad}] ({int(full_lengths[bad])} tokens)")
    if not truncate and full_lengths.max() > max_tokens:
        bad = int(np.argmax(full_lengths > max_tokens))
        raise ValueError(f"sequences[{bad}] has {int(full_lengths[bad])} tokens, more than "
                         f"max_tokens={max_tokens}; raise max_tokens or pass truncate=True")
    lengths = np.minimum(full_lengths, max_tokens) if truncate else full_lengths
    extra_tensors = {}
    for name, values in (extras or {}).items():
        t = values if isinstance(values, torch.Tensor) else torch.as_tensor(values)
        if t.dim() < 1 or t.shape[0] != num_seqs:
            raise ValueError(f"extras[{name!r}] must have one entry per sequence ({num_seqs}), "
                             f"got shape {tuple(t.shape)}")
        extra_tensors[name] = t
    group_ids = (np.arange(num_seqs, dtype=np.int64) if groups is None
                 else _as_int_array("groups", groups, num_seqs))

    plan = plan_micro_batches(lengths, max_tokens=max_tokens, groups=groups, num_ranks=num_ranks,
                              linear_cost=linear_cost, attention_cost=attention_cost,
                              padded=padded, backend=backend)[rank]
    # Built a chunk of micro-batches at a time: per-batch numpy calls cost more than the work
    # for small batches, and whole-rank arrays cost gigabytes for large inputs.
    batches = []
    for chunk in _chunks(plan, lengths):
        batches += _build_batches(chunk, arrays, lengths, prompts, masks, group_ids,
                                  extra_tensors, ignore_index)
    return batches


def _build_batches(plan: list[np.ndarray], arrays: list[np.ndarray], lengths: np.ndarray,
                   prompts: np.ndarray | None, masks: list[np.ndarray] | None,
                   group_ids: np.ndarray, extras: dict[str, torch.Tensor],
                   ignore_index: int) -> list[PackedBatch]:
    """The `PackedBatch`es of consecutive micro-batches `plan` (sequence indices each)."""
    order = np.concatenate(plan)
    seq_lengths = lengths[order]
    ends = np.cumsum(seq_lengths)
    input_ids = np.concatenate([arrays[s][:n] for s, n in zip(order, seq_lengths)])
    input_ids = input_ids.astype(np.int64, copy=False)
    positions = np.arange(ends[-1], dtype=np.int64) - np.repeat(ends - seq_lengths, seq_lengths)
    if masks is not None:
        learn = np.concatenate([masks[s][:n] for s, n in zip(order, seq_lengths)]).astype(bool)
    elif prompts is not None:
        learn = positions >= np.repeat(prompts[order], seq_lengths)
    else:
        learn = np.ones(ends[-1], dtype=bool)
    # targets[i] = input_ids[i+1] when token i+1 is in the same document and is learned.
    valid = np.zeros(ends[-1], dtype=bool)
    valid[:-1] = learn[1:]
    valid[ends - 1] = False  # each document's last token has no next token
    targets = np.full(ends[-1], ignore_index, dtype=np.int64)
    targets[:-1][valid[:-1]] = input_ids[1:][valid[:-1]]

    batches = []
    first = 0
    for seqs in plan:
        stop = first + seqs.size
        lo, hi = int(ends[first] - seq_lengths[first]), int(ends[stop - 1])
        seq_index = torch.from_numpy(seqs.astype(np.int64))
        batches.append(PackedBatch(
            input_ids=torch.from_numpy(input_ids[lo:hi].copy()),
            position_ids=torch.from_numpy(positions[lo:hi].copy()),
            cu_seqlens=torch.from_numpy(
                np.concatenate([[0], ends[first:stop] - lo]).astype(np.int32)),
            max_seqlen=int(seq_lengths[first:stop].max()),
            targets=torch.from_numpy(targets[lo:hi].copy()),
            loss_mask=torch.from_numpy(valid[lo:hi].copy()), seq_index=seq_index,
            group_index=torch.from_numpy(group_ids[seqs]),
            extras={name: t[seq_index.to(t.device)] for name, t in extras.items()},
            ignore_index=ignore_index))
        first = stop
    return batches


# ---------------------------------------------------------------------------------------
# Padding efficiency


@dataclass(frozen=True)
class PaddingEfficiency:
    """Real tokens over allocated token slots, packed vs plain padding.

    - packed: every micro-batch allocates `max_tokens` slots (a fixed-shape budget);
    - padded: the same sequences in their given order, `batch_size` per batch, each batch
      padded to its longest sequence.
    """

    real_tokens: int
    packed_slots: int
    padded_slots: int
    num_micro_batches: int
    num_padded_batches: int

    @property
    def packed(self) -> float:
        return self.real_tokens / self.packed_slots

    @property
    def padded(self) -> float:
        return self.real_tokens / self.padded_slots


def padding_efficiency(lengths, *, max_tokens: int, batch_size: int | None = None,
                       **plan_kwargs) -> PaddingEfficiency:
    """Padding efficiency of packing `lengths [num_seqs]` vs padding to the longest.

    `batch_size` (sequences per padded batch) defaults to `max_tokens // max(lengths)`: the
    number of longest sequences that fit the same token budget, so both sides use the same
    memory per step; `batch_size=len(lengths)` pads everything to the global longest.
    `plan_kwargs` go to `plan_micro_batches` (groups, num_ranks, ...).
    """
    lengths = _as_int_array("lengths", lengths)
    plan = plan_micro_batches(lengths, max_tokens=max_tokens, **plan_kwargs)
    num_micro_batches = sum(len(rank) for rank in plan)
    if batch_size is None:
        batch_size = max(1, max_tokens // int(lengths.max()))
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    padded_slots = sum(int(lengths[i:i + batch_size].max()) * lengths[i:i + batch_size].size
                       for i in range(0, lengths.size, batch_size))
    return PaddingEfficiency(
        real_tokens=int(lengths.sum()), packed_slots=num_micro_batches * max_tokens,
        padded_slots=padded_slots, num_micro_batches=num_micro_batches,
        num_padded_batches=-(-lengths.size // batch_size))
