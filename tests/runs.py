"""Trainer runs for the tests: a tiny two-domain G-OPD config, `torchrun -m megatron_gopd.train`, and the metrics
a run logged."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from tests.conftest import ROOT
from tests.tiny import tiny_tokenizer

VOLATILE = ("time/", "throughput/", "memory/", "data/")  # per process, not per step


def minimal_config(tmp_path: Path) -> Path:
    """A config with no files behind it: load_config validates it alone (no run checks)."""
    path = tmp_path / "c.yaml"
    path.write_text("student: {path: s}\nteachers: [{name: t, path: t, domains: [math]}]\ndata: {train: [x.jsonl]}\n")
    return path


def write_run(tmp_path: Path, ckpts: Path, **overrides) -> Path:
    """A 2-domain prompt set over the tiny tokenizer, and a config with two colocated teachers."""
    rows = []
    for i in range(48):
        words = " ".join(f"t{(i * 7 + j * 13) % 240 + 5}" for j in range(3 + i % 5))
        rows.append({"prompt": words, "domain": "math" if i % 2 else "code", "answer": "t5"})
    tmp_path.mkdir(parents=True, exist_ok=True)
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = {
        "student": {"path": str(ckpts / "student")},
        "teachers": [{"name": "math", "path": str(ckpts / "math"), "domains": ["math"]},
                     {"name": "code", "path": str(ckpts / "code"), "domains": ["code"]}],
        "algo": {"lam": 1.25},
        "rollout": {"max_new_tokens": 12},
        "data": {"train": [str(data)], "eval": [str(data)], "prompts_per_step": 4, "max_prompt_len": 32},
        "train": {"steps": 3, "micro_batch_size": 2, "output_dir": str(tmp_path / "run")},
        "optim": {"lr": 1e-3},
        "checkpoint": {"interval": 1, "keep_last": 2},
        "eval": {"interval": 2, "n": 2, "max_prompts": 6},
        "log": {"progress": False},
    }
    for key, value in overrides.items():
        if "__" in key:
            section, name = key.split("__")
            config[section][name] = value
        else:
            config[key] = value
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def launch(config: Path, *args: str, nproc: int = 2, wait: bool = True, timeout: float = 600):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "megatron_gopd.train", "--config", str(config), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    if not wait:
        return subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)
    return subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def metrics(run_dir: Path) -> dict[int, dict]:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {m["step"]: {k: v for k, v in m.items() if not k.startswith(VOLATILE)} for m in lines}


def close(a: dict, b: dict, rel: float = 1e-5, ignore: tuple[str, ...] = ()) -> list[str]:
    """The metric names whose values differ between two steps' metrics by more than `rel` (relative, with an
    absolute floor of `rel` for values near zero), or that only one of them has; names starting with `ignore`
    are not compared."""
    a, b = ({k: v for k, v in m.items() if not k.startswith(ignore)} for m in (a, b))
    bad = sorted(set(a) ^ set(b))
    for key in set(a) & set(b):
        x, y = a[key], b[key]
        if (x is None) != (y is None) or x is not None and abs(x - y) > rel * max(1.0, abs(x), abs(y)):
            bad.append(key)
    return bad


def swapped_tokenizer_copy(checkpoint: Path, out: Path) -> Path:
    """A copy of a model checkpoint whose tokenizer has the same vocabulary size but maps tokens to other ids."""
    shutil.copytree(checkpoint, out)
    vocab = tiny_tokenizer().get_vocab()
    swapped = tiny_tokenizer()
    swapped.backend_tokenizer.model = type(swapped.backend_tokenizer.model)(
        {t: (249 - i if i > 10 else i) for t, i in vocab.items()}, unk_token="t0")
    swapped.save_pretrained(out / "hf")
    return out
