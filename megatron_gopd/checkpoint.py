"""Checkpoints: model weights that reshard to any TP/PP, and training state that resumes exactly.

A checkpoint directory (both kinds) holds:

    megatron_gopd.json       metadata: format version, kind, model_type, dtype, the parallel sizes it was written
                             with, the architecture numbers (a training checkpoint: also the optimizer's format);
                             written last, so a directory without it is incomplete
    dist/                    a megatron-core dist checkpoint (torch_dist): the model, plus the optimizer in a
                             training checkpoint. Tensors are stored unsharded-by-layout, so they reshard on load.
    hf/                      (optional) the HF config, generation config and tokenizer files, so that later steps
                             never need the hub
  training checkpoints only:
    trainer_state.json       the caller's JSON-able trainer state and the LR scheduler's state
    rank_state/rank_NNNNN.pt per role rank: the RNG states (torch, CUDA, megatron's model-parallel tracker,
                             python, numpy) and the caller's per-rank state
    MANIFEST.json            relative path -> size and sha256 of every other file; written last

A run's training checkpoints live in `<run>/checkpoints/step_00000010/`, next to a `latest` file naming the newest
committed one. A save is written into `.tmp-step_00000010`, checksummed, fsynced, then renamed into place, and only
then is `latest` replaced, so a crash or a full disk at any point leaves the previous checkpoint loadable.

Every call is collective over the `group` given (the ranks of one role): megatron-core 0.16's dist_checkpointing
runs its collectives on the WORLD group, and the ranks of other roles (dedicated teachers) never join them, so
those collectives are redirected to the role's group for the duration of the call (`collectives_scoped_to`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import queue
import random
import re
import shutil
import warnings
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state, tensor_parallel
from megatron.core.dist_checkpointing.strategies import filesystem_async
from megatron.core.dist_checkpointing.validation import StrictHandling
from megatron.core.models.gpt import GPTModel
from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
from torch.distributed.checkpoint import CheckpointException

from megatron_gopd.runtime.distributed import collectives_scoped_to, computed_on

FORMAT_VERSION = 1
META_FILE = "megatron_gopd.json"
DIST_DIR = "dist"
HF_DIR = "hf"
TRAINER_FILE = "trainer_state.json"
RANK_DIR = "rank_state"
MANIFEST_FILE = "MANIFEST.json"
LATEST_FILE = "latest"
TMP_PREFIX = ".tmp-"
_STEP_DIR = re.compile(r"^step_(\d{8,})$")
# The distributed optimizer's checkpoint formats (megatron's `distrib_optim_sharding_type`) that save and load on
# CPU (megatron's default one fails there with "flattened_range is not supported"), and the parallel sizes each lets
# a resume change. dp_reshardable: every rank writes its own flat shard, no gather. fully_reshardable: the state is
# gathered over DP at each save and stored per parameter, laid out like the weights, so it reshards as they do.
OPTIMIZER_FORMATS = {"dp_reshardable": ("dp",), "fully_reshardable": ("tp", "pp", "dp")}
_DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
# Files of an HF model directory that are weights, not configuration: never copied into hf/.
_HF_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack", ".ckpt", ".index.json")

PathLike = str | os.PathLike


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


# ---- collectives of one role ------------------------------------------------------------------------------

def _all_gather(obj: Any, group: dist.ProcessGroup) -> list:
    out = [None] * group.size()
    dist.all_gather_object(out, obj, group=group)
    return out


def _on_ranks(group: dist.ProcessGroup, doing: str, fn, *, first_only: bool = False) -> Any:
    """Runs `fn` on every rank (or on the first only), then raises on EVERY rank if it failed on any, so that no
    rank walks on into a collective the others have left. A rank that failed raises its own error."""
    result, error = None, None
    if not first_only or group.rank() == 0:
        try:
            result = fn()
        except Exception as e:  # noqa: BLE001 - re-raised below, on every rank
            error = e
    reports = _all_gather(None if error is None else repr(error), group)
    failures = [f"rank {r}: {report}" for r, report in enumerate(reports) if report]
    if error is not None:
        raise error
    if failures:
        raise OSError(f"{doing} failed on another rank: " + "; ".join(failures))
    return result


# ---- megatron sharded state dicts without global parallel state -------------------------------------------


def _model_sharded_state_dict(gpt: GPTModel) -> dict:
    pgc = gpt.pg_collection
    # With tied embeddings, the last pipeline stage's output layer takes its replica id from megatron's global
    # data-parallel rank (language_module.py), which is never initialised here: give it this model's own.
    saved = parallel_state._MPU_DATA_PARALLEL_RANK
    parallel_state.set_data_parallel_rank(pgc.dp_cp.rank())
    try:
        return gpt.sharded_state_dict(metadata={"dp_cp_group": pgc.dp_cp})
    finally:
        parallel_state.set_data_parallel_rank(saved)


def _torch_adams(optimizer) -> list:
    """The megatron optimizers (of a chain) that step a torch Adam, which keeps a `step` per parameter. (TE's
    and apex's fused Adam keep it in the param group, which megatron's checkpointing handles on its own.)"""
    return [opt for opt in getattr(optimizer, "chained_optimizers", [optimizer])
            if isinstance(opt.optimizer, (torch.optim.Adam, torch.optim.AdamW))]


def _ensure_optimizer_state(optimizer) -> None:
    """A fresh torch Adam has no state until its first step, but megatron's DistributedOptimizer reads the
    per-parameter `step` to build its state dict, for loading too. Allocate the state as the first step would;
    a load then overwrites all of it."""
    for opt in _torch_adams(optimizer):
        opt.init_state_fn(opt.optimizer, opt.config)
        for state in opt.optimizer.state.values():
            state.setdefault("step", torch.tensor(0.0))


def _restore_adam_steps(optimizer) -> None:
    """megatron-core 0.16's DistributedOptimizer over a torch Adam checkpoints the Adam step in its param
    groups, but on load it (1) gives every parameter's state the SAME `step` tensor, which torch's Adam would
    then advance once per parameter, and (2) overwrites it with the fresh optimizer's step carried by the
    dp_reshardable parameter state. Give each parameter its own step, from its group."""
    for opt in _torch_adams(optimizer):
        if not isinstance(opt, DistributedOptimizer):
            continue
        for group in opt.optimizer.param_groups:
            if "step" not in group:
                continue
            step = float(group.pop("step"))  # stale once training goes on; state_dict() writes it afresh
            for param in group["params"]:
                state = opt.optimizer.state[param]
                state["step"] = torch.tensor(step, dtype=state["step"].dtype)


@contextlib.contextmanager
def _adam_step_passed_through(optimizer):
    """megatron-core 0.16's fully_reshardable load over a torch Adam copies every entry of each parameter's state,
    `step` included, from the loaded tensors, which never hold one (the step comes from the param groups): a
    KeyError. Hand each parameter's current step through; `_restore_adam_steps` then sets the saved one."""
    patched = [opt for opt in _torch_adams(optimizer) if isinstance(opt, DistributedOptimizer)]
    for opt in patched:
        set_states = opt._set_main_param_and_optimizer_states

        def with_step(model_param, tensors, opt=opt, set_states=set_states):
            current = opt._get_main_param_and_optimizer_states(model_param)
            set_states(model_param, {k: current[k] for k in current.keys() - tensors.keys()} | tensors)

        opt._set_main_param_and_optimizer_states = with_step
    try:
        yield
    finally:
        for opt in patched:
            del opt._set_main_param_and_optimizer_states  # the class's method again


# ---- small file helpers -----------------------------------------------------------------------------------


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _write_json(path: Path, obj: Any) -> None:
    _write_atomic(path, json.dumps(obj, indent=1, sort_keys=True) + "\n")


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text())


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync_and_describe(path: Path) -> dict:
    with open(path, "rb") as f:
        os.fsync(f.fileno())
    return {"size": path.stat().st_size, "sha256": _sha256(path)}


def _copy_hf_files(hf_dir: PathLike, dst: Path) -> None:
    src = Path(hf_dir)
    if not (src / "config.json").is_file():
        raise FileNotFoundError(f"hf_dir={str(src)!r} has no config.json")
    dst.mkdir(parents=True, exist_ok=True)
    for file in sorted(src.iterdir()):
        if file.is_file() and not file.name.endswith(_HF_WEIGHT_SUFFIXES):
            shutil.copy2(file, dst / file.name)


def resolve_checkpoint_dir(path: PathLike) -> Path:
    """A checkpoint directory from itself, from a `latest` pointer file, or from a run's checkpoints directory."""
    path = Path(path)
    if path.is_file():
        return path.parent / path.read_text().strip()
    if path.is_dir() and not (path / META_FILE).exists() and (path / LATEST_FILE).is_file():
        return path / (path / LATEST_FILE).read_text().strip()
    return path


def read_checkpoint_metadata(directory: PathLike) -> dict:
    """The metadata of a model or training checkpoint, with a clear error when it is not one."""
    directory = resolve_checkpoint_dir(directory)
    meta_path = directory / META_FILE
    if not meta_path.is_file():
        raise FileNotFoundError(
            f"no megatron-gopd model checkpoint at {directory}: expected {meta_path} (written last by save_model "
            f"and save_training_checkpoint; a directory without it is missing or incomplete)"
        )
    meta = _read_json(meta_path)
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{meta_path}: format_version {meta.get('format_version')!r}, expected {FORMAT_VERSION}")
    return meta


def _architecture(gpt: GPTModel) -> dict:
    c = gpt.config
    return {
        "num_layers": c.num_layers, "hidden_size": c.hidden_size, "num_attention_heads": c.num_attention_heads,
        "num_query_groups": c.num_query_groups, "kv_channels": c.kv_channels, "ffn_hidden_size": c.ffn_hidden_size,
        "padded_vocab_size": gpt.vocab_size, "qk_layernorm": c.qk_layernorm, "add_qkv_bias": c.add_qkv_bias,
        "tie_word_embeddings": gpt.share_embeddings_and_output_weights,
        "num_moe_experts": c.num_moe_experts, "moe_ffn_hidden_size": c.moe_ffn_hidden_size,
    }


def _metadata(gpt: GPTModel, kind: str, hf_dir: PathLike | None) -> dict:
    pgc = gpt.pg_collection
    model_type = _read_json(Path(hf_dir) / "config.json").get("model_type") if hf_dir else None
    return {
        "format_version": FORMAT_VERSION, "kind": kind, "model_type": model_type,
        "dtype": _DTYPE_NAMES[gpt.config.params_dtype],
        "parallel": _parallel_sizes(pgc),
        "architecture": _architecture(gpt),
    }


def _parallel_sizes(pgc) -> dict:
    return {"tp": pgc.tp.size(), "pp": pgc.pp.size(), "dp": pgc.dp.size(), "ep": pgc.ep.size(),
            "etp": pgc.expt_tp.size()}


def _check_same_dtype(meta: dict, gpt: GPTModel, directory: Path) -> None:
    dtype = _DTYPE_NAMES[gpt.config.params_dtype]
    if meta["dtype"] != dtype:
        raise ValueError(
            f"dtype mismatch: the training checkpoint at {directory} holds {meta['dtype']} weights, but the model "
            f"was built with {dtype}; resume with dtype {meta['dtype']}, or start a new run from its weights "
            f"(student.path), which casts them"
        )


def _check_architecture(meta: dict, gpt: GPTModel, directory: Path) -> None:
    arch = _architecture(gpt)
    diff = {k: (meta["architecture"].get(k), v) for k, v in arch.items() if meta["architecture"].get(k) != v}
    if diff:
        raise ValueError(
            f"the checkpoint at {directory} is of another architecture: "
            + ", ".join(f"{k}: checkpoint {a!r} vs model {b!r}" for k, (a, b) in diff.items())
        )


def _dist_save(sharded_state_dict: dict, directory: Path, group: dist.ProcessGroup) -> None:
    _in_process_write_results_queue()
    try:
        with collectives_scoped_to(group):
            dist_checkpointing.save(sharded_state_dict, str(directory))
    except CheckpointException as e:  # a BaseException, which a trainer's `except Exception` would miss
        raise OSError(f"writing the dist checkpoint {directory} failed: {e}") from e


def _in_process_write_results_queue() -> None:
    """Our saves are synchronous: megatron-core's writer hands its results back within this process. Its default
    queue lives in a Manager server started with `spawn`, which must import torch and megatron to unpickle them
    (~6 s of every trainer run on 2 cores); a forked server would instead inherit the process group's sockets."""
    if getattr(filesystem_async, "_results_queue", False) is None:
        filesystem_async._results_queue = queue.Queue()


# ---- model checkpoints ------------------------------------------------------------------------------------


def save_model(directory: PathLike, gpt: GPTModel, *, hf_dir: PathLike | None = None,
               group: dist.ProcessGroup) -> None:
    """Writes the model's weights as a dist checkpoint that loads at any TP/PP, plus `hf/` and the metadata.

    Collective over `group` (every rank of the model's role). The directory must not hold files yet.
    """
    directory = Path(directory)

    def prepare():
        if directory.exists() and any(directory.iterdir()):
            raise FileExistsError(f"{directory} already holds files; save a model checkpoint into a new directory")
        (directory / DIST_DIR).mkdir(parents=True, exist_ok=True)

    def finish():
        if hf_dir is not None:
            _copy_hf_files(hf_dir, directory / HF_DIR)
        _write_json(directory / META_FILE, _metadata(gpt, "model", hf_dir))

    _on_ranks(group, f"preparing {directory}", prepare, first_only=True)
    _dist_save({"model": _model_sharded_state_dict(gpt)}, directory / DIST_DIR, group)
    _on_ranks(group, f"writing the metadata of {directory}", finish, first_only=True)


@torch.no_grad()
def load_model(directory: PathLike, gpt: GPTModel, *, group: dist.ProcessGroup) -> dict:
    """Loads the weights of a model checkpoint, or of a training checkpoint, into `gpt` built at any TP/PP and in
    any dtype (the weights are cast to the model's).

    `directory` may also be a `latest` pointer file or a run's checkpoints directory. Collective over `group`.
    Returns the checkpoint's metadata.
    """
    directory = resolve_checkpoint_dir(directory)
    meta = read_checkpoint_metadata(directory)
    _check_architecture(meta, gpt, directory)  # not the dtype: the reader copies into the model's tensors, casting
    # Across layer specs: Transformer Engine layers add `_extra_state` entries (FP8 scaling metadata) that a
    # checkpoint written without TE lacks; megatron maps every weight's key between the specs. The checkpoint's
    # absent keys are dropped from the request ("unexpected" in megatron's terms) and must all be extra state.
    with collectives_scoped_to(group):
        loaded, _, absent = dist_checkpointing.load({"model": _model_sharded_state_dict(gpt)},
                                                    str(directory / DIST_DIR), strict=StrictHandling.RETURN_UNEXPECTED)
    _require_only_extra_state(absent, f"{directory} lacks the weights")
    result = gpt.load_state_dict(loaded["model"], strict=False)  # TE's extra state then keeps its fresh value
    _require_only_extra_state(result.missing_keys, f"{directory} did not load")
    _require_only_extra_state(result.unexpected_keys, f"{directory} has weights the model lacks:")
    return meta


def _require_only_extra_state(keys, problem: str) -> None:
    weights = sorted(k for k in keys if not k.endswith("_extra_state"))
    if weights:
        raise ValueError(f"{problem} {weights[:5]} ({len(weights)} in all): not a checkpoint of this architecture")


# ---- RNG states -------------------------------------------------------------------------------------------


def capture_rng_state() -> dict:
    """Every RNG stream a training step may draw from, as tensors and plain values (safe to torch.load)."""
    kind, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos,
                  "has_gauss": has_gauss, "cached_gaussian": cached_gaussian},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])
    random.setstate(state["python"])
    np_state = state["numpy"]
    np.random.set_state((np_state["kind"], np_state["keys"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["cached_gaussian"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# ---- training checkpoints ---------------------------------------------------------------------------------


def _training_sharded_state_dict(trainable, optimizer_format: str, *, is_loading: bool) -> dict:
    _ensure_optimizer_state(trainable.optimizer)  # also lets a step-0 checkpoint be saved
    model = _model_sharded_state_dict(trainable.gpt)
    optimizer = trainable.optimizer.sharded_state_dict(model, is_loading=is_loading,
                                                       metadata={"distrib_optim_sharding_type": optimizer_format})
    return {"model": model, "optimizer": optimizer}


def _step_dirs(root: Path) -> dict[int, Path]:
    found = {}
    for path in root.iterdir() if root.is_dir() else ():
        match = _STEP_DIR.match(path.name)
        if match and path.is_dir():
            found[int(match.group(1))] = path
    return found


def _remove_dir(path: Path) -> None:
    # Renamed first, so that a crash half-way through never leaves something that looks like a checkpoint.
    doomed = path.with_name(f"{TMP_PREFIX}delete-{path.name}")
    os.rename(path, doomed)
    shutil.rmtree(doomed)


def _commit(tmp: Path, final: Path, keep_last: int) -> None:
    """Rank 0: move a fully written checkpoint into place, point `latest` at it, drop the old ones."""
    root = final.parent
    replaced = final.with_name(f"{TMP_PREFIX}replaced-{final.name}")
    if final.exists():  # a re-save of a step (e.g. one renamed into place just before a crash, never committed)
        os.rename(final, replaced)
    os.rename(tmp, final)
    _fsync_dir(root)
    _write_atomic(root / LATEST_FILE, final.name + "\n")
    shutil.rmtree(replaced, ignore_errors=True)
    step = int(_STEP_DIR.match(final.name).group(1))
    kept = sorted(s for s in _step_dirs(root) if s <= step)[-keep_last:]
    for s, path in _step_dirs(root).items():
        if s not in kept:
            _remove_dir(path)


def save_training_checkpoint(
    root: PathLike,
    step: int,
    trainable,
    *,
    trainer_state: dict,
    rank_state: dict | None = None,
    keep_last: int,
    group: dist.ProcessGroup,
    hf_dir: PathLike | None = None,
    optimizer_format: str = "dp_reshardable",
) -> Path:
    """Atomically writes `<root>/step_NNNNNNNN/` and points `<root>/latest` at it; keeps the last `keep_last`.

    Saves the model and distributed optimizer (in `optimizer_format`, one of OPTIMIZER_FORMATS), the LR scheduler,
    `trainer_state` (JSON-able), and per rank the RNG states plus `rank_state` (tensors and plain values).
    Collective over `group`, the student's ranks. On any failure every rank raises, and the previous checkpoint
    stays the latest.
    """
    if keep_last < 1:
        raise ValueError(f"keep_last must be >= 1, got {keep_last}")
    if optimizer_format not in OPTIMIZER_FORMATS:
        raise ValueError(f"optimizer_format must be one of {sorted(OPTIMIZER_FORMATS)}, got {optimizer_format!r}")
    json.dumps(trainer_state)  # fail before writing anything when it is not JSON-able
    root = Path(root)
    final = root / step_dir_name(step)
    tmp = root / (TMP_PREFIX + final.name)

    def prepare():
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(TMP_PREFIX + "*"):  # left by a crashed save or deletion
            shutil.rmtree(stale)
        (tmp / DIST_DIR).mkdir(parents=True)

    _on_ranks(group, f"preparing {tmp}", prepare, first_only=True)
    try:
        _dist_save(_training_sharded_state_dict(trainable, optimizer_format, is_loading=False), tmp / DIST_DIR, group)
        _on_ranks(group, f"writing {tmp}", lambda: _write_rank_files(tmp, trainable, step, trainer_state, rank_state,
                                                                     group, hf_dir, optimizer_format))
        _write_manifest(tmp, group)
        _on_ranks(group, f"committing {final}", lambda: _commit(tmp, final, keep_last), first_only=True)
    except BaseException:
        if group.rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)  # frees the space; the previous checkpoint is untouched
        raise
    return final


def _write_rank_files(tmp: Path, trainable, step: int, trainer_state: dict, rank_state: dict | None,
                      group: dist.ProcessGroup, hf_dir: PathLike | None, optimizer_format: str) -> None:
    rank = group.rank()
    (tmp / RANK_DIR).mkdir(exist_ok=True)
    torch.save({"rng": capture_rng_state(), "caller": rank_state or {}}, tmp / RANK_DIR / f"rank_{rank:05d}.pt")
    if rank == 0:
        if hf_dir is not None:
            _copy_hf_files(hf_dir, tmp / HF_DIR)
        _write_json(tmp / TRAINER_FILE, {"trainer_state": trainer_state,
                                         "scheduler": trainable.scheduler.state_dict()})
        meta = _metadata(trainable.gpt, "training", hf_dir)
        meta.update(step=step, world=group.size(), optimizer_format=optimizer_format)
        _write_json(tmp / META_FILE, meta)


def _write_manifest(tmp: Path, group: dist.ProcessGroup) -> None:
    """Every rank checksums and fsyncs a share of the files; rank 0 writes the manifest from all shares."""
    rank = group.rank()
    files = computed_on(group, lambda: sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file()))
    share = _on_ranks(group, f"checksumming {tmp}",
                      lambda: {f: _fsync_and_describe(tmp / f) for f in files[rank::group.size()]})
    entries = {name: entry for share in _all_gather(share, group) for name, entry in share.items()}

    def write():
        for directory in {(tmp / f).parent for f in files} | {tmp}:
            _fsync_dir(directory)
        _write_json(tmp / MANIFEST_FILE, {"format_version": FORMAT_VERSION, "files": entries})

    _on_ranks(group, f"writing the manifest of {tmp}", write, first_only=True)


def _verify_share(directory: Path, group: dist.ProcessGroup) -> list[str]:
    """This rank's share of the manifest check: what is wrong with the checkpoint, or nothing."""
    manifest_path = directory / MANIFEST_FILE
    try:
        files = _read_json(manifest_path)["files"]
    except FileNotFoundError:
        return [f"missing {MANIFEST_FILE} (an incomplete save, or not a training checkpoint)"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return [f"unreadable {MANIFEST_FILE}: {e}"]
    problems = []
    for name in sorted(files)[group.rank()::group.size()]:
        path, expected = directory / name, files[name]
        if not path.is_file():
            problems.append(f"missing file {name}")
        elif path.stat().st_size != expected["size"]:
            problems.append(
                f"size mismatch for {name}: {path.stat().st_size} bytes, manifest says {expected['size']}"
            )
        elif _sha256(path) != expected["sha256"]:
            problems.append(f"checksum mismatch for {name}")
    if group.rank() == 0 and META_FILE not in files:
        problems.append(f"{META_FILE} is not in the manifest")
    return problems


def _candidates(root: Path, resume: str) -> list[Path]:
    """The checkpoints to try, best first: the one `latest` names, then the older ones, newest first."""
    if resume != "auto":
        return [resolve_checkpoint_dir(resume)]
    steps = _step_dirs(root)
    latest_file, latest_step = root / LATEST_FILE, None
    if latest_file.is_file():
        match = _STEP_DIR.match(latest_file.read_text().strip())
        latest_step = int(match.group(1)) if match else None
        if latest_step not in steps:
            warnings.warn(f"{latest_file} names {latest_file.read_text().strip()!r}, which is not a checkpoint "
                          f"in {root}; trying the others, newest first")
            latest_step = None
    # Directories newer than `latest` were renamed into place but never committed: never pick them.
    return [steps[s] for s in sorted(steps, reverse=True) if latest_step is None or s <= latest_step]


def _choose_checkpoint(root: Path, resume: str, group: dist.ProcessGroup) -> Path | None:
    """Rank 0 names the candidates; every rank verifies a share of each; all ranks take the same one."""
    candidates = computed_on(group, lambda: [str(p) for p in _candidates(root, resume)])
    for candidate in map(Path, candidates):
        problems = sorted(p for share in _all_gather(_verify_share(candidate, group), group) for p in share)
        if not problems:
            return candidate
        message = f"skipping checkpoint {candidate}: " + "; ".join(problems)
        if resume != "auto":
            raise ValueError(f"cannot resume from {candidate}: " + "; ".join(problems))
        if group.rank() == 0:
            fallback = " - falling back to the previous one" if candidate != Path(candidates[-1]) else ""
            warnings.warn(message + fallback)
    if candidates:
        raise RuntimeError(
            f"no loadable checkpoint in {root}: all {len(candidates)} failed verification (see warnings)"
        )
    return None


def load_training_checkpoint(
    root: PathLike, trainable, resume: str = "auto", *, group: dist.ProcessGroup
) -> tuple[dict, dict] | None:
    """Restores the newest verified checkpoint under `root` (or the one `resume` names) into `trainable`.

    "auto" follows `latest`, and skips with a warning any checkpoint whose manifest check fails (missing,
    truncated or corrupt files), falling back to the previous one. Restores the model, the optimizer, the LR
    scheduler and this rank's RNG states. Returns (trainer_state, rank_state), or None when `root` holds no
    checkpoint. Collective over `group`.
    """
    directory = _choose_checkpoint(Path(root), resume, group)
    if directory is None:
        return None
    meta = read_checkpoint_metadata(directory)
    optimizer_format = meta.get("optimizer_format", "dp_reshardable")  # the only one before the field existed
    changed = check_layout(meta, _parallel_sizes(trainable.pgc), directory)
    _check_architecture(meta, trainable.gpt, directory)
    _check_same_dtype(meta, trainable.gpt, directory)
    if changed and group.rank() == 0:
        warnings.warn(f"resuming {directory} with {' and '.join(changed)} changed ({_describe(meta['parallel'], changed)}"
                      f" -> {_describe(_parallel_sizes(trainable.pgc), changed)}): the weights and the optimizer state "
                      "are resharded, and the data position carries over (a step's prompts do not depend on the layout)"
                      + ("; the rollout seeds are per DP replica, so the samples are fresh draws from the same policy"
                         if "dp" in changed else ""))
    with torch.no_grad(), collectives_scoped_to(group):
        loaded = dist_checkpointing.load(_training_sharded_state_dict(trainable, optimizer_format, is_loading=True),
                                         str(directory / DIST_DIR))
        trainable.gpt.load_state_dict(loaded["model"])
        with _adam_step_passed_through(trainable.optimizer):
            trainable.optimizer.load_state_dict(loaded["optimizer"])
        _restore_adam_steps(trainable.optimizer)
    training = _read_json(directory / TRAINER_FILE)
    trainable.scheduler.num_steps = 0  # its load_state_dict ADDS the saved step count to the current one
    trainable.scheduler.load_state_dict(training["scheduler"])
    rank_file = directory / RANK_DIR / f"rank_{group.rank():05d}.pt"
    if meta["world"] != group.size():
        if group.rank() == 0:
            warnings.warn(f"{directory} was written by {meta['world']} ranks, this run has {group.size()}: "
                          "the per-rank RNG states are not restored")
        return training["trainer_state"], {}
    per_rank = torch.load(rank_file, weights_only=True, map_location="cpu")
    restore_rng_state(per_rank["rng"])
    return training["trainer_state"], per_rank["caller"]


def _describe(parallel: dict, sizes) -> str:
    return " ".join(f"{k}={parallel[k]}" for k in sizes)


def check_layout(meta: dict, now: dict, directory: Path) -> list[str]:
    """The parallel sizes that differ between a training checkpoint's metadata and this run (`now`); raises,
    naming them, when the checkpoint's optimizer format cannot reshard over one of them."""
    # Checkpoints from before expert parallelism name no ep/etp: they were written without it (ep 1, etp = tp).
    written = {"ep": 1, "etp": meta["parallel"]["tp"], **meta["parallel"]}
    sizes = ("tp", "pp", "dp") + (("ep", "etp") if meta["architecture"].get("num_moe_experts") else ())
    changed = [k for k in sizes if written[k] != now[k]]
    optimizer_format = meta.get("optimizer_format", "dp_reshardable")
    fixed = [k for k in changed if k not in OPTIMIZER_FORMATS[optimizer_format]]
    if fixed:
        hint = ("; write the checkpoints with checkpoint.fully_reshardable=true to change tp or pp"
                if optimizer_format == "dp_reshardable" and not {"ep", "etp"} & set(fixed) else "")
        raise ValueError(
            f"cannot resume {directory}: it was written at {_describe(written, sizes)}, this run is "
            f"{_describe(now, sizes)}; {' and '.join(fixed)} changed, and its optimizer state ({optimizer_format}) "
            f"reshards over {' and '.join(OPTIMIZER_FORMATS[optimizer_format])} only. Resume at "
            f"{_describe(written, fixed)}{hint}, or start a new run from its weights (student.path)")
    return changed


# ---- the owner of a run's resumable state -----------------------------------------------------------------


class Stateful(Protocol):
    """torch's convention: what a checkpoint needs of an object to restore it (JSON-able here)."""

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class TrainingCheckpointer:
    """The one owner of a run's resumable state: in one atomic checkpoint per save, the trainable model (weights,
    optimizer, LR schedule), every RNG stream, and the state of each `Stateful` it holds (the trainer's counters,
    the prompt sampler); `restore` puts all of it back. Collective over `group`, the student's ranks."""

    def __init__(self, root: PathLike, trainable, states: dict[str, Stateful], *, group: dist.ProcessGroup,
                 keep_last: int, hf_dir: PathLike | None = None, fully_reshardable: bool = False):
        self.root, self.trainable, self.states = Path(root), trainable, states
        self.group, self.keep_last, self.hf_dir = group, keep_last, hf_dir
        self.optimizer_format = "fully_reshardable" if fully_reshardable else "dp_reshardable"

    def save(self, step: int) -> Path:
        return save_training_checkpoint(self.root, step, self.trainable, keep_last=self.keep_last, group=self.group,
                                        hf_dir=self.hf_dir, optimizer_format=self.optimizer_format,
                                        trainer_state={name: s.state_dict() for name, s in self.states.items()})

    def restore(self, resume: str) -> bool:
        """Restores the newest verified checkpoint (`resume` "auto") or the one `resume` names; nothing with
        "never" or before the first save. Returns whether it restored one."""
        if resume == "never":
            return False
        loaded = load_training_checkpoint(self.root, self.trainable, resume, group=self.group)
        if loaded is None:
            return False
        trainer_state = loaded[0]
        missing = sorted(set(self.states) - set(trainer_state))
        if missing:
            raise ValueError(f"the checkpoint restored from {self.root} holds no state for {missing} (written by an "
                             "older megatron-gopd?); start a new run from its weights (student.path) instead")
        for name, state in self.states.items():
            state.load_state_dict(trainer_state[name])
        return True
