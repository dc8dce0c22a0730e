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

Each directory also gets `export_info.json` (the step and the checkpoint it came from).
Files are written atomically (temporary file, then rename).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from typing import Any

import numpy as np

from lfi_jax.fileio import atomic_write, write_json_atomic

FORMATS = ("safetensors", "msgpack")


def load_run_config(workdir: str, config: str | None = None):
    """The run's ConfigDict: `config` ("configs/x.py[:arg]" or a name) if given, else
    WORKDIR/config.json (written by the trainer)."""
    import ml_collections

    from lfi_jax.config import load_config_file

    if config:
        path, _, arg = config.partition(":")
        return load_config_file(path, arg or None)
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: pass --config=configs/<name>.py[:arg] (the run's config)")
    with open(path) as f:
        try:
            raw = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
    return ml_collections.ConfigDict(raw)


def restore_params(workdir: str, config=None, *, step: int | None = None):
    """(model, step): the checkpoint's parameters in a ViT on one local device."""
    import jax
    from flax import nnx

    from lfi_jax import sharding as shd
    from lfi_jax.checkpoint import Checkpointer
    from lfi_jax.config import model_config
    from lfi_jax.train import create_trainer

    config = load_run_config(workdir) if config is None else config
    mcfg = model_config(config)
    ckpt_dir = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(ckpt_dir):
        raise FileNotFoundError(f"no checkpoints in {workdir} ({ckpt_dir} does not exist)")
    mesh_cfg = type(config.mesh)(dict(axes=("data", "fsdp"), shape=(1, 1), fsdp_min_size=2**62))
    mesh = shd.make_mesh(mesh_cfg, devices=jax.local_devices()[:1])
    trainer, _, shapes = create_trainer(config, mcfg, mesh, seed=int(config.seed))
    ckpt = Checkpointer(ckpt_dir, async_save=False)
    try:
        if step is not None and step not in ckpt.manager.all_steps():
            raise FileNotFoundError(f"no checkpoint of step {step} in {ckpt_dir} (have {sorted(ckpt.manager.all_steps())})")
        step, state = ckpt.restore(trainer.abstract_state(shapes), step=step)
    finally:
        ckpt.close()
    return nnx.merge(trainer.graphdef, state["params"]), int(step)


def flat_params(model) -> dict[str, np.ndarray]:
    """{"/"-joined path: float array} in this package's layouts."""
    from flax import nnx

    return {
        "/".join(str(p) for p in path): np.asarray(v.get_value())
        for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))
    }


def export(model, out: str, *, fmt: str = "safetensors", info: dict[str, Any] | None = None) -> list[str]:
    """Writes `model`'s parameters to directory `out` in `fmt`; returns the files written."""
    if fmt not in FORMATS:
        raise ValueError(f"--format={fmt!r}; expected one of {', '.join(FORMATS)}")
    os.makedirs(out, exist_ok=True)
    if fmt == "safetensors":
        from lfi_jax.models.convert import save_hf

        save_hf(model, out)
        files = ["config.json", "model.safetensors"]
    else:
        from flax import serialization

        blob = serialization.msgpack_serialize(flat_params(model))
        atomic_write(os.path.join(out, "params.msgpack"), blob)
        cfg = dataclasses.asdict(model.cfg)
        write_json_atomic(os.path.join(out, "model_config.json"), cfg, indent=2, sort_keys=True)
        files = ["params.msgpack", "model_config.json"]
    write_json_atomic(os.path.join(out, "export_info.json"), dict(format=fmt, **(info or {})), indent=2, sort_keys=True)
    return files + ["export_info.json"]


def load_exported(directory: str):
    """A ViT from a directory written by `export` (either format)."""
    if os.path.exists(os.path.join(directory, "params.msgpack")):
        import jax
        from flax import nnx, serialization

        from lfi_jax.models.vit import ModelConfig, ViT

        with open(os.path.join(directory, "model_config.json")) as f:
            raw = json.load(f)
        for key in ("gate_bias_init", "align_layers"):
            if raw.get(key) is not None:
                raw[key] = tuple(raw[key])
        cfg = ModelConfig(**raw)
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
    from lfi_jax.models.convert import load_hf_vit

    model, _ = load_hf_vit(directory)
    return model


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lfi_jax.export_params", description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", required=True, help="the training run's directory (holds checkpoints/)")
    ap.add_argument("--out", required=True, help="directory to write")
    ap.add_argument("--format", default="safetensors", choices=FORMATS)
    ap.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    ap.add_argument("--config", default=None, help="the run's config file[:arg] (default: WORKDIR/config.json)")
    args = ap.parse_args(argv)

    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # one device is all it needs
    from lfi_jax.metrics import setup_logging

    setup_logging()
    config = load_run_config(args.workdir, args.config)
    model, step = restore_params(args.workdir, config, step=args.step)
    info = dict(step=step, checkpoint=os.path.abspath(os.path.join(args.workdir, "checkpoints", str(step))))
    files = export(model, args.out, fmt=args.format, info=info)
    n = sum(int(np.prod(x.shape)) for x in flat_params(model).values())
    print(f"exported step {step} ({n:,} parameters) to {args.out}: {', '.join(files)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
