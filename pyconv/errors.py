"""pyconv's exceptions. Every error a user can cause is a PyconvError with a message
that names the file (or argument) and the problem; the CLI prints it on one line."""


class PyconvError(Exception):
    """Base class: the conversion cannot proceed (exit code 2 in the CLI)."""


class FormatError(PyconvError):
    """The input is malformed: a header, an offset table, an index or a pickle is wrong."""


class LayoutError(PyconvError):
    """The requested target layout is impossible for this model (e.g. heads not divisible by tp)."""


class OutputError(PyconvError):
    """The destination cannot be written (exists, unwritable, disk full, inside the source)."""


class Cancelled(PyconvError):
    """The run was stopped before it finished; nothing was committed."""
