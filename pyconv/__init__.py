"""pyconv: fast, memory-bounded conversion and resharding of LLM checkpoints."""

from pyconv.errors import Cancelled, FormatError, LayoutError, OutputError, PyconvError

__version__ = "0.1.0"

__all__ = ["Cancelled", "FormatError", "LayoutError", "OutputError", "PyconvError", "__version__"]
