"""How a step's rows become micro-batches, for the student's passes and a frozen model's scoring alike.

Without a token budget, every `max_rows` consecutive rows form a micro-batch. With one, the rows are grouped by
length, longest first, so that each micro-batch holds at most `max_tokens` tokens counting its padding (packed:
counting its rows' tokens) and at most `max_rows` rows: the fewest micro-batches, and of those the least padding.
A row longer than the budget gets a micro-batch of its own and is counted. Each micro-batch is padded only to its
own longest row, or packed end to end (models/packing.py). The loss stays exact whatever the grouping: its
normaliser is the step's global one (algo/losses.py).

A micro-batch is a dict of tensors laid out like its `tokens` ([rows, seq] padded, [1, T] packed), with `row_ids`
naming each token's row (0..rows-1 in the micro-batch's own order; a packed padding tail gets `rows`) and
`lengths` [rows] each row's tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Hashable, Sequence

import torch

from megatron_gopd.models.packing import ROW_BOUNDS, pack_rows, pack_values, row_index

MicroBatch = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Batching:
    max_rows: int  # rows per micro-batch at most
    max_tokens: int | None = None  # token budget per micro-batch; None: max_rows consecutive rows
    packed: bool = False  # rows end to end in one sequence instead of padded to the longest

    def cost(self, lengths: Sequence[int]) -> int:
        """The tokens a micro-batch of rows of these lengths holds: with padding, or packed."""
        return sum(lengths) if self.packed else len(lengths) * max(lengths)


@dataclass(frozen=True)
class Plan:
    micro_batches: list[list[int]]  # row indices of each micro-batch
    over_budget: int  # rows longer than the token budget, each alone in its micro-batch


def plan(lengths: Sequence[int], batching: Batching, groups: Sequence[Hashable] | None = None) -> Plan:
    """The micro-batches of rows of these lengths. Rows of different `groups` never share a micro-batch (the
    full-vocabulary loss runs one teacher over a whole micro-batch)."""
    groups = list(groups) if groups is not None else [None] * len(lengths)
    rows_of: dict[Hashable, list[int]] = {}
    if batching.max_tokens is None:
        micro_batches = []
        for i, group in enumerate(groups):
            current = rows_of.get(group)
            if current is None or len(current) == batching.max_rows:
                rows_of[group] = current = []
                micro_batches.append(current)
            current.append(i)
        return Plan(micro_batches, 0)
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])  # stable: equal lengths keep the rollout order
    for i in order:
        rows_of.setdefault(groups[i], []).append(i)
    micro_batches = [mb for rows in rows_of.values() for mb in _split_by_budget(rows, lengths, batching)]
    rank = {row: position for position, row in enumerate(order)}
    micro_batches.sort(key=lambda mb: rank[mb[0]])
    return Plan(micro_batches, sum(n > batching.max_tokens for n in lengths))


def _split_by_budget(rows: list[int], lengths: Sequence[int], batching: Batching) -> list[list[int]]:
    """Rows sorted longest first, cut into consecutive runs: the fewest micro-batches under the budget, and among
    those the least padding. A greedy fill gives the fewest but pads more: it closes each micro-batch as full as it
    goes, where a shorter one can let the next start at a shorter row. Dynamic programming over the cut points
    (best[i]: the rows from i on), at most max_rows candidates each."""
    best: list[tuple[int, int, int]] = [(0, 0, 0)] * (len(rows) + 1)  # (micro-batches, tokens run, first's size)
    for i in range(len(rows) - 1, -1, -1):
        options = []
        for size in range(1, min(batching.max_rows, len(rows) - i) + 1):
            cost = batching.cost([lengths[r] for r in rows[i:i + size]])
            if size > 1 and cost > batching.max_tokens:
                break  # longest first: a bigger micro-batch only costs more
            after = best[i + size]
            options.append((after[0] + 1, after[1] + cost, -size))  # ties: the fuller micro-batch first
        count, tokens, negative_size = min(options)
        best[i] = (count, tokens, -negative_size)
    micro_batches, i = [], 0
    while i < len(rows):
        micro_batches.append(rows[i:i + best[i][2]])
        i += best[i][2]
    return micro_batches


def assemble(rows: Sequence[Sequence[int]], batching: Batching, pad_id: int = 0,
             per_token: dict[str, Sequence[torch.Tensor]] | None = None) -> MicroBatch:
    """One micro-batch of these token rows (right-padded with `pad_id`, or packed), with `row_ids` and any
    per-token values given per row (each [len(row)]) laid out the same way (zeros where no row is)."""
    lengths = [len(r) for r in rows]
    batch = {"tokens": _padded([torch.tensor(r, dtype=torch.long) for r in rows], pad_id),
             "lengths": torch.tensor(lengths)}
    for key, values in (per_token or {}).items():
        batch[key] = _padded(values, 0)
    mb = pack_rows(batch, lengths) if batching.packed else batch
    mb["row_ids"] = row_ids(mb)
    return mb


def lay_out(mb: MicroBatch, values: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per-row per-token values (row i: [its length], aligned with its tokens) laid out like the micro-batch's
    tokens, zeros elsewhere."""
    if ROW_BOUNDS in mb:
        return pack_values(list(values), mb[ROW_BOUNDS], mb["tokens"].shape[1])
    out = _padded(values, 0)
    return torch.nn.functional.pad(out, (0, mb["tokens"].shape[1] - out.shape[1]))


def per_row(mb: MicroBatch, values: torch.Tensor) -> list[torch.Tensor]:
    """The inverse of `lay_out`: each row's values ([its length]) from a tensor laid out like the tokens."""
    if ROW_BOUNDS in mb:
        bounds = mb[ROW_BOUNDS].tolist()
        return [values[0, start:end] for start, end in zip(bounds[:-1], bounds[1:])]
    return [values[i, :n] for i, n in enumerate(mb["lengths"].tolist())]


def row_ids(mb: MicroBatch) -> torch.Tensor:
    """The row of each token, shaped like the tokens."""
    tokens = mb["tokens"]
    if ROW_BOUNDS in mb:
        return row_index(mb[ROW_BOUNDS], tokens.shape[1]).unsqueeze(0)
    return torch.arange(tokens.shape[0]).unsqueeze(1).expand_as(tokens)


def num_rows(mb: MicroBatch) -> int:
    return len(mb["lengths"])


def spread(mb: MicroBatch, values: torch.Tensor) -> torch.Tensor:
    """Per-row values ([rows]) on every token of their row (0 on a packed padding tail)."""
    return torch.cat([values, values.new_zeros(1)])[mb["row_ids"]]


def _padded(values: Sequence[torch.Tensor], fill) -> torch.Tensor:
    return torch.nn.utils.rnn.pad_sequence(list(values), batch_first=True, padding_value=fill)
