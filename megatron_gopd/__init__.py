"""megatron-gopd: Generalized On-Policy Distillation (G-OPD / ExOPD) on Megatron-core."""

import warnings

from megatron_gopd.runtime import deferred_compile

deferred_compile.install()

# Known-benign notices that every rank would print on every run: megatron-core falling back from Transformer
# Engine/apex kernels to its local implementations (expected on CPU), and torch deprecations inside megatron.
for _message in (".*Transformer Engine and Apex are not installed.*", "Apex is not installed.*",
                 r".*torch\.distributed\.\w+`? is deprecated.*", ".*absl.logging is not installed.*"):
    warnings.filterwarnings("ignore", message=_message)
