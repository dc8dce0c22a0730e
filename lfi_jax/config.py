"""Config helpers: the defaults every experiment starts from, and typed, validated views.

Experiment files in `configs/` build on `base_config()` and override what they change; the
command line overrides with `--config.a.b=value` (ml_collections config_flags), and a key that
does not exist is an error. `validate(config)` runs once at start and names any bad key.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from typing import Any

import ml_collections

from lfi_jax.models.vit import VARIANTS, ModelConfig, variant


def model_fields(name: str, **overrides: Any) -> dict[str, Any]:
    """All ModelConfig fields of a named variant ("S/16"), as a plain dict for a ConfigDict."""
    cfg = variant(name, **overrides)
    d = dataclasses.asdict(cfg)
    d["gate_bias_init"] = tuple(d["gate_bias_init"])
    return d


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.name = "train"  # shown in progress lines
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

    c.optim = ml_collections.ConfigDict()
    c.optim.lr = 1e-3
    c.optim.warmup_steps = 100
    c.optim.schedule = "cosine"  # cosine | constant
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


PAPER_FREEZE = (".*",)
PAPER_TRAINABLE = (r".*interaction_query.*", r".*/gate/.*", r"^classifier/.*")


CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def load_config_file(name_or_path: str, arg: str | None = None) -> ml_collections.ConfigDict:
    """`get_config(arg)` of `configs/<name>.py` (or of a path to a config file)."""
    path = name_or_path if name_or_path.endswith(".py") else os.path.join(CONFIG_DIR, f"{name_or_path}.py")
    if not os.path.exists(path):
        raise FileNotFoundError(f"config file not found: {path}")
    spec = importlib.util.spec_from_file_location(f"lfi_config_{os.path.basename(path)[:-3]}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg) if arg is not None else module.get_config()


def model_config(config: ml_collections.ConfigDict) -> ModelConfig:
    """The typed ModelConfig of `config.model`; unknown keys are errors naming the key."""
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    raw = config.model.to_dict()
    unknown = sorted(set(raw) - fields)
    if unknown:
        raise ValueError(f"unknown config keys: {', '.join('model.' + k for k in unknown)}")
    for key in ("gate_bias_init",):
        raw[key] = tuple(raw[key])
    if raw.get("align_layers") is not None:
        raw["align_layers"] = tuple(raw["align_layers"])
    return ModelConfig(**raw)


def validate(config: ml_collections.ConfigDict) -> None:
    """Checks made once at start; each error names the config key."""
    for key in ("total_steps", "batch_size", "eval_batch_size"):
        if int(config[key]) <= 0:
            raise ValueError(f"config.{key}={config[key]} must be > 0")
    for key in ("log_every", "eval_every", "checkpoint_every"):
        if int(config[key]) < 0:
            raise ValueError(f"config.{key}={config[key]} must be >= 0")
    if config.optim.grad_accum_steps < 1:
        raise ValueError(f"config.optim.grad_accum_steps={config.optim.grad_accum_steps} must be >= 1")
    if config.batch_size % config.optim.grad_accum_steps:
        raise ValueError(
            f"config.batch_size={config.batch_size} is not divisible by "
            f"config.optim.grad_accum_steps={config.optim.grad_accum_steps}"
        )
    if config.optim.schedule not in ("cosine", "constant"):
        raise ValueError(f"config.optim.schedule={config.optim.schedule!r}; expected cosine or constant")
    mcfg = model_config(config)
    if mcfg.image_size != config.data.image_size:
        raise ValueError(
            f"config.model.image_size={mcfg.image_size} differs from config.data.image_size={config.data.image_size}"
        )
    if len(config.mesh.axes) != len(config.mesh.shape):
        raise ValueError(f"config.mesh.axes {config.mesh.axes} and config.mesh.shape {config.mesh.shape} differ in length")
    if mcfg.interaction_constraint and not (config.teacher.store or config.teacher.auto):
        raise ValueError(
            "config.model.interaction_constraint is on but no teacher is configured: "
            "set config.teacher.store (or config.teacher.auto='oracle')"
        )
    if config.teacher.auto not in ("", "oracle"):
        raise ValueError(f"config.teacher.auto={config.teacher.auto!r}; expected '' or 'oracle'")


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
    iq, ic, gc = ABLATIONS[name]
    config.model.interaction_queries = iq
    config.model.interaction_constraint = ic
    config.model.gated_control = gc


__all__ = ["ABLATIONS", "load_config_file", "parse_arg", "set_ablation", "PAPER_FREEZE", "PAPER_TRAINABLE", "VARIANTS", "base_config", "model_config", "model_fields", "validate"]


def parse_value(text: str) -> Any:
    """A command-line value: a Python literal (1, 0.5, (1, 2), True, 'x') or else the string."""
    import ast

    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def set_key(config, dotted: str, value: Any) -> None:
    """config[a][b] = value for dotted "a.b"; an unknown key is an error naming it.

    New keys are allowed only under `data.options` (source options are the source's business;
    it rejects unknown ones itself). The value is coerced to the existing value's type.
    """
    node = config
    *parents, leaf = dotted.split(".")
    for i, p in enumerate(parents):
        if p not in node:
            raise KeyError(f"unknown config key {'.'.join(parents[: i + 1])!r} (in override {dotted}={value!r})")
        node = node[p]
    if leaf not in node:
        if parents != ["data", "options"]:
            raise KeyError(f"unknown config key {dotted!r}")
        node[leaf] = parse_value(value) if isinstance(value, str) else value
        return
    old = node[leaf]
    if isinstance(value, str) and not isinstance(old, str):
        value = parse_value(value)
    if isinstance(old, bool):
        value = bool(value)
    elif isinstance(old, int) and not isinstance(value, bool) and isinstance(value, (int, float)) and float(value).is_integer():
        value = int(value)
    elif isinstance(old, float) and isinstance(value, (int, float)):
        value = float(value)
    elif isinstance(old, tuple) and isinstance(value, list):
        value = tuple(value)
    try:
        node[leaf] = value
    except TypeError as e:
        raise TypeError(f"config key {dotted!r}: cannot set {value!r} ({e})") from None
