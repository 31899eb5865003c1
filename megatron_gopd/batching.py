"""How a step's rows become micro-batches, for the student's passes and a frozen model's scoring alike.

Without a token budget, every `max_rows` consecutive rows form a micro-batch. With one, the rows are grouped by
length, longest first, so that each micro-batch holds at most `max_tokens` tokens counting its padding (packed:
counting its rows' tokens) and at most `max_rows` rows; a row longer than the budget gets a micro-batch of its own
and is counted. Each micro-batch is padded only to its own longest row, or packed end to end (models/packing.py).
The loss stays exact whatever the grouping: its normaliser is the step's global one (algo/losses.py).

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
    order = list(range(len(lengths)))
    if batching.max_tokens is not None:
        order.sort(key=lambda i: -lengths[i])  # stable: rows of equal length keep the rollout order
    micro_batches, over = [], 0
    open_batches: dict[Hashable, list[int]] = {}
    for i in order:
        current = open_batches.get(groups[i])
        fits = current is not None and len(current) < batching.max_rows and (
            batching.max_tokens is None
            or batching.cost([lengths[j] for j in current + [i]]) <= batching.max_tokens)
        if fits:
            current.append(i)
            continue
        current = [i]
        micro_batches.append(current)
        open_batches[groups[i]] = current
        if batching.max_tokens is not None and lengths[i] > batching.max_tokens:
            over += 1
    return Plan(micro_batches, over)


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
