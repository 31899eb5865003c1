"""The toy example's data: exact answers by independent recomputation, worked solutions, deterministic disjoint
splits, the character tokenizer (HF format, chat template) and loading a split with the project's prompt loader."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from examples.toy import make_data, tokenizer as toy_tokenizer
from examples.toy.tasks import (
    CodeConfig,
    DSLError,
    MathConfig,
    Problem,
    concludes,
    config_from_overrides,
    grade,
    math_step,
    parse_program,
    run_program,
    sample,
)
from megatron_gopd.data import load_prompts

SIZES = {"test": 60, "val": 30, "train": 120, "pretrain": 300}


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("toy-data")
    make_data.main(["--out", str(out), "--seed", "3", "--sizes", *(f"{k}={v}" for k, v in SIZES.items())])
    return out


@pytest.fixture(scope="module")
def tokenizer_dir(data_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("toy-tokenizer")
    toy_tokenizer.main(["--data", str(data_dir), "--out", str(out)])
    return out


# ---------------------------------------------------------------- generation and splits

def test_same_seed_gives_byte_identical_files_and_another_seed_differs(data_dir, tmp_path):
    make_data.make_data(tmp_path / "again", seed=3, sizes=SIZES)
    make_data.make_data(tmp_path / "other", seed=4, sizes=SIZES)
    names = sorted(str(p.relative_to(data_dir)) for p in data_dir.rglob("*") if p.is_file())
    assert len(names) == 13  # 2 domains x 4 splits + 4 combined + manifest
    for name in names:
        assert (tmp_path / "again" / name).read_bytes() == (data_dir / name).read_bytes(), name
    assert (tmp_path / "other" / "test.jsonl").read_bytes() != (data_dir / "test.jsonl").read_bytes()


def test_growing_training_splits_keeps_held_out_splits(data_dir, tmp_path):
    make_data.make_data(tmp_path, seed=3, sizes={**SIZES, "train": 200, "pretrain": 10})
    for domain in ("math", "code"):
        for split in ("test", "val"):
            assert (tmp_path / domain / f"{split}.jsonl").read_bytes() == \
                (data_dir / domain / f"{split}.jsonl").read_bytes()


def test_splits_are_disjoint_and_combined_files_shuffle_both_domains(data_dir):
    manifest = json.loads((data_dir / "manifest.json").read_text())
    all_prompts: list[str] = []
    for split, n in SIZES.items():
        combined = read_rows(data_dir / f"{split}.jsonl")
        per_domain = []
        for domain in ("math", "code"):
            rows = read_rows(data_dir / domain / f"{split}.jsonl")
            assert len(rows) == n and {r["domain"] for r in rows} == {domain}
            assert set(rows[0]) == {"prompt", "domain", "answer", "verifier", "solution", "num_ops"}
            per_domain += rows
            all_prompts += [r["prompt"] for r in rows]
            assert manifest["files"][f"{domain}/{split}.jsonl"]["rows"] == n
        assert sorted(map(json.dumps, combined)) == sorted(map(json.dumps, per_domain))
        assert combined != per_domain  # shuffled, not concatenated
        first_half = {r["domain"] for r in combined[:n]}
        assert first_half == {"math", "code"}
    assert len(all_prompts) == len(set(all_prompts)) == 2 * sum(SIZES.values())


def test_check_disjoint_names_the_overlap():
    with pytest.raises(AssertionError, match=r"'1\+2' is in both math/test and math/train"):
        make_data.check_disjoint({"math/test": [{"prompt": "1+2"}], "math/train": [{"prompt": "1+2"}]})


def test_exhausted_problem_space_is_a_clear_error(tmp_path):
    tiny = {"math": {"min_ops": "1", "max_ops": "1", "min_operand": "2", "max_operand": "3", "max_factor": "3"}}
    with pytest.raises(RuntimeError, match="too few distinct problems"):
        make_data.make_data(tmp_path, sizes={"test": 50, "val": 0, "train": 0, "pretrain": 0}, overrides=tiny)


def test_bad_difficulty_knobs_are_named():
    with pytest.raises(ValueError, match="no difficulty knob 'max_opps'"):
        config_from_overrides("math", {"max_opps": "3"})
    with pytest.raises(ValueError, match=r"code.max_len must be int, got 'x'"):
        config_from_overrides("code", {"max_len": "x"})
    with pytest.raises(ValueError, match=r"max_ops \(1\) must be >= min_ops \(2\)"):
        MathConfig(max_ops=1)
    with pytest.raises(ValueError, match="unknown toy domain 'chess'"):
        sample("chess", random.Random(0))
    assert config_from_overrides("math", {"detail_prob": "0.25"}) == MathConfig(detail_prob=0.25)
    with pytest.raises(ValueError, match="list_ops must name some of rev, sort"):
        config_from_overrides("code", {"list_ops": "rev,reverse"})
    assert config_from_overrides("code", {"list_ops": "rev,take"}) == CodeConfig(list_ops="rev,take")


# ---------------------------------------------------------------- math

TERSE_LINE = re.compile(r"^\d+[-+*]\d+=\d+$")


def check_math(problem, config: MathConfig) -> None:
    """Recomputes the answer with Python and checks every equation of the scratchpad."""
    assert re.fullmatch(r"[\d+\-*()]+", problem.prompt)
    assert eval(problem.prompt) == int(problem.answer)  # the prompt is plain Python arithmetic
    *steps, last = problem.solution.split("\n")
    assert last == f"Answer: {problem.answer}"
    assert len(steps) == problem.num_ops == problem.prompt.count("+") + problem.prompt.count("-") \
        + problem.prompt.count("*")
    assert config.min_ops <= problem.num_ops <= config.max_ops
    for step in steps:
        values = {eval(side) for side in step.split("=")}  # every "=" in a line must hold
        assert len(values) == 1, step
        assert 0 <= values.pop() <= config.max_value
    assert int(steps[-1].rsplit("=", 1)[1]) == int(problem.answer)
    assert grade("math", problem.solution, problem.answer)


@pytest.mark.parametrize("config", [MathConfig(), MathConfig(min_ops=1, max_ops=6, max_operand=999, max_value=9999),
                                    MathConfig(detail_prob=1.0, mul_prob=0.6)])
def test_math_answers_and_scratchpads_recompute(config):
    rng = random.Random(11)
    for _ in range(400):
        check_math(sample("math", rng, config), config)


def test_math_detail_knob_sets_scratchpad_length():
    def solutions(detail_prob: float) -> list[str]:
        rng = random.Random(5)
        return [sample("math", rng, MathConfig(detail_prob=detail_prob)).solution for _ in range(300)]

    terse, detailed = solutions(0.0), solutions(1.0)
    assert all(TERSE_LINE.match(line) for s in terse for line in s.split("\n")[:-1])
    mean_terse = sum(map(len, terse)) / len(terse)
    mean_detailed = sum(map(len, detailed)) / len(detailed)
    assert mean_detailed > 1.5 * mean_terse, (mean_terse, mean_detailed)
    lengths = {len(s.split("\n")) for s in terse}
    assert lengths == {3, 4, 5}  # 2..4 operations, one line each, plus the answer line


def test_math_check_knob_adds_a_concluding_line_that_careless_answers_never_follow():
    rng = random.Random(9)
    problems = [sample("math", rng, MathConfig(check_prob=0.3)) for _ in range(400)]
    checked = [p for p in problems if concludes(p.solution)]
    # 400 draws at 0.3: standard error 2.3 points, so 0.2-0.4 is over 4 of them
    assert 0.2 < len(checked) / len(problems) < 0.4, len(checked)
    for problem in checked:
        *work, conclusion, answer = problem.solution.split("\n")
        assert conclusion == f"So {problem.prompt}={problem.answer}" and answer == f"Answer: {problem.answer}"
        check_math(Problem("math", problem.prompt, problem.answer, "\n".join([*work, answer]), problem.num_ops),
                   MathConfig())
    assert not any(concludes(sample("math", rng).solution) for _ in range(200))  # off by default
    rows = [make_data.problem_row(p) for p in problems]
    make_data.add_careless_answers(rows, 1.0, random.Random(0))  # every row that can be careless is
    for row, problem in zip(rows, problems):
        assert (row["solution"] == problem.solution) == concludes(problem.solution)


@pytest.mark.parametrize("op, a, b, detailed, line", [
    ("+", 17, 25, False, "17+25=42"),
    ("+", 17, 25, True, "17+25=17+20+5=37+5=42"),
    ("+", 5, 387, True, "5+387=5+300+80+7=305+80+7=385+7=392"),
    ("+", 17, 40, True, "17+40=57"),  # one nonzero digit: nothing to decompose
    ("-", 126, 18, True, "126-18=126-10-8=116-8=108"),
    ("-", 300, 105, True, "300-105=300-100-5=200-5=195"),
    ("*", 42, 3, True, "42*3=40*3+2*3=120+6=126"),
    ("*", 3, 42, True, "3*42=3*40+3*2=120+6=126"),
    ("*", 342, 3, True, "342*3=300*3+40*3+2*3=900+120+6=1020+6=1026"),
    ("*", 7, 8, True, "7*8=56"),
    ("*", 42, 3, False, "42*3=126"),
])
def test_math_step_by_hand(op, a, b, detailed, line):
    assert math_step(op, a, b, detailed=detailed) == line


# ---------------------------------------------------------------- code

@pytest.mark.parametrize("program, answer, trace", [
    ('"dbca"|sort|rev', "dcba", ["abcd", "dcba"]),
    ("[1,5,2]|map(+3)|filter(odd)|sum", 5, [[4, 8, 5], [5], 5]),
    ("[3,8,1,6] | map(*2) | filter(>5) | sum", 34, [[6, 16, 2, 12], [6, 16, 12], 34]),
    ('"abcz" | shift(2)', "cdeb", ["cdeb"]),
    ('"hello" | uniq | rot(2) | len', 4, ["helo", "lohe", 4]),
    ("[5,1,4] | rev | take(2) | max", 4, [[4, 1, 5], [4, 1], 4]),
    ('"banana" | uniq | len', 3, ["ban", 3]),
    ("[2,4] | drop(1) | min", 4, [[4], 4]),
    ("[9,2,9,3] | uniq | sort | filter(<5)", [2, 3], [[9, 2, 3], [2, 3, 9], [2, 3]]),
    ("[7,8,10,3] | filter(even) | rot(3) | map(*3)", [30, 24], [[8, 10], [10, 8], [30, 24]]),  # rot 3 mod 2
])
def test_dsl_reference_on_hand_computed_cases(program, answer, trace):
    assert run_program(program) == (answer, trace)


@pytest.mark.parametrize("program, message", [
    ('"ab" | map(+1)', "map\\(\\+1\\) needs a list"),
    ("[1,2] | frob", "unknown op 'frob'"),
    ("[1,2] | filter(>3) | max", "max of an empty list"),
    ("[1,2]", "no ops"),
    ("[1,'a'] | rev", "must be a string or a list of ints"),
    ("[1,2 | rev", "bad input literal"),
    ('"aB" | shift(1)', "shift needs lowercase letters"),
])
def test_dsl_errors_name_the_problem(program, message):
    with pytest.raises(DSLError, match=message):
        run_program(program)


@pytest.mark.parametrize("config", [CodeConfig(), CodeConfig(min_ops=1, max_ops=6, string_prob=0.5, reduce_prob=1.0),
                                    CodeConfig(string_prob=0.0, list_ops="rev,take")])
def test_code_solutions_trace_the_program(config):
    rng = random.Random(2)
    for _ in range(400):
        problem = sample("code", rng, config)
        _, ops = parse_program(problem.prompt)
        *lines, last = problem.solution.split("\n")
        assert last == f"Answer: {problem.answer}"
        assert [line.split(": ")[0] for line in lines] == ops
        assert len(ops) == problem.num_ops and config.min_ops <= len(ops) <= config.max_ops
        if config.list_ops != "all":  # only the chosen list ops, besides the final reductions
            assert {op.split("(")[0] for op in ops} <= {*config.allowed_list_ops(), "sum", "max", "min", "len"}, ops
        if lines[-1].startswith("sum: "):  # the running total must add up
            assert len({eval(side) for side in lines[-1][len("sum: "):].split("=")}) == 1
        else:
            assert lines[-1].endswith(f": {problem.answer}")
        assert grade("code", problem.solution, problem.answer)


# ---------------------------------------------------------------- grading

def test_grade_compares_the_last_answer_line_exactly():
    assert grade("math", "17+25=42\nAnswer: 42", "42")
    assert grade("math", "Answer: 41\nno, wait\nAnswer:   42  ", "42")
    assert not grade("math", "17+25=42\nAnswer: 43", "42")
    assert not grade("math", "Answer: 420", "42")
    assert grade("code", 'rev: "cba"\nAnswer: "cba"', '"cba"')
    assert not grade("code", "Answer: cba", '"cba"')
    assert grade("code", "Answer:  [1,  2]", "[1, 2]")  # whitespace runs collapse, but are not removed
    assert not grade("code", "Answer: [1,2]", "[1, 2]")
    with pytest.raises(ValueError, match="unknown toy domain"):
        grade("chess", "Answer: e4", "e4")


# ---------------------------------------------------------------- tokenizer

def test_tokenizer_round_trips_the_corpus_with_single_digit_tokens(data_dir, tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    assert len(tok) < 100  # specials + the corpus alphabet
    texts = list(toy_tokenizer.corpus_texts(data_dir))
    assert len(texts) == 3 * 2 * 2 * sum(SIZES.values())  # (prompt, answer, solution) x domains x (own + combined)
    encoded = tok(texts, add_special_tokens=False)["input_ids"]
    for text, ids in zip(texts, encoded):
        assert len(ids) == len(text) and tok.unk_token_id not in ids
        assert tok.decode(ids) == text
    digit_ids = [tok.encode(d, add_special_tokens=False) for d in "0123456789"]
    assert all(len(ids) == 1 for ids in digit_ids) and len({ids[0] for ids in digit_ids}) == 10
    assert tok.tokenize("1234567890") == list("1234567890")


def test_tokenizer_chat_template_ends_assistant_turns_with_eos(tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<bos>", "<|end|>", "<pad>")
    assert len({tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id}) == 4
    prompt = [{"role": "user", "content": "15+35*6"}]
    text = tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
    assert text == "<bos><|user|>15+35*6<|end|><|assistant|>"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == 1 + 1 + 7 + 1 + 1  # bos, role, 7 characters, end, assistant: specials are single tokens
    assert tok.apply_chat_template(prompt, tokenize=False) == "<bos><|user|>15+35*6<|end|>"

    answer = "35*6=210\nAnswer: 225"
    full = tok.apply_chat_template(prompt + [{"role": "assistant", "content": answer}], tokenize=True,
                                   return_dict=True, return_assistant_tokens_mask=True)
    assert full["input_ids"][:len(ids)] == ids
    assert full["input_ids"][-1] == tok.eos_token_id
    assert full["assistant_masks"] == [0] * len(ids) + [1] * (len(answer) + 1)  # the answer and its EOS


def test_load_prompts_reads_a_split_with_no_dropped_rows(data_dir, tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    rows = read_rows(data_dir / "val.jsonl")
    dataset = load_prompts(data_dir / "val.jsonl", tok, max_prompt_len=128, known_domains=["math", "code"],
                           on_bad_row="error")
    assert dataset.report.num_dropped == 0 and len(dataset) == len(rows) == 2 * SIZES["val"]
    assert dataset.report.domains == {"math": SIZES["val"], "code": SIZES["val"]}
    items = dataset.take(range(len(rows)))
    for row, item in zip(rows, items):
        assert item.domain == row["domain"] and item.answer == row["answer"]
        assert item.extra == {"verifier": "exact", "solution": row["solution"], "num_ops": row["num_ops"]}
        assert tok.decode(item.prompt_ids) == f"<bos><|user|>{row['prompt']}<|end|><|assistant|>"
