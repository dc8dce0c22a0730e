"""Atomic file writes, and the rewrite of one generated block of a Markdown file.

Every writer here writes a temporary file in the target's directory and renames it over the
target (`os.replace`), so a reader sees the old file or the new one, never half of one. The
result gets the permissions a plain `open(path, "w")` would give (0o666 & ~umask, not
mkstemp's 0600), and the temporary file is removed whenever writing fails.

`replace_doc_block` is how the bench scripts put their tables into docs/performance.md: only
the block between `<!-- begin: MARKER -->` and `<!-- end: MARKER -->` inside one section is
replaced, so hand-written prose and other sections stay byte for byte as they are.
"""

from __future__ import annotations

import io
import json
import os
import re
import tempfile
from collections.abc import Callable
from typing import Any

import matplotlib.pyplot as plt

__all__ = ["atomic_write", "atomic_write_with", "write_json_atomic", "save_figure", "replace_doc_block"]


def _umask() -> int:
    """The process umask, read without changing it where Linux allows (os.umask(0) would
    briefly give files that other threads create mode 0666)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    m = os.umask(0)
    os.umask(m)
    return m


def atomic_write_with(path: str | os.PathLike, write_fn: Callable[[str], Any], *, fsync: bool = False) -> None:
    """Call `write_fn(tmp)` to write a temporary file next to `path`, then rename it to `path`.

    The parent directory is created if needed; the file gets umask permissions; with `fsync`
    its contents reach the disk before the rename. On any error (in `write_fn` or after) the
    temporary file is removed and the error re-raised; `path` is then untouched.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    os.close(fd)
    try:
        write_fn(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        if fsync:
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def atomic_write(path: str | os.PathLike, data: str | bytes, *, fsync: bool = False) -> None:
    """Write `data` (text as UTF-8, or bytes) to `path` atomically (`fsync`: on disk before the rename)."""

    def write(tmp: str) -> None:
        if isinstance(data, bytes):
            with open(tmp, "wb") as f:
                f.write(data)
        else:
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(data)

    atomic_write_with(path, write, fsync=fsync)


def write_json_atomic(path: str | os.PathLike, obj: Any, *, fsync: bool = False, **json_kwargs: Any) -> None:
    """Write `obj` as JSON (`json.dumps(obj, indent=1, **json_kwargs)`) plus a newline,
    atomically (`fsync`: on disk before the rename). The text is built first, so an
    unserialisable `obj` leaves no file."""
    atomic_write(path, json.dumps(obj, **{"indent": 1, **json_kwargs}) + "\n", fsync=fsync)


_FENCE = re.compile(r"^\s{0,3}(```|~~~)")
_HEADING = re.compile(r"^(#{1,6})(\s|$)")


def _lines(text: str) -> list[str]:
    """`text` split at "\\n" only (other line breaks, e.g. "\\r", stay inside their line)."""
    if text.endswith("\n"):
        text = text[:-1]
    return text.split("\n") if text else []


def _headings(lines: list[str]) -> list[tuple[int, int]]:
    """(line index, level) of the Markdown headings outside fenced code blocks."""
    out, fence = [], None
    for i, line in enumerate(lines):
        m = _FENCE.match(line)
        if m:
            fence = m.group(1) if fence is None else (None if m.group(1) == fence else fence)
            continue
        if fence is None:
            h = _HEADING.match(line)
            if h:
                out.append((i, len(h.group(1))))
    return out


def save_figure(fig, path: str, dpi: int = 110) -> None:
    """Save a matplotlib figure atomically (format from the extension, default PNG) and close it."""
    buf = io.BytesIO()
    try:
        fig.savefig(buf, format=os.path.splitext(path)[1].lstrip(".").lower() or "png", dpi=dpi)
    finally:
        plt.close(fig)
    atomic_write(path, buf.getvalue())


def replace_doc_block(path: str | os.PathLike, section: str, body: str, marker: str) -> None:
    """Put `body` between `<!-- begin: {marker} -->` and `<!-- end: {marker} -->` inside the
    Markdown section whose heading line is `section` (e.g. "## Interaction attention"),
    atomically.

    The section runs to the next heading of the same or a higher level. An existing block
    there is replaced in place; a missing one is appended to the end of the section; a missing
    section (heading plus block) is appended to the end of the file, which is created with a
    "# Performance" heading if it does not exist. Everything outside the block stays as it
    is. A begin marker without its end marker (or the reverse) raises ValueError.
    """
    path = os.fspath(path)
    begin, end = f"<!-- begin: {marker} -->", f"<!-- end: {marker} -->"
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            text = f.read()
    else:
        text = "# Performance\n"
    lines = _lines(text)
    block = [begin, *_lines(body), end]
    heads = _headings(lines)
    level = len(section) - len(section.lstrip("#"))
    start = next((i for i, _ in heads if lines[i].strip() == section.strip()), None)
    if start is None:
        while lines and not lines[-1].strip():
            lines.pop()
        new = lines + ([""] if lines else []) + [section, "", *block]
    else:
        stop = next((i for i, lv in heads if i > start and lv <= level), len(lines))
        marks = [i for i in range(start + 1, stop) if lines[i].strip() in (begin, end)]
        b = next((i for i in marks if lines[i].strip() == begin), None)
        e = next((i for i in marks if b is not None and i > b and lines[i].strip() == end), None)
        if (b is None) != (e is None) or (b is None and marks):
            raise ValueError(f"{path}: section {section!r} has an unpaired {begin if b is not None else end}")
        if b is not None:
            new = lines[:b] + block + lines[e + 1 :]
        else:
            body_lines = lines[start:stop]
            while body_lines and not body_lines[-1].strip():
                body_lines.pop()
            new = lines[:start] + body_lines + ["", *block] + ([""] if stop < len(lines) else []) + lines[stop:]
    atomic_write(path, "\n".join(new).rstrip("\n") + "\n")
