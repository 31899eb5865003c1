"""Issue 20: tools/prepare_data.py maps the recipes' datasets (DeepMath-103K's and Eurus-2-RL-Data's layouts,
made here as small local parquet files) to rows the prompt loader and the verifiers accept."""

import json

import datasets
import pytest

from megatron_gopd.data.prompts import load_prompts
from megatron_gopd.eval.harness import reference_of, verifier_kind
from megatron_gopd.eval.verifiers import verify_batch
from tests.tiny import tiny_tokenizer
from tools.prepare_data import main

DEEPMATH = [  # DeepMath-103K's columns
    {"question": "Compute 2+3.", "final_answer": "5", "difficulty": 6.5, "topic": "arithmetic",
     "r1_solution_1": "..."},
    {"question": "Compute 1+1.", "final_answer": "2", "difficulty": 2.0, "topic": "arithmetic",
     "r1_solution_1": "..."},
]


def eurus_row(ability, ground_truth, content):
    return {"data_source": "taco", "ability": ability, "extra_info": {"index": 0},
            "prompt": [{"role": "system", "content": "Solve it."}, {"role": "user", "content": content}],
            "reward_model": {"ground_truth": ground_truth, "style": "rule"}}


EURUS = [  # Eurus-2-RL-Data's columns: chat messages, ability, reward_model.ground_truth
    eurus_row("code", json.dumps({"fn_name": "add", "inputs": [[1, 2], [3, 4]], "outputs": [3, 7]}), "Write add."),
    eurus_row("code", json.dumps({"fn_name": "twoSum", "inputs": [[[2, 7, 11, 15], 9]], "outputs": [[[0, 1]]]}),
              "LeetCode two sum."),
    eurus_row("code", json.dumps({"inputs": ["1 2\n"], "outputs": ["3\n"]}), "Read two numbers."),
    eurus_row("math", "\\frac{1}{2}", "Half of one?"),
]


@pytest.fixture
def sources(tmp_path):
    datasets.Dataset.from_list(DEEPMATH).to_parquet(tmp_path / "deepmath.parquet")
    datasets.Dataset.from_list(EURUS).to_parquet(tmp_path / "eurus.parquet")
    return tmp_path


def read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_deepmath_hard_rows(sources):
    out = sources / "math.jsonl"
    summary = main(["--input", str(sources / "deepmath.parquet"), "--output", str(out), "--preset", "deepmath",
                    "--where", "difficulty>=6"])
    assert summary == {"written": 1, "skipped": {"filtered by --where": 1}}
    assert read(out) == [{"prompt": "Compute 2+3.", "domain": "math", "answer": "5"}]
    dataset = load_prompts(str(out), tiny_tokenizer(), max_prompt_len=64, known_domains=["math"])
    assert len(dataset) == 1


def test_eurus_code_rows_get_runnable_tests(sources):
    out = sources / "code.jsonl"
    summary = main(["--input", str(sources / "eurus.parquet"), "--output", str(out), "--preset", "eurus-code"])
    assert summary == {"written": 2, "skipped": {"stdin/stdout tests (no fn_name)": 1, "filtered by --where": 1}}
    rows = read(out)
    assert [r["domain"] for r in rows] == ["code", "code"] and rows[0]["prompt"][1]["content"] == "Write add."
    items = load_prompts(str(out), tiny_tokenizer(), max_prompt_len=64, known_domains=["code"])
    items = items.take(range(len(items)))
    responses = {
        "right": ["```python\ndef add(a, b):\n    return a + b\n```",
                  "```python\nclass Solution:\n    def twoSum(self, nums, target):\n"
                  "        seen = {}\n        for i, n in enumerate(nums):\n"
                  "            if target - n in seen:\n                return [seen[target - n], i]\n"
                  "            seen[n] = i\n```"],
        "wrong": ["```python\ndef add(a, b):\n    return a - b\n```",
                  "```python\nclass Solution:\n    def twoSum(self, nums, target):\n        return [1, 0]\n```"],
    }
    assert [verifier_kind(i) for i in items] == ["code", "code"]
    for kind, expected in [("right", True), ("wrong", False)]:
        results = verify_batch(["code"] * 2, responses[kind], [reference_of(i) for i in items])
        assert [r.correct for r in results] == [expected, expected], (kind, results)


def test_column_mapping_without_a_preset_and_bad_arguments(sources):
    out = sources / "any.jsonl"
    summary = main(["--input", str(sources / "eurus.parquet"), "--output", str(out), "--prompt", "prompt",
                    "--domain-column", "ability", "--answer", "reward_model.ground_truth", "--keep", "data_source",
                    "--where", "ability!=code"])
    assert summary["written"] == 1
    assert read(out)[0]["domain"] == "math" and read(out)[0]["data_source"] == "taco"
    missing = main(["--input", str(sources / "deepmath.parquet"), "--output", str(out), "--prompt", "question",
                    "--domain", "math", "--answer", "solution"])
    assert missing == {"written": 0, "skipped": {"no column solution": 2}}
    with pytest.raises(SystemExit):
        main(["--input", str(sources / "deepmath.parquet"), "--output", str(out), "--prompt", "question"])
    with pytest.raises(ValueError, match="--where 'difficulty>6'"):
        main(["--input", str(sources / "deepmath.parquet"), "--output", str(out), "--preset", "deepmath",
              "--where", "difficulty>6"])
