"""Export teacher maps of a data source into a TeacherStore.

  python -m lfi_jax.teacher.export --teacher=oracle --data=shortcut_digits --split=train \\
      --out=/tmp/teacher/train --grid=7 [--noise_blur=1 --noise_shift=0 --noise_uniform=0] \\
      [--data_option num_train=2000 ...] [--shard_size=1024] [--shard=i/n]

Backends are a registry (`BACKENDS`): each names, as "module:attribute" strings imported only
when used, an export function `(source, indices, options) -> [(example_id, TeacherEntry)]`,
a provenance function `options -> dict` (recorded in the manifest and compared when an export
resumes) and an options table `{name: (default, help)}` from which the CLI makes one flag per
option (`--noise_blur` etc. for the oracle's blur/shift/uniform, `--<name>` otherwise).

A re-run skips finished shards; a killed run loses at most the shard in flight. With
`--shard=i/n` this process exports only shards with index % n == i; whichever process finishes
the last shard writes the manifest. Progress goes to stderr, a JSON summary to stdout.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib
import json
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

from lfi_jax.teacher.store import StoreWriter, TeacherStore, to_json_value


@dataclasses.dataclass(frozen=True)
class Backend:
    export: str  # "module:function", (source, indices, options) -> [(id, TeacherEntry)]
    provenance: str  # "module:function", options -> dict
    options: str  # "module:ATTRIBUTE", {name: (default, help)}
    takes_progress: bool = False  # export() reads options["progress"] (its own progress bar)


BACKENDS: dict[str, Backend] = {
    "oracle": Backend(
        "lfi_jax.teacher.oracle:export_backend", "lfi_jax.teacher.oracle:provenance", "lfi_jax.teacher.oracle:OPTIONS"
    ),
    "llava": Backend(
        "lfi_jax.teacher.llava:export_backend", "lfi_jax.teacher.llava:provenance", "lfi_jax.teacher.llava:TEACHER_OPTIONS",
        takes_progress=True,
    ),
}
# option name -> CLI flag name, where they differ
FLAG_NAMES = {"blur": "noise_blur", "shift": "noise_shift", "uniform": "noise_uniform"}


def _resolve(ref: str) -> Any:
    module, _, attr = ref.partition(":")
    return getattr(importlib.import_module(module), attr)


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


def _log(msg: str) -> None:
    sys.stderr.write(msg + "\n")
    sys.stderr.flush()


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
    `data_spec` (default `source.name`) and `data_options` are recorded in the manifest.
    Returns the opened store once all shards exist, or None when shards of other `shard`
    workers are still missing.
    """
    b = get_backend(backend)
    part, nparts = parse_shard(shard)
    t_start = time.perf_counter()
    prov = _resolve(b.provenance)(options)
    recorded = dict(getattr(source, "options", None) or {})
    recorded.update(data_options or {})
    manifest = {
        "backend": backend,
        "teacher": prov,
        "data": data_spec or source.name,
        "split": source.split,
        "data_options": to_json_value(recorded),
        "class_names": list(getattr(source, "class_names", []) or []),
    }
    writer = StoreWriter(out, manifest, num_examples=len(source), shard_size=shard_size)
    mine = [i for i in range(writer.num_shards) if i % nparts == part]
    todo = [i for i in mine if not writer.shard_done(i)]
    if progress and len(todo) < len(mine):
        _log(f"export {out}: {len(mine) - len(todo)} of this worker's {len(mine)} shards already done, skipping them")
    export_fn = _resolve(b.export) if todo else None
    total = sum(len(writer.shard_range(i)) for i in todo)
    done, t0 = 0, time.perf_counter()
    for k, i in enumerate(todo):
        idx = list(writer.shard_range(i))
        records = list(export_fn(source, idx, {**options, "progress": progress} if b.takes_progress else options))
        expected = [source.example_id(j) for j in idx]
        by_id = dict(records)
        if len(by_id) != len(records) or set(by_id) != set(expected):
            extra = sorted(set(by_id) - set(expected))[:3]
            missing = sorted(set(expected) - set(by_id))[:3]
            raise ValueError(
                f"teacher backend {backend!r} returned {len(records)} entries for shard {i} of {out} "
                f"({len(expected)} examples); missing e.g. {missing}, unexpected e.g. {extra}"
            )
        writer.write_shard(i, [(eid, by_id[eid]) for eid in expected])
        done += len(idx)
        if progress:
            dt = time.perf_counter() - t0
            rate = done / dt if dt > 0 else float("inf")
            eta = (total - done) / rate if rate > 0 else float("inf")
            _log(
                f"export {out}: shard {i + 1}/{writer.num_shards} written ({k + 1}/{len(todo)} this run), "
                f"{done}/{total} examples, {rate:.1f} ex/s, ETA {_fmt_time(eta)}"
            )
    missing = writer.missing_shards()
    if missing:
        if progress:
            _log(f"export {out}: {len(missing)} shards still missing (other --shard workers?); manifest not written yet")
        return None
    manifest = writer.finalize()
    if progress:
        _log(
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
    p.add_argument("--data", help="data source spec: shortcut_digits | imagefolder:PATH | tinyimagenet:PATH | tfds:NAME")
    p.add_argument("--split", default="train", help="data split (default train)")
    p.add_argument("--out", help="store directory")
    p.add_argument("--data_option", action="append", default=[], metavar="KEY=VALUE", help="source option (repeatable)")
    p.add_argument("--shard_size", type=int, default=1024, help="examples per shard (default 1024)")
    p.add_argument("--shard", default="0/1", metavar="I/N", help="export only shards with index %% N == I")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    return p


def parse_args(argv: Sequence[str] | None = None) -> tuple[argparse.Namespace, dict[str, Any]]:
    """(common arguments, backend options) from the command line."""
    first, _ = _base_parser(add_help=False).parse_known_args(argv)
    p = _base_parser(add_help=True)
    if first.teacher not in BACKENDS:
        p.error(f"--teacher={first.teacher!r}: expected one of {sorted(BACKENDS)}")
    table = _resolve(get_backend(first.teacher).options)
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


def main(argv: Sequence[str] | None = None) -> int:
    args, options = parse_args(argv)
    try:
        from lfi_jax.data.sources import get_source

        data_options = parse_data_options(args.data_option)
        source = get_source(args.data, args.split, data_options)
        if not args.quiet:
            _log(f"export {args.out}: {args.teacher} teacher, {args.data}/{args.split}, {len(source)} examples")
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
    except (ValueError, FileNotFoundError, ImportError, IndexError, KeyError) as e:
        _log(f"export: error: {e}")
        return 1
    summary: dict[str, Any] = {"out": args.out, "complete": store is not None}
    if store is not None:
        m = store.manifest
        summary.update(count=m["count"], degenerate_count=m["degenerate_count"], grid=m["grid"], content_hash=m["content_hash"])
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
