"""The bench cannot rot: every section of `bench/run.py` runs at its smoke size (seconds), so that a change that
breaks a section breaks a test here instead of the README's numbers. The figures of a smoke run mean nothing; what
is asserted is that each section ran to the end and produced its report."""

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT

SECTIONS = ("logprobs", "rollout", "opd", "teachers", "overlap", "growth", "batching", "gpu", "moe", "plan", "async",
            "soak")


@pytest.fixture(scope="module")
def bench_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("bench-models")  # the tiny bench models, made once for every section


def run_bench(out, cache, *args):
    env = {**os.environ, "MEGATRON_GOPD_BENCH_CACHE": str(cache), "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "bench/run.py", "--size", "smoke", "--out", str(out), *args], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("section", SECTIONS)
def test_each_bench_section_runs_at_smoke_size(section, bench_cache, tmp_path):
    out = tmp_path / "results.json"
    proc = run_bench(out, bench_cache, "--only", section)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    report = json.loads(out.read_text())
    assert report["size"] == "smoke" and report["errors"] == {} and list(report["results"]) == [section]
    markdown = (tmp_path / "RESULTS.md").read_text()
    assert "FAILED" not in markdown and "## Targets" in markdown
    if section == "opd":  # the headline comparison: TRL's row and both of ours have per-step numbers
        result = report["results"]["opd"]
        for side in ("trl", "ours-full_vocab", "ours-sampled"):
            assert result["cpu_seconds_per_step"][side]["median"] > 0, side
        assert set(result["phases"]["ours-sampled"]) >= {"rollout", "teachers", "update"}
        assert 0 < result["phases"]["trl"]["generate"] < result["wall_seconds_per_step"]["trl"]["median"]
    if section == "async":  # one step off: every measured step trained on samples exactly one update old
        result = report["results"]["async"]
        assert result["step_time_ratio"] > 0 and set(result["timeline_s"]["staleness_1"]) >= {"rollout", "update"}
        assert result["staleness_seen"] == {"staleness_0": [0], "staleness_1": [1]}


def test_a_missing_optional_peer_is_one_line_naming_the_extra(tmp_path):
    """Without trl, the TRL comparison reports what to install instead of a traceback."""
    script = ("import runpy, sys\n"
              "sys.modules['trl'] = None  # as if not installed: find_spec('trl') is None\n"
              "sys.argv = ['run.py', '--size', 'smoke', '--only', 'opd', '--out', sys.argv[1]]\n"
              "runpy.run_path('bench/run.py', run_name='__main__')\n")
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path / "r.json")], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 1
    error = json.loads((tmp_path / "r.json").read_text())["errors"]["opd"]
    assert error == "trl is not installed; install the 'bench' extra: pip install -e \".[bench]\""
    assert "Traceback" not in proc.stderr


def test_only_keeps_the_other_sections_of_the_same_size_with_their_dates():
    sys.path.insert(0, str(ROOT))
    from bench.run import _keep_other_sections

    def report(size, date, sections):
        return {"size": size, "machine": {"date": date}, "results": {s: {"of": date} for s in sections},
                "seconds": {s: 1.0 for s in sections}, "load_avg": {s: 0.5 for s in sections},
                "measured": {s: date for s in sections}}

    previous = report("quick", "D0", ["gpu", "logprobs", "rollout"])
    del previous["measured"]  # reports written before sections carried their dates
    new = report("quick", "D1", ["rollout"])
    _keep_other_sections(new, previous)
    assert new["results"] == {"logprobs": {"of": "D0"}, "rollout": {"of": "D1"}, "gpu": {"of": "D0"}}
    assert new["measured"] == {"logprobs": "D0", "rollout": "D1", "gpu": "D0"}
    other_size = report("smoke", "D1", ["rollout"])
    _keep_other_sections(other_size, previous)
    assert list(other_size["results"]) == ["rollout"]
