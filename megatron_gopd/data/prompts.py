"""Prompt datasets: load, validate, tokenise, and sample them deterministically across data-parallel ranks.

A row has `prompt` (a string, or chat messages: a list of {"role", "content"}), `domain` (the tag that picks the
teacher), optional `answer` / `tests` (kept for evaluation) and any extra columns (passed through untouched).

Sources are local .jsonl / .json / .parquet files, directories of them, lists of those, or a hub dataset name.
Every kept prompt and every dropped row carries a location:
    "path:N"  for line-based files, N = the 1-based physical line;
    "path#N"  for row-based sources (parquet, a JSON array, a hub dataset), N = the 0-based row index.

Prompt templates: with a tokenizer chat template, the messages are rendered by it with
add_generation_prompt=True and tokenised without extra special tokens (the template already places them).
Without one, the plain template below is used and the tokenizer adds its usual special tokens (e.g. BOS):
    "User: {content}"  (one line per message, role capitalised: "System: ...", "Assistant: ...")
    "Assistant:"       (last line; the model answers after the colon)
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections import Counter
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import datasets
import numpy as np
from transformers import PreTrainedTokenizerBase

DATA_SUFFIXES = (".jsonl", ".json", ".parquet")
MESSAGE_ROLES = ("system", "user", "assistant", "tool")
MAX_EXAMPLES = 5  # dropped rows quoted per reason in the report

# Why a row was dropped. Unknown domains are not here: they are a load-time error (see load_prompts).
BAD_ROW_REASONS = {
    "invalid_json": "the line is not valid JSON",
    "not_an_object": "the row is not a JSON object",
    "missing_prompt": "no `prompt` field",
    "empty_prompt": "the prompt is empty or only whitespace",
    "bad_prompt_type": "`prompt` is neither a string nor a list of chat messages",
    "bad_messages": "a chat message has a bad role or non-string content",
    "missing_domain": "no `domain` field",
    "bad_domain": "`domain` is not a non-empty string",
    "too_long": "the tokenised prompt is longer than max_prompt_len",
}


class BadRowError(ValueError):
    """A malformed row, raised with on_bad_row="error"."""


class UnknownDomainError(ValueError):
    """Rows whose domain has no teacher while no default teacher is configured."""


@dataclass
class DataReport:
    """What loading kept and dropped; the trainer logs `summary()` and `as_metrics()`."""

    kept: int = 0
    dropped: Counter[str] = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)  # reason -> first few "location: detail"
    domains: Counter[str] = field(default_factory=Counter)  # kept prompts per domain

    def record(self, reason: str, location: str, detail: str) -> None:
        self.dropped[reason] += 1
        quoted = self.examples.setdefault(reason, [])
        if len(quoted) < MAX_EXAMPLES:
            quoted.append(f"{location}: {detail}")

    @property
    def num_dropped(self) -> int:
        return sum(self.dropped.values())

    def summary(self) -> str:
        domains = ", ".join(f"{d}={n}" for d, n in sorted(self.domains.items()))
        lines = [f"prompts: kept {self.kept} ({domains}), dropped {self.num_dropped}"]
        for reason, count in sorted(self.dropped.items()):
            lines.append(f"  dropped {count} ({reason}: {BAD_ROW_REASONS[reason]}), e.g.")
            lines.extend(f"    {example}" for example in self.examples[reason])
        return "\n".join(lines)

    def as_metrics(self) -> dict[str, int]:
        metrics = {"data/prompts": self.kept, "data/dropped": self.num_dropped}
        metrics.update({f"data/dropped/{reason}": n for reason, n in self.dropped.items()})
        metrics.update({f"data/domain/{domain}": n for domain, n in self.domains.items()})
        return metrics


@dataclass
class PromptItem:
    uid: str  # the source location, stable across runs: "path:line" or "path#row"
    prompt_ids: list[int]
    domain: str
    answer: Any = None
    tests: Any = None
    extra: dict[str, Any] = field(default_factory=dict)  # every other column of the row


class PromptDataset:
    """Tokenised prompts (an Arrow-backed `datasets.Dataset`), the report of how they were loaded, and what the
    files were (size and sha256 of each local file): its part of a training checkpoint, checked on resume."""

    def __init__(self, table: datasets.Dataset, report: DataReport, files: dict[str, dict] | None = None):
        self.table = table
        self.report = report
        self.files = files or {}

    def state_dict(self) -> dict:
        return {"files": self.files, "rows": len(self.table)}

    def load_state_dict(self, state: dict) -> None:
        """Warns, naming each file that changed since the checkpoint, and the rule: step k draws the k-th batch of
        the prompts as they are now (PromptSampler), so which prompts come next follows the current files."""
        saved = state["files"]
        changed = sorted(set(saved) ^ set(self.files) | {f for f in saved if saved[f] != self.files.get(f, saved[f])})
        for path in changed:
            before, now = saved.get(path), self.files.get(path)
            what = ("is new" if before is None else "is gone" if now is None else
                    f"changed ({before['size']} -> {now['size']} bytes, sha256 {before['sha256'][:12]} -> "
                    f"{now['sha256'][:12]})")
            warnings.warn(f"data file {path} {what} since the checkpoint; each step draws its batch from the "
                          f"{len(self.table)} prompts as they are now ({state['rows']} then), so the prompts that come "
                          "next follow the current files", stacklevel=2)

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, index: int) -> PromptItem:
        return self.take([index])[0]

    def take(self, indices: Sequence[int]) -> list[PromptItem]:
        columns = self.table[list(indices)]
        items = []
        for uid, ids, domain, meta in zip(columns["uid"], columns["prompt_ids"], columns["domain"], columns["meta"]):
            extra = json.loads(meta)
            answer, tests = extra.pop("answer", None), extra.pop("tests", None)
            items.append(PromptItem(uid=uid, prompt_ids=ids, domain=domain, answer=answer, tests=tests, extra=extra))
        return items


class _RowProblem(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def load_prompts(
    sources: str | os.PathLike | Sequence[str | os.PathLike],
    tokenizer: PreTrainedTokenizerBase,
    *,
    max_prompt_len: int | None,
    known_domains: Collection[str] | None = None,
    default_domain_ok: bool = False,
    on_bad_row: Literal["skip", "error"] = "skip",
    split: str = "train",
    num_proc: int | None = None,
    chat_template_kwargs: Mapping[str, Any] | None = None,
) -> PromptDataset:
    """Loads, validates and tokenises prompts from `sources` (files, directories, or a hub dataset name).

    Malformed rows are skipped and counted in the report (on_bad_row="skip") or raise BadRowError naming the
    first one's location (on_bad_row="error"). Prompts over max_prompt_len tokens are always dropped and counted.
    A domain outside `known_domains` raises UnknownDomainError unless `default_domain_ok` (a default teacher
    exists); known_domains=None accepts every domain (e.g. evaluation without teachers).
    `chat_template_kwargs` go to the chat template (e.g. enable_thinking=False for Qwen3's non-thinking mode).
    """
    if on_bad_row not in ("skip", "error"):
        raise ValueError(f"on_bad_row must be 'skip' or 'error', got {on_bad_row!r}")
    if max_prompt_len is not None and max_prompt_len <= 0:
        raise ValueError(f"max_prompt_len must be positive, got {max_prompt_len}")
    known = None if known_domains is None or default_domain_ok else set(known_domains)

    report = DataReport()
    rows: list[dict[str, str | list]] = []
    unknown: dict[str, list[str]] = {}  # domain -> locations of its rows
    resolved = _resolve_sources(sources)
    for location, row in _read_rows(resolved, split):
        try:
            rows.append(_normalise(row, location))
        except _RowProblem as problem:
            if on_bad_row == "error":
                raise BadRowError(f"{location}: {problem.reason}: {problem.detail}") from None
            report.record(problem.reason, location, problem.detail)
            continue
        if known is not None and rows[-1]["domain"] not in known:
            unknown.setdefault(rows[-1]["domain"], []).append(location)
    if unknown:
        raise UnknownDomainError("\n".join(
            f"domain {domain!r} has no teacher ({len(locs)} rows, first at {locs[0]}); known domains: "
            f"{sorted(known)}. Route it to a teacher or configure a default teacher."
            for domain, locs in unknown.items()
        ))
    if not rows:
        raise ValueError(f"no usable prompts in {sources!r}\n{report.summary()}")

    table = datasets.Dataset.from_list(rows).map(
        lambda batch: {"prompt_ids": encode_prompts(batch["messages"], tokenizer, chat_template_kwargs)},
        batched=True, remove_columns=["messages"], num_proc=num_proc, desc="tokenising prompts",
    )
    if max_prompt_len is not None:
        lengths = np.fromiter((len(ids) for ids in table["prompt_ids"]), dtype=np.int64, count=len(table))
        too_long = np.flatnonzero(lengths > max_prompt_len)
        for index in too_long:
            report.record("too_long", table[int(index)]["uid"],
                          f"{lengths[index]} tokens > max_prompt_len {max_prompt_len}")
        if len(too_long):
            table = table.select(np.flatnonzero(lengths <= max_prompt_len))
    if len(table) == 0:
        raise ValueError(f"no usable prompts in {sources!r}\n{report.summary()}")
    report.kept = len(table)
    report.domains.update(table["domain"])
    return PromptDataset(table, report, {f: _fingerprint(f) for f in resolved if Path(f).is_file()})


def _fingerprint(path: str) -> dict:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return {"size": os.path.getsize(path), "sha256": digest.hexdigest()}


def encode_prompts(conversations: Sequence[Sequence[Mapping[str, str]]], tokenizer: PreTrainedTokenizerBase,
                   chat_template_kwargs: Mapping[str, Any] | None = None) -> list[list[int]]:
    """Token ids of each conversation followed by the assistant's turn (see the module doc for the templates);
    `chat_template_kwargs` are the chat template's variables (without a template there is nothing to pass)."""
    if getattr(tokenizer, "chat_template", None):
        texts = tokenizer.apply_chat_template([list(c) for c in conversations], add_generation_prompt=True,
                                              tokenize=False, **(chat_template_kwargs or {}))
        return tokenizer(texts, add_special_tokens=False)["input_ids"]
    return tokenizer([plain_template(c) for c in conversations])["input_ids"]


def plain_template(messages: Sequence[Mapping[str, str]]) -> str:
    """The prompt text used when the tokenizer has no chat template."""
    return "".join(f"{m['role'].capitalize()}: {m['content']}\n" for m in messages) + "Assistant:"


def _resolve_sources(sources: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """Files (directories expanded, sorted) and hub names. A hub name is a path that does not exist, is not
    absolute or relative-dotted, and has no data suffix; anything else that is missing is a clear error."""
    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    resolved = []
    for source in sources:
        path = Path(source)
        if path.is_dir():
            # Hidden files are skipped: write_jsonl's temporary files are hidden until they are complete.
            files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in DATA_SUFFIXES
                           and not any(part.startswith(".") for part in p.relative_to(path).parts))
            if not files:
                raise FileNotFoundError(f"no {'/'.join(DATA_SUFFIXES)} files under {path}")
            resolved.extend(str(p) for p in files)
        elif path.is_file():
            if path.suffix not in DATA_SUFFIXES:
                raise ValueError(f"{path}: unsupported prompt file type {path.suffix!r}; use one of {DATA_SUFFIXES}")
            resolved.append(str(path))
        elif path.suffix in DATA_SUFFIXES or str(source).startswith(("/", ".", "~")):
            raise FileNotFoundError(f"prompt source {str(source)!r} does not exist")
        else:
            resolved.append(str(source))
    if not resolved:
        raise ValueError("no prompt sources given")
    return resolved


def read_raw_rows(sources: str | os.PathLike | Sequence[str | os.PathLike],
                  split: str = "train") -> Iterator[tuple[str, Any]]:
    """(location, row) for every row of `sources`, unvalidated, as load_prompts reads them (tools/prepare_data.py
    maps other layouts to ours with it); a line that is not JSON raises ValueError naming its location."""
    for location, row in _read_rows(_resolve_sources(sources), split):
        if isinstance(row, _RowProblem):
            raise ValueError(f"{location}: {row.reason}: {row.detail}")
        yield location, row


def _read_rows(sources: list[str], split: str) -> Iterator[tuple[str, Any]]:
    """(location, row) for every row; a line that is not JSON yields a _RowProblem as its row."""
    for source in sources:
        if source.endswith(".parquet"):
            yield from _indexed_rows(source, datasets.Dataset.from_parquet(source))
        elif source.endswith((".jsonl", ".json")):
            if source.endswith(".json") and _starts_with_array(source):
                with open(source, encoding="utf-8") as f:
                    records = json.load(f)
                yield from ((f"{source}#{i}", row) for i, row in enumerate(records))
            else:
                yield from _jsonl_rows(source)
        else:
            yield from _indexed_rows(source, datasets.load_dataset(source, split=split))


def _indexed_rows(source: str, dataset: datasets.Dataset) -> Iterator[tuple[str, Any]]:
    yield from ((f"{source}#{i}", row) for i, row in enumerate(dataset))


def _jsonl_rows(path: str) -> Iterator[tuple[str, Any]]:
    # Read by hand rather than with datasets' json loader: that loader rejects the whole file on one bad line
    # and loses physical line numbers (blank lines, and rows it filters). Reading bytes and splitting on b"\n"
    # only keeps the line count exact even when a string holds U+2028 or a stray "\r", and a line that is not
    # UTF-8 becomes one bad row instead of a failed file. The good rows still go into a `datasets.Dataset`.
    with open(path, "rb") as f:
        for line_number, line in enumerate(f, start=1):
            if not line.strip():  # blank lines (e.g. a trailing one) are not rows
                continue
            try:
                row = json.loads(line)
            except ValueError as error:  # JSONDecodeError and UnicodeDecodeError
                row = _RowProblem("invalid_json", str(error))
            yield f"{path}:{line_number}", row


def _starts_with_array(path: str) -> bool:
    with open(path, "rb") as f:
        head = f.read(4096).lstrip()
    return head.startswith(b"[")


def _normalise(row: Any, location: str) -> dict[str, str | list]:
    """The stored form of a good row: uid, messages, domain, and every other column as a JSON string (a single
    string column keeps the Arrow schema fixed even when `answer` is a number in one row and a list in another)."""
    if isinstance(row, _RowProblem):
        raise row
    if not isinstance(row, Mapping):
        raise _RowProblem("not_an_object", f"expected a JSON object, got {type(row).__name__}")
    if row.get("prompt") is None:
        raise _RowProblem("missing_prompt", f"no `prompt` field (fields: {sorted(row)})")
    messages = _messages(row["prompt"])
    domain = row.get("domain")
    if domain is None:
        raise _RowProblem("missing_domain", f"no `domain` field (fields: {sorted(row)})")
    if not isinstance(domain, str) or not domain.strip():
        raise _RowProblem("bad_domain", f"`domain` must be a non-empty string, got {domain!r}")
    # default=str: parquet/hub columns may hold timestamps or decimals, which JSON cannot hold as such.
    meta = json.dumps({k: v for k, v in row.items() if k not in ("prompt", "domain")},
                      ensure_ascii=False, default=str)
    return {"uid": location, "messages": messages, "domain": domain, "meta": meta}


def _messages(prompt: Any) -> list[dict[str, str]]:
    if isinstance(prompt, str):
        if not prompt.strip():
            raise _RowProblem("empty_prompt", "`prompt` is empty or whitespace")
        return [{"role": "user", "content": prompt}]
    if not isinstance(prompt, list):
        raise _RowProblem("bad_prompt_type",
                          f"`prompt` must be a string or a list of chat messages, got {type(prompt).__name__}")
    if not prompt:
        raise _RowProblem("empty_prompt", "`prompt` is an empty list of messages")
    messages = []
    for i, message in enumerate(prompt):
        if not isinstance(message, Mapping):
            raise _RowProblem("bad_messages", f"message {i} must be a {{role, content}} object, got {message!r}")
        role, content = message.get("role"), message.get("content")
        if role not in MESSAGE_ROLES:
            raise _RowProblem("bad_messages", f"message {i} has role {role!r}; expected one of {MESSAGE_ROLES}")
        if not isinstance(content, str):
            raise _RowProblem("bad_messages", f"message {i} content must be a string, got {type(content).__name__}")
        messages.append({"role": role, "content": content})
    if not any(m["content"].strip() for m in messages):
        raise _RowProblem("empty_prompt", "every message of `prompt` is empty or whitespace")
    return messages


class PromptSampler:
    """Which prompts each DP rank gets at each step: a function of the step alone, so that a run resumes at any step
    (and drawing ahead of training changes nothing) with no state of its own to save.

    Epoch e = step // steps_per_epoch visits the prompts in a permutation drawn from (seed, e); step s of it is the
    global batch order[s*P:(s+1)*P] (P = prompts_per_step), and DP rank r of R takes the r-th contiguous 1/R of it,
    so the ranks are disjoint and together form the global batch. The global batches do not depend on R, so a run
    may resume with another DP size. The last num_prompts % P prompts of each epoch's order are skipped (every step
    is full).
    """

    def __init__(self, num_prompts: int, prompts_per_step: int, *, seed: int, dp_rank: int = 0, dp_size: int = 1,
                 shuffle: bool = True):
        if prompts_per_step <= 0:
            raise ValueError(f"prompts_per_step must be positive, got {prompts_per_step}")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} is outside [0, dp_size={dp_size})")
        if prompts_per_step % dp_size:
            raise ValueError(f"prompts_per_step ({prompts_per_step}) must be divisible by the data-parallel size "
                             f"({dp_size}) so that every DP rank gets the same number of prompts")
        if num_prompts < prompts_per_step:
            raise ValueError(f"the dataset has {num_prompts} prompts, fewer than prompts_per_step ({prompts_per_step})")
        if seed < 0:
            raise ValueError(f"seed must be non-negative, got {seed}")
        self.num_prompts, self.prompts_per_step, self.seed, self.shuffle = num_prompts, prompts_per_step, seed, shuffle
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self._order_cache: tuple[int, np.ndarray] | None = None

    @property
    def steps_per_epoch(self) -> int:
        return self.num_prompts // self.prompts_per_step

    def global_batch(self, step: int) -> list[int]:
        """All ranks' prompt indices at `step`."""
        epoch, position = divmod(step, self.steps_per_epoch)
        start = position * self.prompts_per_step
        return self._order(epoch)[start:start + self.prompts_per_step].tolist()

    def indices(self, step: int) -> list[int]:
        """This rank's prompt indices at `step`."""
        per_rank = self.prompts_per_step // self.dp_size
        return self.global_batch(step)[self.dp_rank * per_rank:(self.dp_rank + 1) * per_rank]

    def _order(self, epoch: int) -> np.ndarray:
        if self._order_cache is None or self._order_cache[0] != epoch:
            order = (np.random.default_rng([self.seed, epoch]).permutation(self.num_prompts) if self.shuffle
                     else np.arange(self.num_prompts))
            self._order_cache = (epoch, order)
        return self._order_cache[1]


def write_jsonl(path: str | os.PathLike, rows: Iterable[Mapping[str, Any]]) -> int:
    """Writes rows as JSON lines atomically: readers see the old file or the complete new one, never a part.
    Returns the number of rows written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        count = 0
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
                count += 1
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; a dataset should be readable like any other file
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return count
