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
    "Cancelled", "Checkpoint", "FormatError", "LayoutError", "OutputError", "PyconvError", "ReshardReport",
    "VerifyReport", "__version__", "open", "plan_reshard", "reshard", "verify",
]
