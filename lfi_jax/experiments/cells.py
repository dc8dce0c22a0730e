"""A cell's config (base config + budget + the cell's edits + --set), its identity (a workdir
named by a hash of what changes the trained model) and its shared oracle teacher store."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from typing import Any

from lfi_jax.config import ABLATIONS, CONFIG_DIR, load_config_file, set_ablation, set_key
from lfi_jax.experiments.base import Cell
from lfi_jax.run import BOOKKEEPING
from lfi_jax.teacher.resolve import build_auto_teacher, resolve_teacher, teacher_key

DEMO_CONFIG = os.path.join(CONFIG_DIR, "demo.py")

# Budgets for the demo config: dotted key -> value.
DEMO_BUDGETS: dict[str, dict[str, Any]] = {
    "small": {
        "total_steps": 300,
        "optim.warmup_steps": 30,
        "eval_every": 50,
        "log_every": 50,
        "checkpoint_every": 100,
        "data.options.num_test": 500,
    },
    "full": {},
}


def parse_config_spec(spec: str) -> tuple[str, str | None]:
    """'configs/demo.py:ivit,clean' -> ('configs/demo.py', 'ivit,clean')."""
    path, sep, arg = spec.partition(":")
    return path, (arg if sep else None)


def is_demo(path: str) -> bool:
    return os.path.splitext(os.path.basename(path))[0] == "demo"


def budget_overrides(config, budget: str, demo: bool) -> dict[str, Any]:
    """The config edits of a budget: the demo's table, else `small` divides the step counts by 10."""
    if budget not in DEMO_BUDGETS:
        raise ValueError(f"--budget={budget!r}; expected one of {sorted(DEMO_BUDGETS)}")
    if demo or budget == "full":
        return dict(DEMO_BUDGETS[budget]) if demo else {}

    def scale(v):
        return max(1, int(v) // 10) if int(v) else 0

    return {
        "total_steps": scale(config.total_steps),
        "optim.warmup_steps": scale(config.optim.warmup_steps),
        "eval_every": scale(config.eval_every),
        "checkpoint_every": scale(config.checkpoint_every),
    }


def cell_config(base_path: str, base_arg: str | None, cell: Cell, budget: dict[str, Any], sets: dict[str, Any]):
    """The base config with the budget, the cell's edits, the --set overrides and the cell's seed."""
    config = load_config_file(base_path, base_arg)
    for k, v in budget.items():
        set_key(config, k, v)
    edits = dict(cell.edits)
    ablation = edits.pop("ablation", None)
    if ablation is not None:
        set_ablation(config, ablation)
    for k, v in edits.items():
        set_key(config, k, v)
    for k, v in sets.items():
        set_key(config, k, v)
    config.seed = int(cell.seed)
    config.name = f"{os.path.splitext(os.path.basename(base_path))[0]}-{config_label(config)}"
    return config


# Keys that never change the trained model: the run's bookkeeping, and `row_edits`, because
# what it changes is in the keys it sets.
UNHASHED = (*BOOKKEEPING, "row_edits")

# Keys added after cells were first trained: at these values a config is the one it was
# before they existed, so it keeps its hash (and its finished workdir).
UNHASHED_DEFAULTS = {
    "loss.align_reduce": "per_layer",
    "loss.align_rows": "cls",
    "loss.rrr_weight": 0.0,
    "loss.rrr_threshold": 0.0,
    "mesh.cpu_devices": 0,
}


def canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, default=str)


_ANY = object()


def _drop(d: dict, dotted: str, if_equal: Any = _ANY) -> None:
    """Delete `dotted` (a.b.c) from the nested dict d where present (and equal to if_equal)."""
    *parents, key = dotted.split(".")
    for p in parents:
        d = d.get(p)
        if not isinstance(d, dict):
            return
    if key in d and (if_equal is _ANY or d[key] == if_equal):
        del d[key]


def config_hash(config) -> str:
    """A hash of everything that changes the trained model: all keys but UNHASHED, and the
    UNHASHED_DEFAULTS keys only where they differ from their default."""
    d = json.loads(config.to_json_best_effort())
    for dotted in UNHASHED:
        _drop(d, dotted)
    for dotted, default in UNHASHED_DEFAULTS.items():
        _drop(d, dotted, default)
    return hashlib.sha256(canonical(d).encode()).hexdigest()[:10]


def ablation_row(config) -> str:
    """The Table 3 row a config's model switches are (the gate counts only with IQ on)."""
    m = config.model
    iq, ic = bool(m.interaction_queries), bool(m.interaction_constraint)
    row = next((k for k, v in ABLATIONS.items() if v == (iq, ic, bool(m.gated_control) and iq)), None)
    return row or next((k for k, v in ABLATIONS.items() if v[:2] == (iq, ic)), "model")


def config_label(config) -> str:
    """A readable name of what a cell varies: model row, regime, data ratio, teacher noise."""
    row = ablation_row(config)
    if row == "ic_only" and float(config.loss.get("rrr_weight", 0.0)) and not float(config.loss.align_weight):
        row = "vit"  # an RRR row: the plain ViT reading the teacher only for the penalty
    parts = [row]
    sp = config.data.options.get("spurious_p", None)
    if sp is not None:
        parts.append(f"p{float(sp):g}")
    if float(config.data.data_ratio) != 1.0:
        parts.append(f"r{float(config.data.data_ratio):g}")
    if config.model.interaction_constraint:
        parts += [
            f"{k}{float(config.teacher.noise[k]):g}"
            for k in ("blur", "shift", "uniform")
            if float(config.teacher.noise[k])
        ]
    parts += choice_labels(config)
    parts.append(f"s{int(config.seed)}")
    return "_".join(parts)


def choice_labels(config) -> list[str]:
    """Label parts of the loss switches at non-default values (none at the defaults, so the
    names of cells trained before the switches existed do not change)."""
    lc, m = config.loss, config.model
    parts = []
    if m.interaction_constraint and float(lc.align_weight) not in (0.0, 1.0):
        parts.append(f"w{float(lc.align_weight):g}")
    if m.interaction_queries and m.get("gate_bias_init", None) is not None:
        parts.append("gate" + ",".join(f"{float(b):g}" for b in m.gate_bias_init))
    aug = config.data.augment
    if not aug.random_resized_crop and not aug.hflip:
        parts.append("noaug")
    if float(lc.get("rrr_weight", 0.0)):
        parts.append(f"rrr{float(lc.rrr_weight):g}")
    if lc.get("align_reduce", "per_layer") != "per_layer":
        parts.append("layermean")
    if lc.get("align_rows", "cls") != "cls":
        parts.append("objrows")
    return parts


def cell_dirname(config) -> str:
    """Determined by the config alone, so experiments share identical cells."""
    return f"{config_label(config)}-{config_hash(config)}"


def ensure_teacher(config, root: str, log: Callable[[str], None], store_dir: str | None = None) -> None:
    """Points an automatic-teacher cell with IC on at its store, built on first use: by default
    ROOT/teachers/<hash of the data, grid and noise>, shared by every cell with the same ones
    (`lfi_jax.teacher.resolve`); or `store_dir` where the caller names the store itself."""
    if not config.model.interaction_constraint or config.teacher.store or not config.teacher.auto:
        return
    if store_dir is None:
        store_dir = resolve_teacher(config, cache_root=os.path.join(root, "teachers"), log_fn=log).store
    else:
        build = config.copy_and_resolve_references()
        build.seed = teacher_key(config)["seed"]  # as the shared stores: noise-free maps do not depend on the seed
        build_auto_teacher(build, store_dir, log_fn=log)
    config.teacher.store = store_dir
    config.teacher.auto = ""
