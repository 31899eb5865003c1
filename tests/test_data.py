"""Prompt data: templates (exact ids), malformed-row reports with file:line, domains, sources, and the sampler."""

from __future__ import annotations

import json
import os

import datasets
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from megatron_gopd.data import (
    BadRowError,
    PromptSampler,
    UnknownDomainError,
    load_prompts,
    plain_template,
    write_jsonl,
)

SPECIALS = ["[UNK]", "<bos>", "<system>", "<user>", "<assistant>", "<end>"]
WORDS = ["User", "System", "Assistant", ":", "what", "is", "two", "plus", "be", "brief", "add", "one"]
VOCAB = {token: i for i, token in enumerate(SPECIALS + WORDS)}
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<{{ m.role }}> {{ m.content }} <end> {% endfor %}"
                 "{% if add_generation_prompt %}<assistant>{% endif %}")
KNOWN = ["math", "code"]


def ids(*tokens: str) -> list[int]:
    return [VOCAB[t] for t in tokens]


def make_tokenizer(chat_template: str | None) -> PreTrainedTokenizerFast:
    """A word-level tokenizer built locally; its post-processor prepends <bos> like many real tokenizers do."""
    backend = Tokenizer(models.WordLevel(VOCAB, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.add_special_tokens(SPECIALS)
    backend.post_processor = processors.TemplateProcessing(single="<bos> $A",
                                                           special_tokens=[("<bos>", VOCAB["<bos>"])])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", bos_token="<bos>")
    tokenizer.chat_template = chat_template
    return tokenizer


@pytest.fixture(scope="module")
def chat_tok():
    return make_tokenizer(CHAT_TEMPLATE)


@pytest.fixture(scope="module")
def plain_tok():
    return make_tokenizer(None)


def write_lines(path, lines: list[str]):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return str(path)


GOOD_TEXT = {"prompt": "what is two plus two", "domain": "math", "answer": "4", "source": "toy"}
GOOD_CHAT = {"prompt": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "add one"}],
             "domain": "code", "tests": ["assert f(1) == 2"]}


def test_chat_template_gives_exact_ids_and_keeps_fields(tmp_path, chat_tok):
    path = write_lines(tmp_path / "p.jsonl", [json.dumps(GOOD_TEXT), json.dumps(GOOD_CHAT)])
    data = load_prompts(path, chat_tok, max_prompt_len=64, known_domains=KNOWN)
    text, chat = data.take([0, 1])
    # One <bos>, from the template: the tokenizer must not add a second one.
    assert text.prompt_ids == ids("<bos>", "<user>", "what", "is", "two", "plus", "two", "<end>", "<assistant>")
    assert chat.prompt_ids == ids("<bos>", "<system>", "be", "brief", "<end>", "<user>", "add", "one", "<end>",
                                  "<assistant>")
    assert (text.uid, text.domain, text.answer, text.tests, text.extra) == (f"{path}:1", "math", "4", None,
                                                                            {"source": "toy"})
    assert (chat.uid, chat.domain, chat.answer, chat.tests, chat.extra) == (f"{path}:2", "code", None,
                                                                            ["assert f(1) == 2"], {})
    assert data.report.kept == 2 and data.report.num_dropped == 0
    assert data.report.domains == {"math": 1, "code": 1}


def test_plain_template_without_chat_template(tmp_path, plain_tok):
    path = write_lines(tmp_path / "p.jsonl", [json.dumps(GOOD_TEXT), json.dumps(GOOD_CHAT)])
    text, chat = load_prompts(path, plain_tok, max_prompt_len=64, known_domains=KNOWN).take([0, 1])
    assert plain_template([{"role": "user", "content": "hi"}]) == "User: hi\nAssistant:"
    # The tokenizer's own special tokens (<bos>) are added around the plain template.
    assert text.prompt_ids == ids("<bos>", "User", ":", "what", "is", "two", "plus", "two", "Assistant", ":")
    assert chat.prompt_ids == ids("<bos>", "System", ":", "be", "brief", "User", ":", "add", "one", "Assistant", ":")


MALFORMED = [
    json.dumps(GOOD_TEXT),                                                            # 1 kept
    '{"prompt": "what is two", "domain": "math"',                                     # 2 invalid_json
    "",                                                                               # 3 blank: not a row
    json.dumps({"question": "what", "domain": "math"}),                               # 4 missing_prompt
    json.dumps({"prompt": "   \n", "domain": "math"}),                                # 5 empty_prompt
    json.dumps({"prompt": 42, "domain": "math"}),                                     # 6 bad_prompt_type
    json.dumps({"prompt": [{"role": "wizard", "content": "add one"}], "domain": "code"}),  # 7 bad_messages
    json.dumps({"prompt": [{"role": "user", "content": 3}], "domain": "code"}),       # 8 bad_messages
    json.dumps({"prompt": "add one", "answer": "2"}),                                 # 9 missing_domain
    json.dumps({"prompt": "add one", "domain": 7}),                                   # 10 bad_domain
    "[1, 2]",                                                                         # 11 not_an_object
    json.dumps(GOOD_CHAT),                                                            # 12 kept
    json.dumps({"prompt": " ".join(["two", "plus"] * 5), "domain": "math"}),          # 13 too_long (14 > 12)
    json.dumps({"prompt": "add one", "domain": "math"}),                              # 14 kept
]


def test_malformed_rows_are_counted_with_file_and_line(tmp_path, chat_tok):
    path = write_lines(tmp_path / "bad.jsonl", MALFORMED)
    data = load_prompts(path, chat_tok, max_prompt_len=12, known_domains=KNOWN)
    report = data.report
    assert [item.uid for item in data.take(range(len(data)))] == [f"{path}:1", f"{path}:12", f"{path}:14"]
    assert report.kept == 3 and report.num_dropped == 10
    assert report.dropped == {"invalid_json": 1, "missing_prompt": 1, "empty_prompt": 1, "bad_prompt_type": 1,
                              "bad_messages": 2, "missing_domain": 1, "bad_domain": 1, "not_an_object": 1,
                              "too_long": 1}
    located = {reason: [e.split(": ", 1)[0] for e in examples] for reason, examples in report.examples.items()}
    assert located == {"invalid_json": [f"{path}:2"], "missing_prompt": [f"{path}:4"],
                       "empty_prompt": [f"{path}:5"], "bad_prompt_type": [f"{path}:6"],
                       "bad_messages": [f"{path}:7", f"{path}:8"], "missing_domain": [f"{path}:9"],
                       "bad_domain": [f"{path}:10"], "not_an_object": [f"{path}:11"], "too_long": [f"{path}:13"]}
    assert "role 'wizard'" in report.examples["bad_messages"][0]
    assert "content must be a string, got int" in report.examples["bad_messages"][1]
    assert "got int" in report.examples["bad_prompt_type"][0]
    assert "14 tokens > max_prompt_len 12" in report.examples["too_long"][0]
    assert f"{path}:13: 14 tokens" in report.summary()
    metrics = report.as_metrics()
    assert metrics["data/prompts"] == 3 and metrics["data/dropped/bad_messages"] == 2
    assert metrics["data/domain/math"] == 2 and metrics["data/domain/code"] == 1


def test_on_bad_row_error_names_the_first_bad_row(tmp_path, chat_tok):
    path = write_lines(tmp_path / "bad.jsonl", MALFORMED)
    with pytest.raises(BadRowError, match=f"^{path}:2: invalid_json"):
        load_prompts(path, chat_tok, max_prompt_len=12, known_domains=KNOWN, on_bad_row="error")
    path = write_lines(tmp_path / "bad2.jsonl", [json.dumps(GOOD_TEXT), "", MALFORMED[8]])
    with pytest.raises(BadRowError, match=f"^{path}:3: missing_domain"):
        load_prompts(path, chat_tok, max_prompt_len=12, known_domains=KNOWN, on_bad_row="error")
    with pytest.raises(ValueError, match="on_bad_row must be 'skip' or 'error'"):
        load_prompts(path, chat_tok, max_prompt_len=12, on_bad_row="warn")


def test_unknown_domain_is_an_error_unless_a_default_teacher_exists(tmp_path, chat_tok):
    poetry = json.dumps({"prompt": "what is two", "domain": "poetry"})
    path = write_lines(tmp_path / "d.jsonl", [json.dumps(GOOD_TEXT), poetry, poetry])
    with pytest.raises(UnknownDomainError) as error:
        load_prompts(path, chat_tok, max_prompt_len=64, known_domains=KNOWN)
    message = str(error.value)
    assert "'poetry'" in message and f"first at {path}:2" in message and "2 rows" in message
    assert "['code', 'math']" in message
    # With on_bad_row="skip" it is still an error: an unroutable prompt is a config problem, not a bad row.
    with pytest.raises(UnknownDomainError):
        load_prompts(path, chat_tok, max_prompt_len=64, known_domains=KNOWN, on_bad_row="skip")
    data = load_prompts(path, chat_tok, max_prompt_len=64, known_domains=KNOWN, default_domain_ok=True)
    assert data.report.domains == {"math": 1, "poetry": 2}


def test_too_long_boundary(tmp_path, chat_tok):
    # "<bos> <user> two ... <end> <assistant>": 4 + n tokens.
    rows = [{"prompt": " ".join(["two"] * n), "domain": "math"} for n in (5, 6, 7)]
    path = tmp_path / "len.jsonl"
    write_jsonl(path, rows)
    data = load_prompts(path, chat_tok, max_prompt_len=10, known_domains=KNOWN)
    assert [len(item.prompt_ids) for item in data.take(range(len(data)))] == [9, 10]
    assert data.report.dropped == {"too_long": 1}
    assert data.report.examples["too_long"] == [f"{path}:3: 11 tokens > max_prompt_len 10"]


def test_parquet_json_array_directory_and_lists(tmp_path, chat_tok):
    chat_rows = [GOOD_CHAT, {**GOOD_CHAT, "prompt": []}, {**GOOD_CHAT, "tests": ["assert g()"]}]
    parquet = str(tmp_path / "data" / "b.parquet")
    os.makedirs(tmp_path / "data")
    datasets.Dataset.from_list(chat_rows).to_parquet(parquet)
    jsonl = write_lines(tmp_path / "data" / "a.jsonl", [json.dumps(GOOD_TEXT)])
    write_lines(tmp_path / "data" / ".partial.jsonl", ["{not json"])  # hidden: an unfinished write_jsonl
    (tmp_path / "data" / "README.txt").write_text("not data")
    array = tmp_path / "c.json"
    array.write_text(json.dumps([GOOD_TEXT, {"prompt": "", "domain": "math"}]))

    pq = load_prompts(parquet, chat_tok, max_prompt_len=64, known_domains=KNOWN)
    assert [i.uid for i in pq.take([0, 1])] == [f"{parquet}#0", f"{parquet}#2"]
    assert pq[1].tests == ["assert g()"] and pq[1].prompt_ids[:2] == ids("<bos>", "<system>")
    assert pq.report.examples == {"empty_prompt": [f"{parquet}#1: `prompt` is an empty list of messages"]}

    both = load_prompts([tmp_path / "data", array], chat_tok, max_prompt_len=64, known_domains=KNOWN)
    assert [i.uid for i in both.take(range(len(both)))] == [f"{jsonl}:1", f"{parquet}#0", f"{parquet}#2",
                                                             f"{array}#0"]
    assert both.report.dropped == {"empty_prompt": 2}

    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_prompts(tmp_path / "missing.jsonl", chat_tok, max_prompt_len=64)
    with pytest.raises(ValueError, match="unsupported prompt file type '.txt'"):
        load_prompts(tmp_path / "data" / "README.txt", chat_tok, max_prompt_len=64)
    with pytest.raises(ValueError, match="no usable prompts"):
        load_prompts(write_lines(tmp_path / "e.jsonl", ["[]"]), chat_tok, max_prompt_len=64)


def test_write_jsonl_is_atomic_and_lines_stay_exact(tmp_path, chat_tok):
    path = tmp_path / "out" / "rows.jsonl"
    # U+2028 is a line break to str.splitlines but not to JSON lines: line numbers must not shift.
    assert write_jsonl(path, [{"prompt": "what\u2028is", "domain": "math"}, {"prompt": 1, "domain": "math"}]) == 2
    data = load_prompts(path, chat_tok, max_prompt_len=64)
    assert data[0].uid == f"{path}:1" and data.report.examples["bad_prompt_type"][0].startswith(f"{path}:2: ")

    def failing_rows():
        yield {"prompt": "new", "domain": "math"}
        raise RuntimeError("generator failed")

    before = path.read_bytes()
    with pytest.raises(RuntimeError):
        write_jsonl(path, failing_rows())
    assert path.read_bytes() == before and os.listdir(path.parent) == ["rows.jsonl"]
    assert oct(path.stat().st_mode & 0o777) == oct(0o644)


def test_sampler_is_a_function_of_the_step():
    """Step k's batch is the same whenever it is drawn: in order, out of order, ahead of training, or in a resumed
    run (nothing but the step is needed), across epoch boundaries (5 steps per epoch here)."""
    sampler = PromptSampler(23, 4, seed=7)
    in_order = [sampler.indices(k) for k in range(8)]
    assert [PromptSampler(23, 4, seed=7).indices(k) for k in (5, 2, 7, 0, 1, 3, 4, 6)] == [
        in_order[k] for k in (5, 2, 7, 0, 1, 3, 4, 6)]
    assert all(len(set(b)) == 4 for b in in_order) and in_order[0] != in_order[5]  # epoch 1 is another order


def test_sampler_dp_ranks_partition_the_global_batch():
    single = PromptSampler(40, 8, seed=3)
    ranks = [PromptSampler(40, 8, seed=3, dp_rank=r, dp_size=4) for r in range(4)]
    for step in range(7):
        parts = [ranks[r].indices(step) for r in range(4)]
        assert all(len(p) == 2 for p in parts)
        assert sum(parts, []) == single.indices(step)  # disjoint slices whose union is the single-rank batch
    with pytest.raises(ValueError, match=r"prompts_per_step \(8\) must be divisible by the data-parallel size \(3\)"):
        PromptSampler(40, 8, seed=3, dp_rank=0, dp_size=3)


def test_sampler_epochs_roll_over_deterministically():
    sampler = PromptSampler(10, 4, seed=11)  # 2 steps per epoch, 2 prompts skipped per epoch
    steps = [sampler.indices(k) for k in range(6)]
    epochs = [steps[0] + steps[1], steps[2] + steps[3], steps[4] + steps[5]]
    assert all(len(set(e)) == 8 and set(e) <= set(range(10)) for e in epochs)
    assert epochs[0] != epochs[1] != epochs[2]
    assert [PromptSampler(10, 4, seed=12).indices(k) for k in range(6)] != steps
    assert [PromptSampler(10, 4, seed=11, shuffle=False).indices(k) for k in range(3)] == [
        [0, 1, 2, 3], [4, 5, 6, 7], [0, 1, 2, 3]]
    with pytest.raises(ValueError, match="fewer than prompts_per_step"):
        PromptSampler(3, 4, seed=11)
