"""The files of a source checkpoint are regular files: a FIFO, socket or device named like a shard
(`model.safetensors`, a `.distcp`, `config.json`) would block a reader forever or be skipped as
absent, so every entry of the source tree is checked by name before anything is opened."""

from __future__ import annotations

import os
import stat

from pyconv.errors import FormatError

MAX_ENTRIES = 1_000_000  # a checkpoint tree holds thousands; past this, opens still refuse non-files


def check_regular_tree(path: str) -> None:
    """FormatError naming the first entry under path (or path itself) that is neither a regular
    file nor a directory, symlinks followed (a hub cache's snapshot links into its blobs). Linked
    directories are checked but not descended into, so a link cannot make the walk loop."""
    _check_entry(path)
    if not os.path.isdir(path) or os.path.islink(path):
        return
    seen, pending = 0, [path]
    while pending and seen < MAX_ENTRIES:
        directory = pending.pop()
        try:
            entries = list(os.scandir(directory))
        except OSError as e:
            raise FormatError(f"{directory}: cannot list: {e.strerror}") from None
        for entry in entries:
            seen += 1
            _check_entry(entry.path)
            if entry.is_dir(follow_symlinks=False):
                pending.append(entry.path)


def _check_entry(path: str) -> None:
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        if os.path.islink(path):
            return  # a dangling link is absent, as for every reader
        raise FormatError(f"{path}: no such file or directory") from None
    except OSError as e:
        raise FormatError(f"{path}: cannot stat: {e.strerror}") from None
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        kind = ("a FIFO" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode)
                else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "not a regular file")
        raise FormatError(f"{path}: {kind}, not a regular file: pyconv reads checkpoints made of regular files")
