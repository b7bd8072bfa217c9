"""pyconv: fast, memory-bounded conversion and resharding of LLM checkpoints.

    import pyconv
    ckpt = pyconv.open("llama-hf")            # lazy: names, shapes, dtypes
    report = pyconv.reshard("llama-hf", "llama-bf16", to="hf", dtype="bf16", max_shard_size="5GB")
"""

from pyconv.api import Checkpoint, ReshardReport, open, plan_reshard, reshard
from pyconv.errors import Cancelled, FormatError, LayoutError, OutputError, PyconvError
from pyconv.verify import VerifyReport, verify

__version__ = "0.1.0"

__all__ = [
    "Cancelled", "Checkpoint", "convert_adapter", "FormatError", "LayoutError", "OutputError", "PyconvError", "ReshardReport",
    "VerifyReport", "__version__", "open", "plan_reshard", "reshard", "verify",
]


def __getattr__(name: str):
    # pyconv.convert_adapter (pyconv/lora_layout.py), imported on first use: plain conversions never need it
    if name == "convert_adapter":
        from pyconv.lora_layout import convert_adapter

        return convert_adapter
    raise AttributeError(f"module 'pyconv' has no attribute {name!r}")
