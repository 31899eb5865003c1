"""Maps a local dataset (jsonl, json or parquet files, or directories of them) to the trainer's rows
`{"prompt", "domain", "answer" | "tests", ...}` (see megatron_gopd/data/prompts.py), as jsonl.

    python tools/prepare_data.py --input DIR_OR_FILES... --output data/x.jsonl --preset NAME [--where ...]
    python tools/prepare_data.py --input FILES... --output data/x.jsonl --prompt COL --domain math --answer COL

Presets (the recipes' data; download the datasets yourself, e.g. `huggingface-cli download --repo-type dataset`):
  deepmath     DeepMath-103K: prompt = question, answer = final_answer, domain math. The paper's teachers train on
               difficulty >= 6: add --where "difficulty>=6".
  eurus-code   Eurus-2-RL-Data's code rows (ability == code): prompt = the chat messages in `prompt`, tests from
               reward_model.ground_truth. Call-based tests ({"fn_name", "inputs", "outputs"}) become assertions;
               stdin/stdout tests are skipped and counted (the code verifier runs assertions, not programs on stdin).
  eurus-math   Eurus-2-RL-Data's math rows: prompt messages, answer = reward_model.ground_truth.

Columns are named by dotted paths into nested objects (reward_model.ground_truth). --where takes COL==VALUE,
COL!=VALUE, COL>=NUMBER or COL<=NUMBER (repeatable, all must hold); --keep copies more columns unchanged.
"""

from __future__ import annotations

import argparse
import json
import operator
import re
from collections import Counter
from typing import Any

PRESETS = {
    "deepmath": {"prompt": "question", "answer": "final_answer", "domain": "math"},
    "eurus-code": {"prompt": "prompt", "tests": "reward_model.ground_truth", "tests_format": "call-based",
                   "domain": "code", "where": ["ability==code"]},
    "eurus-math": {"prompt": "prompt", "answer": "reward_model.ground_truth", "domain": "math",
                   "where": ["ability==math"]},
}
_CONDITION = re.compile(r"^([\w.]+)(==|!=|>=|<=)(.*)$")
_OPERATORS = {"==": operator.eq, "!=": operator.ne, ">=": operator.ge, "<=": operator.le}


class SkipRow(Exception):
    """A row left out, with the reason counted in the summary."""


def column(row: dict, path: str) -> Any:
    value = row
    for key in path.split("."):
        if not isinstance(value, dict) or key not in value:
            raise SkipRow(f"no column {path}")
        value = value[key]
    return value


def parse_condition(text: str):
    match = _CONDITION.match(text)
    if not match:
        raise ValueError(f"--where {text!r}: expected COL==VALUE, COL!=VALUE, COL>=NUMBER or COL<=NUMBER")
    path, op, wanted = match.groups()
    if op in (">=", "<="):
        wanted = float(wanted)

    def holds(row: dict) -> bool:
        value = column(row, path)
        return _OPERATORS[op](float(value) if op in (">=", "<=") else str(value), wanted)

    return holds


def call_based_tests(ground_truth: Any) -> str:
    """Assertion source for `{"fn_name", "inputs", "outputs"}` tests (APPS/TACO style, as in Eurus-2-RL-Data): the
    function is module-level or a method of a LeetCode-style `Solution` class; an expected output may come
    wrapped in a one-element list."""
    spec = json.loads(ground_truth) if isinstance(ground_truth, str) else ground_truth
    if not isinstance(spec, dict) or "inputs" not in spec or "outputs" not in spec:
        raise SkipRow("tests are not {inputs, outputs}")
    name = spec.get("fn_name")
    if not name:
        raise SkipRow("stdin/stdout tests (no fn_name)")
    if len(spec["inputs"]) != len(spec["outputs"]) or not spec["inputs"]:
        raise SkipRow("tests with no cases or unequal inputs and outputs")
    lines = [f"_fn = globals()[{name!r}] if {name!r} in globals() else getattr(Solution(), {name!r})",
             "def _same(got, want):",
             "    return got == want or [got] == want or (isinstance(got, tuple) and list(got) == want)"]
    for args, want in zip(spec["inputs"], spec["outputs"]):
        args = args if isinstance(args, list) else [args]
        lines.append(f"assert _same(_fn(*{args!r}), {want!r})")
    return "\n".join(lines) + "\n"


def map_row(row: dict, args) -> dict:
    out = {"prompt": column(row, args.prompt)}
    out["domain"] = str(column(row, args.domain_column)) if args.domain_column else args.domain
    if args.answer:
        out["answer"] = column(row, args.answer)
    if args.tests:
        tests = column(row, args.tests)
        out["tests"] = call_based_tests(tests) if args.tests_format == "call-based" else tests
    for path in args.keep:
        out[path] = column(row, path)
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True, nargs="+", help="jsonl / json / parquet files or directories")
    parser.add_argument("--output", required=True)
    parser.add_argument("--preset", choices=sorted(PRESETS))
    parser.add_argument("--prompt", help="column holding the prompt (text or chat messages)")
    parser.add_argument("--domain", help="the domain of every row")
    parser.add_argument("--domain-column", help="column holding each row's domain")
    parser.add_argument("--answer", help="column holding the reference answer")
    parser.add_argument("--tests", help="column holding the code tests")
    parser.add_argument("--tests-format", choices=["as-is", "call-based"],
                        help="as-is (assertions, or {test, entry_point}; the default) or call-based "
                             "({fn_name, inputs, outputs}, turned into assertions)")
    parser.add_argument("--where", action="append", default=[], help="COL==VALUE, COL!=VALUE, COL>=N or COL<=N")
    parser.add_argument("--keep", nargs="*", default=[], help="more columns to copy as they are")
    parser.add_argument("--limit", type=int, help="stop after this many rows are written")
    args = parser.parse_args(argv)
    preset = PRESETS.get(args.preset, {})
    for key in ("prompt", "answer", "tests", "tests_format", "domain"):
        if getattr(args, key) is None and key in preset and not (key == "domain" and args.domain_column):
            setattr(args, key, preset[key])
    if not args.prompt or (args.domain is None) == (args.domain_column is None):
        parser.error("give --prompt and one of --domain / --domain-column (or a --preset)")
    args.tests_format = args.tests_format or "as-is"
    conditions = [parse_condition(c) for c in preset.get("where", []) + args.where]

    from megatron_gopd.data.prompts import read_raw_rows, write_jsonl

    skipped: Counter[str] = Counter()

    def rows():
        kept = 0
        for _location, row in read_raw_rows(args.input):
            if args.limit is not None and kept >= args.limit:
                return
            try:
                if not all(holds(row) for holds in conditions):
                    skipped["filtered by --where"] += 1
                    continue
                mapped = map_row(row, args)
            except SkipRow as reason:
                skipped[str(reason)] += 1
                continue
            kept += 1
            yield mapped

    written = write_jsonl(args.output, rows())
    summary = {"written": written, "skipped": dict(skipped)}
    print(f"wrote {written} rows to {args.output}; skipped: {dict(skipped) or 'none'}")
    return summary


if __name__ == "__main__":
    main()
