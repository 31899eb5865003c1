"""Writes the benchmarks' tiny HF checkpoints (bench/common.py CHECKPOINTS) and converts each with
tools/convert_hf_to_megatron.py, in one process.

    python bench/dist/make_models.py --out DIR
"""

import argparse
import shutil
import sys
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.common import CHECKPOINTS, save_hf  # noqa: E402
from tools.convert_hf_to_megatron import main as convert  # noqa: E402

if __name__ == "__main__":  # dist_checkpointing's writer spawns processes that re-import this module
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    out = Path(parser.parse_args().out)
    for name, (spec, seed) in CHECKPOINTS.items():
        shutil.rmtree(out / name, ignore_errors=True)  # a conversion cut short leaves a directory it refuses
        save_hf(spec, out / "hf" / name, seed)
        convert(["--hf-dir", str(out / "hf" / name), "--save-dir", str(out / name)])
