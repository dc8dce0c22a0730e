"""Export teacher maps of a data source into a TeacherStore.

  python -m lfi_jax.teacher.export --teacher=oracle --data=shortcut_digits --split=train \\
      --out=/tmp/teacher/train --grid=7 [--noise_blur=1 --noise_shift=0 --noise_uniform=0] \\
      [--data_option num_train=2000 ...] [--shard_size=1024] [--shard=i/n]

Backends (`BACKENDS`) hold function references: an export function `(source, indices,
options) -> [(example_id, TeacherEntry)]`, a provenance function `options -> dict` (recorded in
the manifest and compared when an export resumes), a precheck `options -> dict` (the part of
the provenance known without loading the teacher, compared with an existing store before a
VLM is loaded) and an options table `{name: (default, help)}` from which the CLI makes one
flag per option (`--noise_blur` etc. for the oracle's blur/shift/uniform, `--<name>` otherwise).
torch and transformers are imported only when the llava teacher is built.

The manifest records what identifies the data (`data_identity`: kind, name, split, the options
that change the images; never a path) and, for sources read from files, the index each image
file's content fingerprint, so a run can check the store fits its data
(lfi_jax/teacher/provenance.py).

A re-run skips finished shards; a killed run loses at most the shard in flight. With
`--shard=i/n` this process exports only shards with index % n == i; whichever process finishes
the last shard writes the manifest. Progress goes to stderr, a JSON summary to stdout; Ctrl-C
ends with one line saying how many shards are saved (a re-run continues from there).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from lfi_jax.cli import add_debug_flag, run_cli
from lfi_jax.data.sources import SOURCE_KINDS, get_source
from lfi_jax.errors import UserError
from lfi_jax.teacher import llava_export, oracle, oracle_dense
from lfi_jax.teacher.progress import log_line
from lfi_jax.teacher.provenance import data_identity
from lfi_jax.teacher.records import describe, diff_keys, read_json
from lfi_jax.teacher.store import EXPORT, MANIFEST, StoreWriter, TeacherStore, comparable, to_json_value


@dataclasses.dataclass(frozen=True)
class Backend:
    export: Callable[..., list]  # (source, indices, options) -> [(id, TeacherEntry)]
    provenance: Callable[[Mapping[str, Any]], dict]  # options -> dict (recorded in the manifest)
    options: Mapping[str, tuple[Any, str]]  # {name: (default, help)}
    precheck: Callable[[Mapping[str, Any]], dict] | None = None  # options -> provenance keys known before loading
    takes_progress: bool = False  # export() reads options["progress"] (its own progress bar)


BACKENDS: dict[str, Backend] = {
    "oracle": Backend(oracle.export_backend, oracle.provenance, oracle.OPTIONS, precheck=oracle.provenance),
    # one map per image from every ground-truth instance (Eq. 12's form), for the dense tasks
    "oracle_dense": Backend(
        oracle_dense.export_backend, oracle_dense.provenance, oracle_dense.OPTIONS, precheck=oracle_dense.provenance
    ),
    "llava": Backend(
        llava_export.export_backend, llava_export.provenance, llava_export.TEACHER_OPTIONS,
        precheck=llava_export.precheck, takes_progress=True,
    ),
}
_SPEC_FORMS = [k if not v.arg else f"{k}:{v.arg}" for k, v in SOURCE_KINDS.items()]
# option name -> CLI flag name, where they differ
FLAG_NAMES = {"blur": "noise_blur", "shift": "noise_shift", "uniform": "noise_uniform"}


def get_backend(name: str) -> Backend:
    if name not in BACKENDS:
        raise ValueError(f"unknown teacher backend {name!r}; known: {sorted(BACKENDS)}")
    return BACKENDS[name]


def parse_shard(spec: str | Sequence[int]) -> tuple[int, int]:
    """'i/n' (or (i, n)) -> (i, n) with 0 <= i < n."""
    try:
        i, n = (int(x) for x in (spec.split("/") if isinstance(spec, str) else spec))
    except (TypeError, ValueError):
        raise ValueError(f"--shard={spec!r}: expected i/n, e.g. 0/4") from None
    if not 0 <= i < n:
        raise ValueError(f"--shard={spec!r}: need 0 <= i < n")
    return i, n


def _fmt_time(s: float) -> str:
    return str(datetime.timedelta(seconds=round(s))) if s == s and s != float("inf") else "?"


class ExportInterrupted(KeyboardInterrupt):
    """Ctrl-C during an export; the message says what was saved."""


def _precheck(out: str, partial: Mapping[str, Any], num_examples: int, shard_size: int) -> None:
    """Refuse, before the teacher is loaded, an export whose known settings differ from the
    store already at `out` (the writer repeats the full check once the provenance is known)."""
    export_file, manifest_file = os.path.join(out, EXPORT), os.path.join(out, MANIFEST)
    mine = {"num_examples": int(num_examples), "shard_size": int(shard_size), "manifest": to_json_value(dict(partial))}
    if os.path.isfile(export_file):
        old = read_json(export_file)
    elif os.path.isfile(manifest_file):
        m = read_json(manifest_file)
        old = {"num_examples": m.get("num_examples"), "shard_size": m.get("shard_size"), "manifest": m}
    else:
        return
    diffs = [d for d in diff_keys(comparable(old), comparable(mine)) if d[2] != "<absent>"]
    if diffs:
        raise ValueError(
            f"teacher store {out} was exported with other settings; refusing to mix them "
            f"(use another --out or delete the store): {describe(diffs, 'store has', 'this export has')}"
        )


def export_store(
    source,
    out: str,
    backend: str = "oracle",
    *,
    shard_size: int = 1024,
    shard: str | Sequence[int] = (0, 1),
    data_spec: str | None = None,
    data_options: Mapping[str, Any] | None = None,
    progress: bool = True,
    **options: Any,
) -> TeacherStore | None:
    """Export `backend`'s maps for every example of `source` into the store at `out`.

    `options` go to the backend (oracle: grid, geometry, target, blur, shift, uniform, seed).
    `data_spec` (default `source.name`) and `data_options` are recorded in the manifest, with
    the data's identity; each image's fingerprint goes to the index. Returns the opened store
    once all shards exist, or None when shards of other `shard` workers are still missing.
    Settings that differ from a store already at `out` are refused before the teacher loads.
    """
    b = get_backend(backend)
    part, nparts = parse_shard(shard)
    t_start = time.perf_counter()
    recorded = dict(getattr(source, "options", None) or {})
    recorded.update(data_options or {})
    spec = data_spec or source.name
    manifest = {
        "backend": backend,
        "data": spec,
        "split": source.split,
        "data_options": to_json_value(recorded),
        "data_identity": data_identity(spec, source.split, recorded).to_json(),
        "class_names": list(getattr(source, "class_names", []) or []),
    }
    known = b.precheck(options) if b.precheck is not None else {}
    _precheck(out, {**manifest, "teacher": known}, len(source), shard_size)
    manifest["teacher"] = b.provenance(options)
    writer = StoreWriter(out, manifest, num_examples=len(source), shard_size=shard_size)
    mine = [i for i in range(writer.num_shards) if i % nparts == part]
    todo = [i for i in mine if not writer.shard_done(i)]
    if progress and len(todo) < len(mine):
        log_line(
            f"export {out}: {len(mine) - len(todo)} of this worker's {len(mine)} shards already done, skipping "
            "them"
        )
    total = sum(len(writer.shard_range(i)) for i in todo)
    done, t0 = 0, time.perf_counter()
    fingerprint = getattr(source, "content_fingerprint", None)
    try:
        for k, i in enumerate(todo):
            idx = list(writer.shard_range(i))
            records = list(b.export(source, idx, {**options, "progress": progress} if b.takes_progress else options))
            expected = [source.example_id(j) for j in idx]
            by_id = dict(records)
            if len(by_id) != len(records) or set(by_id) != set(expected):
                extra = sorted(set(by_id) - set(expected))[:3]
                missing = sorted(set(expected) - set(by_id))[:3]
                raise ValueError(
                    f"teacher backend {backend!r} returned {len(records)} entries for shard {i} of {out} "
                    f"({len(expected)} examples); missing e.g. {missing}, unexpected e.g. {extra}"
                )
            fingerprints = [fingerprint(j) for j in idx] if fingerprint is not None else None
            writer.write_shard(i, [(eid, by_id[eid]) for eid in expected], fingerprints=fingerprints)
            done += len(idx)
            if progress:
                dt = time.perf_counter() - t0
                rate = done / dt if dt > 0 else float("inf")
                eta = (total - done) / rate if rate > 0 else float("inf")
                log_line(
                    f"export {out}: shard {i + 1}/{writer.num_shards} written ({k + 1}/{len(todo)} this run), "
                    f"{done}/{total} examples, {rate:.1f} ex/s, ETA {_fmt_time(eta)}"
                )
    except KeyboardInterrupt:
        saved = writer.num_shards - len(writer.missing_shards())
        raise ExportInterrupted(
            f"export {out}: {saved} of {writer.num_shards} shards saved ({done} examples this run); "
            "re-run the same command to continue"
        ) from None
    missing = writer.missing_shards()
    if missing:
        if progress:
            log_line(
                f"export {out}: {len(missing)} shards still missing (other --shard workers?); manifest not "
                "written yet"
            )
        return None
    manifest = writer.finalize()
    if progress:
        log_line(
            f"export {out}: complete, {manifest['count']} maps ({manifest['degenerate_count']} degenerate), "
            f"grid {manifest['grid']}, {_fmt_time(time.perf_counter() - t_start)}"
        )
    return TeacherStore(out)


# --------------------------------------------------------------------------- CLI


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_data_options(items: Sequence[str]) -> dict[str, Any]:
    """['k=v', ...] -> {k: v} with v parsed as JSON where it parses (10, 0.5, [1,2], true)."""
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--data_option {item!r}: expected key=value")
        out[key.strip()] = _parse_value(value)
    return out


def _coerce(text: str | None, default: Any) -> Any:
    if text is None:
        return default
    if isinstance(default, bool):
        low = text.lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"expected a boolean, got {text!r}")
    for t in (int, float):
        if isinstance(default, t):
            try:
                return t(text)
            except ValueError:
                return text  # e.g. --grid=24,32; the backend checks it
    return text


def _base_parser(add_help: bool) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m lfi_jax.teacher.export",
        description="Export teacher maps C_vlm of a data source into a TeacherStore (docs/teacher.md).",
        add_help=add_help,
    )
    p.add_argument("--teacher", default="oracle", help=f"backend: {' | '.join(BACKENDS)} (default oracle)")
    p.add_argument("--data", help=f"data source spec: {' | '.join(_SPEC_FORMS)}")
    p.add_argument("--split", default="train", help="data split (default train)")
    p.add_argument("--out", help="store directory")
    p.add_argument("--data_option", action="append", default=[], metavar="KEY=VALUE", help="source option (repeatable)")
    p.add_argument("--shard_size", type=int, default=1024, help="examples per shard (default 1024)")
    p.add_argument("--shard", default="0/1", metavar="I/N", help="export only shards with index %% N == I")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    add_debug_flag(p)
    return p


def parse_args(argv: Sequence[str] | None = None) -> tuple[argparse.Namespace, dict[str, Any]]:
    """(common arguments, backend options) from the command line."""
    first, _ = _base_parser(add_help=False).parse_known_args(argv)
    p = _base_parser(add_help=True)
    if first.teacher not in BACKENDS:
        p.error(f"--teacher={first.teacher!r}: expected one of {sorted(BACKENDS)}")
    table = get_backend(first.teacher).options
    group = p.add_argument_group(f"{first.teacher} teacher options")
    for name, (default, help_text) in table.items():
        flag = FLAG_NAMES.get(name, name)
        aliases = [f"--{flag}"] + ([f"--{flag.replace('_', '-')}"] if "_" in flag else [])
        group.add_argument(*aliases, dest=f"opt__{name}", default=None, metavar="VALUE",
                           help=f"{help_text} (default {default!r})".replace("%", "%%"))
    args = p.parse_args(argv)
    if not args.data or not args.out:
        p.error("--data and --out are required")
    options = {}
    for name, (default, _) in table.items():
        try:
            options[name] = _coerce(getattr(args, f"opt__{name}"), default)
        except ValueError as e:
            p.error(f"--{FLAG_NAMES.get(name, name)}: {e}")
    return args, options


def _main(argv: Sequence[str], status: dict[str, str]) -> int:
    args, options = parse_args(argv)
    try:
        data_options = parse_data_options(args.data_option)
        source = get_source(args.data, args.split, data_options)
        if not args.quiet:
            log_line(f"export {args.out}: {args.teacher} teacher, {args.data}/{args.split}, {len(source)} examples")
        store = export_store(
            source,
            args.out,
            args.teacher,
            shard_size=args.shard_size,
            shard=args.shard,
            data_spec=args.data,
            data_options=data_options,
            progress=not args.quiet,
            **options,
        )
    except ExportInterrupted as e:
        status["note"] = str(e)
        raise
    except (ImportError, IndexError) as e:  # a missing optional dependency, a bad index: the user's to fix
        raise UserError(f"export {args.out}: {e}") from None
    summary: dict[str, Any] = {"out": args.out, "complete": store is not None}
    if store is not None:
        m = store.manifest
        summary.update({k: m[k] for k in ("count", "degenerate_count", "grid", "content_hash")})
    print(json.dumps(summary))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """The CLI (lfi_jax.cli convention: one `error:` line and exit 2 for a user error; Ctrl-C
    ends with one line saying how many shards are saved). Returns the exit code."""
    status: dict[str, str] = {}
    return run_cli(
        lambda a: _main(a, status), argv, exit=False,
        interrupt_note=lambda: status.get("note", "nothing written yet"),
    )


if __name__ == "__main__":
    sys.exit(main())
