"""Plain parameters out of a training checkpoint, on any machine.

    python -m lfi_jax.export_params --workdir runs/ivit --out exported/ivit
    python -m lfi_jax.export_params --workdir runs/ivit --out exported/ivit_msgpack --format msgpack

The checkpoint (whatever topology wrote it: many processes, FSDP-sharded) is restored onto
one local device against the run's own config (`WORKDIR/config.json`, or `--config`), and
the parameters are written as plain arrays:

* `safetensors` (default): `config.json` + `model.safetensors` with Hugging Face ViT names
  and torch layouts (`lfi_jax.models.convert.save_hf`). A plain ViT loads with transformers'
  `ViTForImageClassification.from_pretrained(DIR)`, an I-ViT with
  `lfi_jax.reference.IViTReference.from_pretrained(DIR)` (PyTorch) and either with
  `lfi_jax.models.convert.load_hf_vit(DIR)`.
* `msgpack`: `params.msgpack`, a flax-msgpack map from "/"-joined parameter paths
  (`encoder/layer/0/attention/query/kernel`) to arrays in this package's layouts, and
  `model_config.json` (the ModelConfig fields). `load_exported(DIR)` reads either format back.

Each directory also gets `export_info.json`: the step and the checkpoint it came from, the
class names (in class-id order; also the HF config's `id2label`) and the preprocessing the
model expects (image size, mean/std after scaling RGB to [0, 1]; for safetensors also as a
transformers `preprocessor_config.json`). The class names come from WORKDIR/run_info.json
(written by the trainer) or else from the data source itself.
Files are written atomically (temporary file, then rename).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from typing import Any

import jax
import numpy as np
from flax import nnx, serialization

from lfi_jax.cli import add_debug_flag, run_cli
from lfi_jax.config import load_config_file
from lfi_jax.fileio import atomic_write, write_json_atomic
from lfi_jax.metrics import setup_logging
from lfi_jax.models.config import ModelConfig
from lfi_jax.models.convert import load_hf_vit, save_hf
from lfi_jax.models.convert import names as convert_names
from lfi_jax.models.vit import ViT
from lfi_jax.run import RUN_INFO_FILE, load_config, load_run
from lfi_jax.tasks.registry import get_task

FORMATS = ("safetensors", "msgpack")
log = logging.getLogger("lfi_jax.export_params")


def load_run_config(workdir: str, config: str | None = None):
    """The run's ConfigDict: `config` ("configs/x.py[:arg]" or a name) if given, else
    WORKDIR/config.json (written by the trainer)."""
    if config:
        path, _, arg = config.partition(":")
        return load_config_file(path, arg or None)
    return load_config(workdir)


def restore_params(workdir: str, config=None, *, step: int | None = None):
    """(model, step): the checkpoint's parameters in a model on one local device."""
    run = load_run(workdir, step=step, devices=jax.local_devices()[:1], config=config)
    return nnx.merge(run.graphdef, run.params), run.step


def class_names(workdir: str, config) -> list[str] | None:
    """The run's class names: WORKDIR/run_info.json (written by the trainer at start), else
    the train source's own `class_names`; None (with a warning) when neither is available."""
    info_path = os.path.join(workdir, RUN_INFO_FILE)
    if os.path.exists(info_path):
        with open(info_path) as f:
            names = json.load(f).get("data", {}).get("class_names")
        if names:
            return list(names)
    try:
        names = get_task(config).source(config, config.data.train_split).class_names
    except (OSError, ValueError, KeyError) as e:
        log.warning("class names unknown (%s: %s): exporting LABEL_i names", type(e).__name__, e)
        return None
    return list(names) if names else None


def preprocessing(config) -> dict[str, Any]:
    """How the model's inputs were made: RGB in [0, 1], resized to image_size, normalised."""
    return dict(
        image_size=int(config.data.image_size),
        mean=[float(x) for x in config.data.mean],
        std=[float(x) for x in config.data.std],
        rescale_factor=1 / 255,
        channels="RGB",
    )


def hf_preprocessor_config(prep: dict[str, Any]) -> dict[str, Any]:
    """A transformers `ViTImageProcessor` config for `prep` (`AutoImageProcessor.from_pretrained`)."""
    size = prep["image_size"]
    return dict(
        image_processor_type="ViTImageProcessor",
        do_resize=True,
        size={"height": size, "width": size},
        resample=2,  # bilinear
        do_rescale=True,
        rescale_factor=prep["rescale_factor"],
        do_normalize=True,
        image_mean=prep["mean"],
        image_std=prep["std"],
    )


def flat_params(model) -> dict[str, np.ndarray]:
    """{"/"-joined path: float array} in this package's layouts."""
    return {"/".join(str(p) for p in path): np.asarray(v) for path, v in convert_names.flat_params(model).items()}


def export(
    model,
    out: str,
    *,
    fmt: str = "safetensors",
    info: dict[str, Any] | None = None,
    labels: list[str] | None = None,
    prep: dict[str, Any] | None = None,
) -> list[str]:
    """Writes `model`'s parameters to directory `out` in `fmt`; returns the files written.

    `labels` (class names, in class-id order) become the HF config's id2label; `prep` (see
    `preprocessing`) is written as a transformers preprocessor_config.json (safetensors) and,
    with the class names, into export_info.json (both formats)."""
    if fmt not in FORMATS:
        raise ValueError(f"--format={fmt!r}; expected one of {', '.join(FORMATS)}")
    if labels is not None and len(labels) != model.cfg.num_classes:
        raise ValueError(f"{len(labels)} class names for a model with {model.cfg.num_classes} classes")
    os.makedirs(out, exist_ok=True)
    info = dict(info or {})
    if labels is not None:
        info["class_names"] = list(labels)
    if prep is not None:
        info["preprocessing"] = prep
    if fmt == "safetensors":
        save_hf(model, out, id2label=dict(enumerate(labels)) if labels is not None else None)
        files = ["config.json", "model.safetensors"]
        if prep is not None:
            write_json_atomic(os.path.join(out, "preprocessor_config.json"), hf_preprocessor_config(prep), indent=2)
            files.append("preprocessor_config.json")
    else:
        blob = serialization.msgpack_serialize(flat_params(model))
        atomic_write(os.path.join(out, "params.msgpack"), blob)
        cfg = dataclasses.asdict(model.cfg)
        write_json_atomic(os.path.join(out, "model_config.json"), cfg, indent=2, sort_keys=True)
        files = ["params.msgpack", "model_config.json"]
    write_json_atomic(os.path.join(out, "export_info.json"), dict(format=fmt, **info), indent=2, sort_keys=True)
    return files + ["export_info.json"]


def load_exported(directory: str):
    """A ViT from a directory written by `export` (either format)."""
    if os.path.exists(os.path.join(directory, "params.msgpack")):
        with open(os.path.join(directory, "model_config.json")) as f:
            raw = json.load(f)
        cfg = ModelConfig(**raw)  # makes tuples of JSON lists itself
        with open(os.path.join(directory, "params.msgpack"), "rb") as f:
            flat = serialization.msgpack_restore(f.read())
        model = nnx.eval_shape(lambda: ViT(cfg, rngs=nnx.Rngs(0)))
        graphdef, abstract = nnx.split(model, nnx.Param)
        expected = {"/".join(str(p) for p in path): v for path, v in nnx.to_flat_state(abstract)}
        missing, unexpected = sorted(set(expected) - set(flat)), sorted(set(flat) - set(expected))
        bad = [k for k in expected if k in flat and tuple(flat[k].shape) != tuple(expected[k].get_value().shape)]
        if missing or unexpected or bad:
            raise ValueError(
                f"{directory}/params.msgpack does not fit model_config.json: missing {missing}, "
                f"unexpected {unexpected}, mis-shaped {bad}"
            )
        for path, v in nnx.to_flat_state(abstract):
            v.set_value(jax.numpy.asarray(flat["/".join(str(p) for p in path)]))
        return nnx.merge(graphdef, abstract)
    model, _ = load_hf_vit(directory)
    return model


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lfi_jax.export_params", description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", required=True, help="the training run's directory (holds checkpoints/)")
    ap.add_argument("--out", required=True, help="directory to write")
    ap.add_argument("--format", default="safetensors", choices=FORMATS)
    ap.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    ap.add_argument("--config", default=None, help="the run's config file[:arg] (default: WORKDIR/config.json)")
    add_debug_flag(ap)
    args = ap.parse_args(argv)

    setup_logging()
    config = load_run_config(args.workdir, args.config)
    model, step = restore_params(args.workdir, config, step=args.step)
    info = dict(step=step, checkpoint=os.path.abspath(os.path.join(args.workdir, "checkpoints", str(step))))
    labels = class_names(args.workdir, config)
    files = export(model, args.out, fmt=args.format, info=info, labels=labels, prep=preprocessing(config))
    n = sum(int(np.prod(x.shape)) for x in flat_params(model).values())
    print(f"exported step {step} ({n:,} parameters) to {args.out}: {', '.join(files)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    if "JAX_PLATFORMS" not in os.environ:
        jax.config.update("jax_platforms", "cpu")  # one device is all it needs (before any backend starts)
    run_cli(main)
