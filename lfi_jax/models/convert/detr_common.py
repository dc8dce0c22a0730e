"""What the DETR-family converters (`lfi_jax.models.convert.detr`, `.conditional_detr`,
`.detr_segm`) share: parameter shapes of an architecture, the checkpoint-vs-architecture check,
filling a model from {path: array} with fresh gates and class head, the interaction start
(Wq' = Wq) and the `interaction=` option of the loaders.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Mapping

import jax.numpy as jnp
from flax import nnx

from lfi_jax.models.convert.io import CheckpointError
from lfi_jax.models.convert.names import Path, flat_params, hf_shape
from lfi_jax.models.detr import PRETRAINED_GATE_BIAS, Gate

HEAD = "class_labels_classifier"


def slash(path: Path) -> str:
    """A parameter path as errors name it: `decoder/layers/0/encoder_attn/q_proj/kernel`."""
    return "/".join(map(str, path))


@functools.lru_cache(maxsize=32)
def model_param_shapes(model_cls: type, cfg) -> tuple[tuple[Path, tuple], ...]:
    """((our path, shape), ...) of every parameter of `model_cls(cfg)` (cached, from shapes only)."""
    abstract = nnx.eval_shape(lambda: model_cls(cfg, rngs=nnx.Rngs(0)))
    return tuple((tuple(p), tuple(v.shape)) for p, v in nnx.to_flat_state(nnx.state(abstract, nnx.Param)))


def checkpoint_tensors(shapes, name: Callable[[Path], str]) -> dict[str, tuple[Path, tuple]]:
    """{checkpoint name: (our path, checkpoint shape)} of ((path, shape), ...)."""
    return {name(p): (p, hf_shape(p, shape)) for p, shape in shapes}


def check_tensors(sd: Mapping[str, Any], expected: Mapping[str, tuple[Path, tuple]], file: str, source: str,
                  what: str) -> None:
    """A CheckpointError naming the file and listing every missing, unexpected and mis-shaped tensor."""
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    misshaped = [f"{k}: {tuple(sd[k].shape)} vs {expected[k][1]}" for k in sorted(set(sd) & set(expected))
                 if tuple(sd[k].shape) != expected[k][1]]
    if missing or unexpected or misshaped:
        lines = [f"{file}: the tensors do not match the {what} of {source}:"]
        for title, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)):
            if items:
                more = [f"... {len(items) - 20} more"] if len(items) > 20 else []
                lines.append(f"  {title} ({len(items)}):")
                lines.extend(f"    {x}" for x in items[:20] + more)
        raise CheckpointError("\n".join(lines))


def set_params(model, values: Mapping[Path, Any], what: str, *, keep: Callable[[Path], bool] = lambda p: False):
    """Every parameter of `model` (abstract or not) set from `values` (our paths) in place; a path
    without a value keeps its own where `keep(path)`, else it is an error naming it and `what`."""
    flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
    for path, var in flat:
        path = tuple(path)
        value = values.get(path)
        if value is None:
            if keep(path):
                continue
            raise ValueError(f"{what} parameters: no value for {slash(path)}")
        if tuple(value.shape) != tuple(var.shape):
            raise ValueError(f"{what} parameters: {slash(path)} has shape {tuple(value.shape)}, "
                             f"the model {tuple(var.shape)}")
        var.set_value(jnp.asarray(value, var.dtype))
    nnx.update(model, nnx.from_flat_state(flat))
    return model


def fill_model(model_cls: type, cfg, values: Mapping[Path, Any], *, seed: int, num_logits: int,
               head_bias: float, what: str):
    """A `model_cls(cfg)` whose parameters are `values` ({path: array}, our layout).

    Only the gates and the class head may be missing: they are freshly initialised (seeded by
    `seed`; the head's kernel lecun-normal [D, num_logits], its bias `head_bias`); nothing else
    is drawn at random, so no full random init runs."""
    model = nnx.eval_shape(lambda: model_cls(cfg, rngs=nnx.Rngs(seed)))
    missing = [p for p in flat_params(model) if p not in values]
    rngs, fresh = nnx.Rngs(seed), {}
    for prefix in sorted({p[: p.index("gate") + 1] for p in missing if "gate" in p}, key=str):
        gate = Gate(cfg, cfg.interaction_heads, rngs)
        fresh.update({prefix + q: v for q, v in flat_params(gate).items()})
    if any(p[0] == HEAD for p in missing):
        fresh[(HEAD, "kernel")] = nnx.initializers.lecun_normal()(
            rngs.params(), (cfg.hidden_size, num_logits), jnp.float32)
        fresh[(HEAD, "bias")] = jnp.full((num_logits,), head_bias, jnp.float32)
    return set_params(model, {**fresh, **values}, what)


def check_architecture(src_cfg, cfg, fields, who: str, detail: str = "{} vs {}") -> None:
    """A ValueError naming the first of `fields` where two configs differ (`detail` formats the two values)."""
    for f in fields:
        if getattr(src_cfg, f) != getattr(cfg, f):
            raise ValueError(f"{who}: model.{f} differs: " + detail.format(getattr(src_cfg, f), getattr(cfg, f)))


def check_run_start(directory: str, cfg, mcfg, fields, what: str) -> None:
    """A run's init from a checkpoint of config `cfg` for the model config `mcfg`: a
    CheckpointError for an interaction checkpoint or the first of `fields` that differs."""
    if cfg.interaction_queries:
        raise CheckpointError(f"{directory} holds an I-{what}; start runs from a {what} checkpoint")
    for f in fields:
        if getattr(cfg, f) != getattr(mcfg, f):
            raise CheckpointError(f"{directory}: model.{f}={getattr(mcfg, f)} in the config, "
                                  f"{getattr(cfg, f)} in the checkpoint")


def interaction_start(src: Mapping[Path, Any], shapes, source_of: Callable[[Path], Path], who: str) -> dict:
    """{path: value} of an interaction model (parameter `shapes`) from a plain one's parameters
    `src`: every shared parameter copied, each interaction query from `source_of(its path)`
    (Wq' = Wq); a class head of another size and the gates are left out (fresh)."""
    values = {}
    for path, shape in shapes:
        if path in src:
            if tuple(src[path].shape) != tuple(shape):
                if path[0] == HEAD:
                    continue  # another number of classes: the new head is freshly initialised
                raise ValueError(f"{who}: {slash(path)} has shape {tuple(src[path].shape)} vs {shape}")
            values[path] = src[path]
        elif "interaction_query" in path:
            values[path] = src[source_of(path)]
    return values


def with_interaction(model, cfg, interaction: bool | Mapping[str, Any], directory: str, what: str,
                     make: Callable[[Any, dict], Any]):
    """The loaders' `interaction=` option: False -> (model, cfg); True or a dict of switches ->
    `make(model, switches)` (the gate bias PRETRAINED_GATE_BIAS unless given) and its config."""
    if not interaction:
        return model, cfg
    if cfg.interaction_queries:
        raise ValueError(f"{directory} is already an I-{what}; pass its switches as overrides")
    extra = dict(interaction) if isinstance(interaction, Mapping) else {}
    extra.setdefault("gate_bias_init", PRETRAINED_GATE_BIAS)
    model = make(model, extra)
    return model, model.cfg


__all__ = [
    "HEAD",
    "check_architecture",
    "check_run_start",
    "check_tensors",
    "checkpoint_tensors",
    "fill_model",
    "interaction_start",
    "model_param_shapes",
    "set_params",
    "slash",
    "with_interaction",
]
