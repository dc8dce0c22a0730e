"""Config helpers: the defaults every experiment starts from, overrides, and start-up checks.

Experiment files in `configs/` build on `base_config()` and override what they change; the
command line overrides with `--config.a.b=value` (`lfi_jax.cli.add_config_flags`), through
`set_key`, which refuses a key that does not exist (naming the nearest valid keys) and coerces
the text to the existing value's type. `validate(config)` runs once at start and names any bad key.

Override values are Python literals (`1`, `0.5`, `True`, `'x'`), or else taken as a string.
Tuples: `--config.data.eval_splits="('val',)"` (a literal; mind the shell quotes) or the comma
form `--config.data.eval_splits=val,test`; a single value for a tuple key becomes a one-element
tuple (`--config.data.eval_splits=val`), and an empty value the empty tuple. Booleans also accept
true/false/yes/no/on/off/1/0. New keys are accepted only under `data.options` (the data
source checks its own options).
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import os
from typing import Any

import ml_collections

from lfi_jax.errors import ConfigKeyError, UserError
from lfi_jax.models.config import VARIANTS, model_config, model_fields

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")

# Compute dtype of the paper's configs (configs/tinyimagenet.py, pacs.py, vlcs.py): bfloat16 with
# float32 parameters, the accelerators' fast path; their `runlocal` smoke tests
# (and CPU runs via --config.model.dtype=float32) compute in float32. A documented default rather
# than a backend-dependent "auto": a run's config.json states the numerics it trained with.
PAPER_DTYPE = "bfloat16"

_TRUE = ("true", "yes", "on", "1")
_FALSE = ("false", "no", "off", "0")


# --------------------------------------------------------------------------- overrides


def parse_value(text: str) -> Any:
    """A command-line value: a Python literal (1, 0.5, (1, 2), True, 'x') or else the string."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return text


def parse_tuple(text: str) -> tuple:
    """A tuple override: a literal ("('val',)", "(0.5, 1.0)") or the comma form ("val,test")."""
    value = parse_value(text)
    if isinstance(value, (tuple, list)):
        return tuple(value)
    if isinstance(value, str):
        return tuple(parse_value(t.strip()) for t in value.split(",") if t.strip())
    return (value,)


def config_keys(config, prefix: str = "") -> list[str]:
    """Every dotted key of `config`, inner nodes included ("data", "data.source", ...)."""
    out = []
    for k in config.keys():
        dotted = f"{prefix}{k}"
        out.append(dotted)
        v = config[k]
        if isinstance(v, ml_collections.ConfigDict):
            out.extend(config_keys(v, dotted + "."))
    return out


def nearest_keys(config, dotted: str, n: int = 3) -> list[str]:
    """The valid keys nearest to an unknown `dotted` key: the same leaf name elsewhere, its
    initials ("learning_rate" -> "lr"), similar spellings, else the closest keys under the
    deepest parent that exists."""
    parts = dotted.split(".")
    ancestors = {".".join(parts[:i]) for i in range(1, len(parts))}
    keys = [k for k in config_keys(config) if k not in ancestors and k != dotted]
    leaf = parts[-1]
    initials = "".join(w[0] for w in leaf.split("_") if w)

    def leaf_of(k: str) -> str:
        return k.rsplit(".", 1)[-1]

    out = [k for k in keys if leaf_of(k) == leaf]
    if len(initials) > 1:
        out += [k for k in keys if leaf_of(k) == initials]
    out += difflib.get_close_matches(dotted, keys, n=n, cutoff=0.6)
    if len(out) < n:
        parent = ""
        for p in parts[:-1]:
            if not any(k.startswith(f"{parent}{p}.") for k in keys):
                break
            parent = f"{parent}{p}."
        siblings = [k for k in keys if k.startswith(parent) and "." not in k[len(parent) :]]
        out += difflib.get_close_matches(dotted, siblings, n=n, cutoff=0.0)
    return list(dict.fromkeys(out))[:n]


def unknown_key_error(config, dotted: str, context: str = "") -> ConfigKeyError:
    near = nearest_keys(config, dotted)
    hint = f"; nearest valid keys: {', '.join(near)}" if near else ""
    return ConfigKeyError(f"unknown config key {dotted!r}{context}{hint}")


def _coerce(old: Any, value: Any, dotted: str) -> Any:
    """`value` (often the override's text) as the type of the key's current value `old`."""

    def fail(expected: str) -> UserError:
        return UserError(f"config key {dotted!r}: cannot set {value!r} (expected {expected}, like the current {old!r})")

    if isinstance(old, tuple) and isinstance(value, str):
        return parse_tuple(value)
    if isinstance(old, bool):
        if isinstance(value, str):
            if value.strip().lower() in _TRUE:
                return True
            if value.strip().lower() in _FALSE:
                return False
            raise fail("a boolean")
        if isinstance(value, bool) or (isinstance(value, (int, float)) and value in (0, 1)):
            return bool(value)
        raise fail("a boolean")
    if isinstance(value, str) and not isinstance(old, str):
        value = parse_value(value)
    if isinstance(old, int) and not isinstance(value, bool):
        if isinstance(value, (int, float)) and float(value).is_integer():
            return int(value)
        raise fail("an integer")
    if isinstance(old, float) and not isinstance(value, bool):
        if isinstance(value, (int, float)):
            return float(value)
        try:
            return float(value)  # "inf", "nan"
        except (TypeError, ValueError):
            raise fail("a number") from None
    if isinstance(old, tuple) and isinstance(value, list):
        return tuple(value)
    if isinstance(old, tuple) and not isinstance(value, tuple):
        return (value,)
    if isinstance(old, ml_collections.ConfigDict) and isinstance(value, dict):
        return ml_collections.ConfigDict(value)
    return value


def set_key(config, dotted: str, value: Any) -> None:
    """config[a][b] = value for dotted "a.b", coerced to the existing value's type.

    An unknown key is a `ConfigKeyError` (a KeyError) naming it and the nearest valid keys; a
    value of the wrong type is a `UserError` naming the key. New keys are allowed only under
    `data.options` (source options are the source's business; it rejects unknown ones itself).
    """
    node = config
    *parents, leaf = dotted.split(".")
    for i, p in enumerate(parents):
        if not isinstance(node, ml_collections.ConfigDict) or p not in node:
            raise unknown_key_error(config, dotted, f" ({'.'.join(parents[: i + 1])!r} does not exist)")
        node = node[p]
    if not isinstance(node, ml_collections.ConfigDict):
        raise unknown_key_error(config, dotted, f" ({'.'.join(parents)!r} is not a group of keys)")
    if leaf not in node:
        if parents != ["data", "options"]:
            raise unknown_key_error(config, dotted)
        node[leaf] = parse_value(value) if isinstance(value, str) else value
        return
    value = _coerce(node[leaf], value, dotted)
    try:
        node[leaf] = value
    except (TypeError, ValueError) as e:
        raise UserError(f"config key {dotted!r}: cannot set {value!r} ({e})") from None


def split_config_spec(spec: str) -> tuple[str, str | None]:
    """"configs/demo.py:ivit,runlocal" -> ("configs/demo.py", "ivit,runlocal"); "demo:vit" ->
    ("demo", "vit"); no ":" -> (spec, None)."""
    if ".py:" in spec:
        path, _, arg = spec.partition(".py:")
        return path + ".py", arg
    if ":" in spec and not spec.endswith(".py"):
        name, _, arg = spec.partition(":")
        return name, arg
    return spec, None


def load_config_module(path: str):
    """The module of the config file at `path` (for config files that share code: configs/vlcs.py
    builds on configs/pacs.py); one that does not import is a UserError naming the file."""
    spec = importlib.util.spec_from_file_location(f"lfi_config_{os.path.basename(path)[:-3]}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        raise UserError(f"config file {path} does not load: {type(e).__name__}: {e}") from e
    return module


def load_config_file(name_or_path: str, arg: str | None = None) -> ml_collections.ConfigDict:
    """`get_config(arg)` of `configs/<name>.py` (or of a path to a config file).

    A file that does not exist, does not import, has no `get_config`, or refuses `arg` is a
    `UserError` (FileNotFoundError for a missing file) naming the file and the argument.
    """
    path = name_or_path if name_or_path.endswith(".py") else os.path.join(CONFIG_DIR, f"{name_or_path}.py")
    if not os.path.exists(path) and not os.path.isabs(path):
        bundled = os.path.join(CONFIG_DIR, os.path.relpath(path, "configs"))
        if path.startswith("configs" + os.sep) and os.path.exists(bundled):
            path = bundled
    if not os.path.isfile(path):
        known = sorted(f[:-3] for f in os.listdir(CONFIG_DIR) if f.endswith(".py")) if os.path.isdir(CONFIG_DIR) else []
        hint = f" (bundled configs: {', '.join(known)})" if known else ""
        raise FileNotFoundError(f"config file not found: {path}{hint}")
    module = load_config_module(path)
    if not callable(getattr(module, "get_config", None)):
        raise UserError(f"config file {path} defines no get_config()")
    where = f"{path}:{arg}" if arg is not None else path
    try:
        return module.get_config(arg) if arg is not None else module.get_config()
    except (UserError, ValueError, KeyError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        raise UserError(f"config {where}: {msg}") from e
    except TypeError as e:
        raise UserError(f"config {where}: get_config refused the argument: {e}") from e


# --------------------------------------------------------------------------- defaults


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.name = "train"  # shown in progress lines
    c.task = "classification"  # the lfi_jax.tasks Task the trainer runs (lfi_jax.tasks.registry)
    c.seed = 0
    c.total_steps = 1000
    c.batch_size = 128  # global batch size (all processes)
    c.log_every = 50
    c.eval_every = 0  # 0 = evaluate only at the end
    c.eval_batch_size = 256
    c.checkpoint_every = 0  # 0 = only at the end (and on SIGTERM)
    c.keep_checkpoints = 2
    c.async_checkpointing = True

    c.model = ml_collections.ConfigDict(model_fields("S/16"))
    # Model initialisation: "" = from scratch, or a Hugging Face ViT directory / timm file.
    c.init = ml_collections.ConfigDict(dict(hf="", timm=""))

    c.data = ml_collections.ConfigDict()
    c.data.source = "shortcut_digits"
    c.data.train_split = "train"
    c.data.eval_splits = ("test_iid", "test_shifted")
    c.data.image_size = 48
    c.data.data_ratio = 1.0
    c.data.options = ml_collections.ConfigDict()
    c.data.augment = ml_collections.ConfigDict(
        dict(random_resized_crop=True, crop_scale=(0.5, 1.0), crop_ratio=(0.75, 4 / 3), hflip=False)
    )
    c.data.mean = (0.5, 0.5, 0.5)
    c.data.std = (0.5, 0.5, 0.5)
    c.data.num_workers = 0  # grain worker processes (0 = threads in this process)
    c.data.num_threads = 2  # in-process prefetch threads
    c.data.prefetch = 4  # batches buffered ahead
    # Nice value added to the threads that build train batches (0 = same priority as XLA's;
    # lfi_jax/data/priority.py): on a small CPU host they then take the cores between ops.
    c.data.thread_nice = 0
    # Decoded images kept in memory per split, in MB (0 = none; lfi_jax/data/cache.py): the
    # embedded benchmark renders each image once instead of once per epoch and evaluation.
    c.data.cache_mb = 0

    c.teacher = ml_collections.ConfigDict()
    c.teacher.store = ""  # path to a TeacherStore for the train split; "" = none
    c.teacher.allow_missing = False
    # If set ("oracle"), and teacher.store is empty, the trainer builds an oracle store for
    # the train split under WORKDIR/teacher first (the embedded benchmark's teacher).
    c.teacher.auto = ""
    c.teacher.grid = 7
    c.teacher.noise = ml_collections.ConfigDict(dict(blur=0.0, shift=0.0, uniform=0.0))

    c.loss = ml_collections.ConfigDict(
        dict(align_weight=1.0, align_direction="teacher_student", align_eps=1e-6, label_smoothing=0.0)
    )
    # Choices of the alignment loss (lfi_jax.losses): "per_layer" (SPEC: KL of each layer's
    # map, averaged) | "layer_mean" (KL of the layer-averaged map); "cls" (SPEC: the CLS row) |
    # "cls_and_object" (also the rows of the patch queries covering the object).
    c.loss.align_reduce = "per_layer"
    c.loss.align_rows = "cls"
    # "Right for the right reasons" (Ross et al., 2017): weight of the squared input gradients
    # of the summed log-probabilities outside the teacher's mask (0 = off); a cell is outside
    # where its map value is <= rrr_threshold * the map's largest value. The teacher maps are
    # read only with model.interaction_constraint on (for the plain ViT: with align_weight=0).
    c.loss.rrr_weight = 0.0
    c.loss.rrr_threshold = 0.0

    c.optim = ml_collections.ConfigDict()
    c.optim.lr = 1e-3
    c.optim.warmup_steps = 100
    c.optim.schedule = "cosine"  # cosine | constant | step
    # schedule="step" (DETR's lr drop): after the warm-up, lr = lr * drop_factor ** (number of
    # drop_steps already passed); drop_steps are global step numbers, increasing.
    c.optim.drop_steps = ()
    c.optim.drop_factor = 0.1
    c.optim.min_lr_ratio = 0.0
    c.optim.weight_decay = 0.05
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999
    c.optim.grad_clip_norm = 1.0  # 0 = off
    c.optim.grad_accum_steps = 1
    # Regexes over "/"-joined parameter paths. Matching `freeze` (and not `trainable`) are
    # not updated. The paper's setting: freeze everything but interaction queries, gates, head.
    c.optim.freeze = ()
    c.optim.trainable = ()

    c.mesh = ml_collections.ConfigDict()
    c.mesh.axes = ("data", "fsdp")
    c.mesh.shape = (-1, 1)  # -1: all remaining devices
    c.mesh.fsdp_min_size = 2**16  # parameters smaller than this stay replicated
    # XLA devices to split a CPU host into before the mesh is built (0 = JAX's default, one);
    # the mesh's -1 then spans them (lfi_jax.sharding.request_cpu_devices). GPU/TPU: no effect.
    c.mesh.cpu_devices = 0

    c.distributed = ml_collections.ConfigDict(
        dict(
            mode="",  # "" = explicit if an address is given, else auto-detect (TPU VM, SLURM, OpenMPI); "auto" | "off"
            coordinator_address="",
            coordinator_bind_address="",  # "" = the coordinator address
            num_processes=0,
            process_id=-1,
            initialization_timeout=300,
            heartbeat_timeout=60,
            shutdown_timeout=300,
        )
    )
    return c


def task_name(config) -> str:
    """`config.task`, "classification" where the key is absent (configs written before it)."""
    return str(config.get("task", "classification") or "classification")


def validate(config: ml_collections.ConfigDict) -> None:
    """Checks made once at start; each error names the config key.

    The ViT checks (`model_config`, model vs data image size, `teacher.auto`) apply to the
    classification task; another task's model config is checked by its `Task.model_config`.
    """
    for key in ("total_steps", "batch_size", "eval_batch_size"):
        if int(config[key]) <= 0:
            raise UserError(f"config.{key}={config[key]} must be > 0")
    for key in ("log_every", "eval_every", "checkpoint_every"):
        if int(config[key]) < 0:
            raise UserError(f"config.{key}={config[key]} must be >= 0")
    if config.optim.grad_accum_steps < 1:
        raise UserError(f"config.optim.grad_accum_steps={config.optim.grad_accum_steps} must be >= 1")
    if config.batch_size % config.optim.grad_accum_steps:
        raise UserError(
            f"config.batch_size={config.batch_size} is not divisible by "
            f"config.optim.grad_accum_steps={config.optim.grad_accum_steps}"
        )
    if config.optim.schedule not in ("cosine", "constant", "step"):
        raise UserError(f"config.optim.schedule={config.optim.schedule!r}; expected cosine, constant or step")
    drops = tuple(int(x) for x in config.optim.get("drop_steps", ()) or ())
    if config.optim.schedule == "step" and (not drops or list(drops) != sorted(set(drops)) or drops[0] <= 0):
        raise UserError(
            f"config.optim.drop_steps={drops}: schedule='step' needs one or more increasing step numbers > 0"
        )
    if len(config.mesh.axes) != len(config.mesh.shape):
        raise UserError(
            f"config.mesh.axes {config.mesh.axes} and config.mesh.shape {config.mesh.shape} differ in length"
        )
    if config.model.get("interaction_constraint", False) and not (config.teacher.store or config.teacher.auto):
        raise UserError(
            "config.model.interaction_constraint is on but no teacher is configured: "
            "set config.teacher.store (or config.teacher.auto='oracle')"
        )
    if task_name(config) != "classification":
        return
    mcfg = model_config(config)
    if mcfg.image_size != config.data.image_size:
        raise UserError(
            f"config.model.image_size={mcfg.image_size} differs from config.data.image_size={config.data.image_size}"
        )
    if config.teacher.auto not in ("", "oracle"):
        raise UserError(f"config.teacher.auto={config.teacher.auto!r}; expected '' or 'oracle'")
    lc = config.loss
    for key, allowed in (("align_reduce", ("per_layer", "layer_mean")), ("align_rows", ("cls", "cls_and_object"))):
        if lc.get(key, allowed[0]) not in allowed:
            raise UserError(f"config.loss.{key}={lc[key]!r}; expected one of {allowed}")
    if float(lc.get("rrr_weight", 0.0)) < 0:
        raise UserError(f"config.loss.rrr_weight={lc.rrr_weight} must be >= 0")
    if float(lc.get("rrr_weight", 0.0)) > 0 and not config.model.get("interaction_constraint", False):
        raise UserError(
            f"config.loss.rrr_weight={lc.rrr_weight} reads the teacher maps, which are read only with "
            "config.model.interaction_constraint on: for the plain ViT with the penalty set "
            "interaction_constraint=True and loss.align_weight=0 (the maps then only feed the penalty)"
        )


# ---- shared by the experiment files in configs/ ----

# Table 3 rows: (interaction_queries, interaction_constraint, gated_control)
ABLATIONS = {
    "vit": (False, False, False),  # row 1: the plain ViT
    "iq_gc": (True, False, True),  # row 2: extra queries + gate, no teacher
    "ic_only": (False, True, False),  # row 3: teacher supervises the original queries
    "iq_ic": (True, True, False),  # row 4: no gated control (C_f = mean)
    "ivit": (True, True, True),  # row 5: the full I-ViT
}


def parse_arg(arg: str, known: dict[str, tuple[str, ...]]) -> dict[str, str]:
    """'ivit,hard' -> {"model": "ivit", "regime": "hard"}; each token must be known."""
    out = {}
    for token in [t for t in (arg or "").split(",") if t]:
        for slot, values in known.items():
            if token in values:
                out[slot] = token
                break
        else:
            choices = "; ".join(f"{k}: {'|'.join(v)}" for k, v in known.items())
            raise ValueError(f"unknown config argument {token!r} (choices: {choices})")
    return out


def set_ablation(config, name: str) -> None:
    """The model flags of Table 3 row `name`, then the config's own settings for that row:
    `config.row_edits.<name>`, a tuple of (dotted key, value) pairs (configs/demo.py gives the
    ViT its own learning rate), so a row gets them whether it comes from the config file's
    argument or from the experiment runner's cells."""
    iq, ic, gc = ABLATIONS[name]
    config.model.interaction_queries = iq
    config.model.interaction_constraint = ic
    config.model.gated_control = gc
    row_edits = config.get("row_edits", None)
    for key, value in (row_edits.get(name, ()) if row_edits else ()):
        set_key(config, key, value)


# The paper's frozen setting (section 5.1.2): the pretrained transformer layers frozen, only the
# interaction queries, gates and head trained. Regexes over "/"-joined parameter paths.
PAPER_FREEZE = (".*",)
PAPER_TRAINABLE = (r".*interaction_query.*", r".*/gate/.*", r"^classifier/.*")
# The original query projections (W_q and its bias) of every layer: the weights the teacher
# supervises in Table 3's `ic_only` row, which has no interaction queries of its own.
ORIGINAL_QUERIES = r"^encoder/layer/\d+/attention/query/"


def paper_trainable(model: str) -> tuple[str, ...]:
    """The trainable patterns of the frozen setting for Table 3 row `model`.

    `ic_only` ("IC on the original queries") also trains the original queries: frozen, the
    alignment loss would reach no trainable weight and the row would equal the ViT row (only
    the head trains). The other rows train what PAPER_TRAINABLE names.
    """
    return PAPER_TRAINABLE + ((ORIGINAL_QUERIES,) if model == "ic_only" else ())


def set_paper_init(config, model: str, *, scratch: bool, scratch_lr: float, scratch_warmup: int) -> None:
    """From a pretrained ViT with the frozen setting for row `model` (the paper's setting; the
    checkpoint path is a placeholder to override), or from scratch with every weight trained."""
    if scratch:
        config.optim.lr = scratch_lr
        config.optim.warmup_steps = scratch_warmup
        return
    config.init.hf = "/path/to/vit-checkpoint"  # a Hugging Face ViT directory (local path)
    config.optim.freeze = PAPER_FREEZE
    config.optim.trainable = paper_trainable(model)


__all__ = [
    "ABLATIONS",
    "CONFIG_DIR",
    "ORIGINAL_QUERIES",
    "PAPER_DTYPE",
    "PAPER_FREEZE",
    "PAPER_TRAINABLE",
    "VARIANTS",
    "base_config",
    "load_config_file",
    "load_config_module",
    "model_config",
    "model_fields",
    "paper_trainable",
    "parse_arg",
    "parse_tuple",
    "parse_value",
    "set_ablation",
    "set_key",
    "set_paper_init",
    "split_config_spec",
    "task_name",
    "validate",
]
