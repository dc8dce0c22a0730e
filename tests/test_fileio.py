"""lfi_jax.fileio: atomic writes (permissions, cleanup) and replace_doc_block."""

from __future__ import annotations

import json
import os
import stat

import pytest

from lfi_jax.fileio import atomic_write, atomic_write_with, replace_doc_block, write_json_atomic


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_atomic_write_text_and_bytes_get_umask_permissions(tmp_path, umask_022):
    p = tmp_path / "sub" / "a.txt"  # parent created
    atomic_write(p, "héllo\n")
    assert p.read_text(encoding="utf-8") == "héllo\n"
    assert _mode(p) == 0o644
    atomic_write(p, b"\x00\x01")
    assert p.read_bytes() == b"\x00\x01"
    assert _mode(p) == 0o644
    assert os.listdir(tmp_path / "sub") == ["a.txt"]


def test_atomic_write_with_gets_umask_permissions_and_fsyncs(tmp_path, umask_022):
    p = tmp_path / "b.bin"

    def write(tmp):
        assert os.path.dirname(tmp) == str(tmp_path)  # same directory: the rename is atomic
        with open(tmp, "wb") as f:
            f.write(b"data")

    atomic_write_with(str(p), write, fsync=True)
    assert p.read_bytes() == b"data"
    assert _mode(p) == 0o644


def test_umask_is_followed_not_fixed(tmp_path):
    old = os.umask(0o077)
    try:
        atomic_write(tmp_path / "c.txt", "x")
    finally:
        os.umask(old)
    assert _mode(tmp_path / "c.txt") == 0o600


def test_failing_write_fn_leaves_no_temp_file_and_keeps_the_old_file(tmp_path):
    p = tmp_path / "d.json"
    p.write_text("old")

    def write(tmp):
        with open(tmp, "w") as f:
            f.write("half")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        atomic_write_with(p, write)
    assert os.listdir(tmp_path) == ["d.json"]
    assert p.read_text() == "old"


def test_write_json_atomic_format(tmp_path, umask_022):
    p = tmp_path / "e.json"
    write_json_atomic(p, {"b": 1, "a": [1, 2]})
    assert p.read_text() == json.dumps({"b": 1, "a": [1, 2]}, indent=1) + "\n"
    write_json_atomic(p, {"b": 1, "a": 2}, indent=2, sort_keys=True)
    assert p.read_text() == '{\n  "a": 2,\n  "b": 1\n}\n'
    assert _mode(p) == 0o644
    with pytest.raises(TypeError):
        write_json_atomic(tmp_path / "f.json", {"x": object()})
    assert sorted(os.listdir(tmp_path)) == ["e.json"]


def test_write_json_atomic_fsyncs_when_asked(tmp_path, monkeypatch):
    synced = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real(fd)))
    write_json_atomic(tmp_path / "g.json", {"a": 1})
    assert synced == []
    write_json_atomic(tmp_path / "g.json", {"a": 2}, fsync=True, sort_keys=True)
    assert len(synced) == 1 and json.loads((tmp_path / "g.json").read_text()) == {"a": 2}


BEGIN, END = "<!-- begin: gen -->", "<!-- end: gen -->"
DOC = (
    "# Performance\n\n"
    "## Attention\n\nProse before.\n\n" + BEGIN + "\nold table\n" + END + "\n\nProse after.\n\n"
    "### Detail\n\nA subsection belongs to its section.\n\n"
    "## Other\n\nOther text, with its own\n" + "<!-- begin: other -->\nkept\n<!-- end: other -->\n"
    "```\n## not a heading (code)\n```\n\n"
    "### Sub\n\nsub text\n"
)


def _other(text: str) -> str:
    return text[text.index("## Other") :]


def test_replace_doc_block_replaces_only_its_block(tmp_path):
    p = tmp_path / "perf.md"
    p.write_text(DOC)
    replace_doc_block(p, "## Attention", "new table\n| a |", "gen")
    text = p.read_text()
    assert text == DOC.replace("old table\n", "new table\n| a |\n")
    assert _other(text) == _other(DOC)  # the neighbouring section, byte for byte
    replace_doc_block(p, "## Attention", "new table\n| a |", "gen")
    assert p.read_text() == text  # idempotent: no blank lines pile up


def test_replace_doc_block_appends_a_missing_block_to_its_section(tmp_path):
    p = tmp_path / "perf.md"
    doc = DOC.replace(BEGIN + "\nold table\n" + END + "\n\n", "")
    p.write_text(doc)
    replace_doc_block(p, "## Attention", "T", "gen")
    text = p.read_text()
    assert text.index("Prose after.") < text.index(BEGIN + "\nT\n" + END) < text.index("## Other")
    assert "its section.\n\n" + BEGIN + "\nT\n" + END + "\n\n## Other" in text
    assert _other(text) == _other(doc)


def test_replace_doc_block_appends_a_missing_section(tmp_path):
    p = tmp_path / "perf.md"
    p.write_text(DOC)
    replace_doc_block(p, "## Scaling", "rows", "gen")
    text = p.read_text()
    assert text == DOC + "\n## Scaling\n\n" + BEGIN + "\nrows\n" + END + "\n"
    # the other section's block with the same marker is left alone
    assert "old table" in text


def test_replace_doc_block_creates_the_file(tmp_path, umask_022):
    p = tmp_path / "docs" / "perf.md"
    replace_doc_block(p, "## Scaling", "rows", "gen")
    assert p.read_text() == "# Performance\n\n## Scaling\n\n" + BEGIN + "\nrows\n" + END + "\n"
    assert _mode(p) == 0o644


def test_replace_doc_block_refuses_an_unpaired_marker(tmp_path):
    p = tmp_path / "perf.md"
    doc = DOC.replace(END + "\n", "")
    p.write_text(doc)
    with pytest.raises(ValueError, match="unpaired"):
        replace_doc_block(p, "## Attention", "T", "gen")
    assert p.read_text() == doc and os.listdir(tmp_path) == ["perf.md"]
