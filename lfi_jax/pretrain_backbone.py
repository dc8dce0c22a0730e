"""Pretrain a detection config's ResNet backbone on ground-truth crops, for `init.backbone`.

    python -m lfi_jax.pretrain_backbone --config=configs/detection_demo.py:detr --out=runs/bb.safetensors

DETR starts from an ImageNet backbone. No such backbone exists offline at the detection demo's
size, and a tiny DETR trained entirely from scratch learns where the digits are long before it
learns which digits they are (docs/detection.md, "Why the from-scratch recipe did not learn").
This is the demo's stand-in for ImageNet pretraining: every ground-truth box of the config's
train split is cropped with a 20 % margin (a square of 1.2 x the longer side + 2 px, clipped to
the image), resized to 32 x 32 and normalised with the detection pipeline's mean and std; the
config's `model.backbone` + global average pooling + a linear layer over `model.num_classes`
is trained on the crops (AdamW, weight decay 1e-4, batches drawn with replacement) and scored
on the crops of the first eval split. Only train-split boxes train it. The backbone's tensors are
written atomically as a safetensors file in transformers' DETR names, which
`lfi_jax.tasks.detection.load_backbone` reads (`config.init.backbone`).

Settings: `config.backbone_pretrain.{steps, batch_size, lr}` (the demo's 1500 / 64 / 1e-3).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np

CROP = 32
MARGIN = 1.2


class PretrainResult(NamedTuple):
    path: str
    val_accuracy: float
    train_crops: int
    val_crops: int
    seconds: float


def box_crops(source, mean, std) -> tuple[np.ndarray, np.ndarray]:
    """(crops [N, 32, 32, 3] float32 normalised, labels [N] int32) of every box of `source`
    (boxes in the sources' (y0, x0, y1, x1) pixel convention)."""
    import jax

    xs, ys = [], []
    for i in range(len(source)):
        ex = source[i]
        image = ex["image"].astype(np.float32) / 255.0
        h, w = image.shape[:2]
        for (y0, x0, y1, x1), label in zip(ex["boxes"], ex["labels"]):
            cy, cx, s = (y0 + y1) / 2, (x0 + x1) / 2, max(y1 - y0, x1 - x0) * MARGIN + 2
            ya, xa = int(max(cy - s / 2, 0)), int(max(cx - s / 2, 0))
            yb, xb = int(min(cy + s / 2, h)), int(min(cx + s / 2, w))
            xs.append(np.asarray(jax.image.resize(image[ya:yb, xa:xb], (CROP, CROP, 3), "linear")))
            ys.append(int(label))
    if not xs:
        raise ValueError(f"{source!r}: no boxes to crop")
    return (np.stack(xs) - np.float32(mean)) / np.float32(std), np.asarray(ys, np.int32)


def pretrain_backbone(config, out: str, *, log: Callable[[str], None] = print) -> PretrainResult:
    """Train `config.model.backbone` on the box crops of `config.data` and write it to `out`."""
    import jax.numpy as jnp
    import optax
    from flax import nnx
    from safetensors.numpy import save_file

    from lfi_jax.data.det_transforms import IMAGENET_MEAN, IMAGENET_STD
    from lfi_jax.data.sources import get_source
    from lfi_jax.fileio import atomic_write_with
    from lfi_jax.models.convert.detr import to_hf_detr_state_dict
    from lfi_jax.models.resnet import ResNet
    from lfi_jax.tasks.detection import model_config, new_model

    settings = config.backbone_pretrain
    steps, batch, lr = int(settings.steps), int(settings.batch_size), float(settings.lr)
    if steps < 1 or batch < 1:
        raise ValueError(f"config.backbone_pretrain: steps={steps} and batch_size={batch} must be >= 1")
    seed = int(config.seed)
    opts = config.data.options.to_dict()
    mean = tuple(config.data.get("mean", IMAGENET_MEAN))
    std = tuple(config.data.get("std", IMAGENET_STD))
    t0 = time.time()
    xtr, ytr = box_crops(get_source(config.data.source, config.data.train_split, opts), mean, std)
    xva, yva = box_crops(get_source(config.data.source, config.data.eval_splits[0], opts), mean, std)
    mcfg = model_config(config)

    class Classifier(nnx.Module):
        def __init__(self, rngs):
            self.backbone = ResNet(mcfg.backbone, rngs=rngs)
            self.head = nnx.Linear(mcfg.backbone.out_channels, mcfg.num_classes, rngs=rngs)

        def __call__(self, x):
            return self.head(self.backbone(x)[-1].mean((1, 2)))

    model = Classifier(nnx.Rngs(seed))
    opt = nnx.Optimizer(model, optax.adamw(lr, weight_decay=1e-4), wrt=nnx.Param)

    @nnx.jit
    def step(m, o, x, y):
        def loss_fn(m):
            return optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()

        loss, g = nnx.value_and_grad(loss_fn)(m)
        o.update(m, g)
        return loss

    @nnx.jit
    def correct(m, x, y):
        return (m(x).argmax(-1) == y).sum()

    def accuracy() -> float:
        hits = sum(int(correct(model, jnp.asarray(xva[i:i + 256]), jnp.asarray(yva[i:i + 256])))
                   for i in range(0, len(xva), 256))
        return hits / len(xva)

    log(f"backbone pretraining: {len(xtr)} train / {len(xva)} val crops ({time.time() - t0:.0f} s), {steps} steps")
    rng = np.random.default_rng(seed)
    every = max(steps // 4, 1)
    for s in range(1, steps + 1):
        idx = rng.integers(0, len(xtr), batch)
        loss = step(model, opt, jnp.asarray(xtr[idx]), jnp.asarray(ytr[idx]))
        if s % every == 0 or s == steps:
            log(f"backbone pretraining: step {s}/{steps} loss {float(loss):.4f} ({time.time() - t0:.0f} s)")
    acc = accuracy()

    detr = new_model(mcfg, seed)
    nnx.update(detr.backbone, nnx.state(model.backbone, nnx.Param))
    sd = {k: np.ascontiguousarray(v) for k, v in to_hf_detr_state_dict(detr).items()
          if k.startswith("model.backbone.")}
    atomic_write_with(out, lambda tmp: save_file(sd, tmp))
    seconds = time.time() - t0
    log(f"backbone pretraining: val crop accuracy {acc:.3f}, wrote {out} ({seconds:.0f} s)")
    return PretrainResult(out, acc, len(xtr), len(xva), seconds)


def main(argv: Sequence[str] | None = None) -> int:
    from lfi_jax.cli import parse_sets
    from lfi_jax.config import load_config_file, set_key

    ap = argparse.ArgumentParser(prog="python -m lfi_jax.pretrain_backbone", description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", required=True, help="a detection config[:arg], e.g. configs/detection_demo.py:detr")
    ap.add_argument("--out", required=True, help="the safetensors file to write")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (repeatable)")
    args = ap.parse_args(argv)
    path, _, arg = args.config.partition(":")
    config = load_config_file(path, arg or None)
    for k, v in parse_sets(args.set).items():
        set_key(config, k, v)
    pretrain_backbone(config, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
