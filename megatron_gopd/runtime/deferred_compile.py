"""megatron-core decorates its fused kernels with torch.compile as it is imported, and the first decoration
imports dynamo and inductor: ~3 s of every process's start on 2 cores (every rank, every tool, every test), for
kernels a CPU run never calls. Installed before megatron is imported (megatron_gopd/__init__.py), this makes that
decorator compile a kernel on its first call instead, which is when torch.compile compiles it anyway."""

from __future__ import annotations

import functools
import importlib.abc
import importlib.machinery
import sys

_MODULE = "megatron.core.jit"  # defines `jit_fuser`, the decorator every fused kernel module imports


def compile_on_first_call(decorator):
    def defer(fn):
        compiled = None

        @functools.wraps(fn)
        def call(*args, **kwargs):
            nonlocal compiled
            if compiled is None:
                compiled = decorator(fn)
            return compiled(*args, **kwargs)

        return call

    return defer


class _DeferJitFuser(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname != _MODULE:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return spec
        load = spec.loader.exec_module

        def exec_module(module):
            load(module)
            module.jit_fuser = compile_on_first_call(module.jit_fuser)

        spec.loader.exec_module = exec_module
        return spec


def install() -> None:
    if _MODULE not in sys.modules and not any(isinstance(f, _DeferJitFuser) for f in sys.meta_path):
        sys.meta_path.insert(0, _DeferJitFuser())
