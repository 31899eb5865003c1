"""A process's start: megatron-core's fused kernels are compiled on their first call, not at import
(megatron_gopd/runtime/deferred_compile.py)."""

import subprocess
import sys

from megatron_gopd.runtime.deferred_compile import compile_on_first_call
from tests.conftest import ROOT


def test_importing_the_trainer_imports_neither_dynamo_nor_inductor():
    code = ("import sys, megatron_gopd.session, megatron_gopd.trainer, megatron.core.jit as jit; "
            "print(sorted(m for m in ('torch._dynamo', 'torch._inductor') if m in sys.modules), "
            "jit.jit_fuser.__qualname__)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["[]", "compile_on_first_call.<locals>.defer"], out


def test_a_deferred_kernel_is_compiled_once_on_its_first_call():
    compiled = []

    def decorator(fn):
        compiled.append(fn.__name__)
        return lambda x: 2 * fn(x)

    @compile_on_first_call(decorator)
    def kernel(x):
        return x + 1

    assert compiled == [] and kernel.__name__ == "kernel"
    assert [kernel(1), kernel(2)] == [4, 6]
    assert compiled == ["kernel"]
