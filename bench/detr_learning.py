"""Does the tiny DETR of configs/detection_demo.py learn anything image-dependent, in JAX and in
transformers' PyTorch DETR, from the same initial weights on the same batches?

    python bench/detr_learning.py [--steps 800] [--every 100] [--lr 1e-3] [--frameworks jax,torch]

Both frameworks start from the JAX DETR's initial weights (converted with
`lfi_jax.models.convert.detr.save_hf_detr`, as bench/detection_step.py does) and train on the
same batches of the demo's real train iterator (`shortcut_digits_det`, 64 px, batch 16) with
AdamW (the config's weight decay), gradient clip 0.1 and a constant learning rate. JAX's loss
is `lfi_jax.detection.criterion.set_criterion`, PyTorch's is transformers' DETR loss with
auxiliary losses (the same matcher costs and weights). Printed every `--every` steps: the final
layer's class loss and GIoU loss and `img_dep`, the standard deviation over the batch's images of
p(no-object), averaged over queries: a detector whose class output does not depend on the image
has img_dep ~ 0 (a constant prediction has class loss ~2.24 on this data).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

CONFIG = os.path.join(ROOT, "configs", "detection_demo.py")
KEYS = ("image", "pixel_mask", "labels", "boxes", "box_valid")


def batches(config, n: int) -> list[dict[str, np.ndarray]]:
    from lfi_jax.data.det_pipeline import make_det_train_iterator

    it = make_det_train_iterator(config.data, config.teacher, global_batch_size=int(config.batch_size), seed=0)
    return [{k: v for k, v in next(it).items() if k in KEYS} for _ in range(n)]


def img_dep(p_noobj: np.ndarray) -> float:
    return float(np.asarray(p_noobj, np.float64).std(0).mean())


def run_jax(config, model, data, lr, every):
    import jax
    import optax
    from flax import nnx

    from lfi_jax.detection.criterion import set_criterion
    from lfi_jax.detection.types import DetectionPredictions, DetectionTargets

    tx = optax.chain(optax.clip_by_global_norm(float(config.optim.grad_clip_norm)),
                     optax.adamw(lr, weight_decay=float(config.optim.weight_decay)))
    opt = nnx.Optimizer(model, tx, wrt=nnx.Param)

    def loss_fn(m, b):
        out = m(b["image"], b["pixel_mask"])
        preds = DetectionPredictions(out.logits, out.pred_boxes, out.aux_logits, out.aux_boxes)
        crit = set_criterion(preds, DetectionTargets(b["labels"], b["boxes"], b["box_valid"]),
                             num_classes=model.cfg.num_classes)
        return crit.total, (crit.final.loss_ce, crit.final.loss_giou, jax.nn.softmax(out.logits)[..., -1])

    @nnx.jit
    def step(m, o, b):
        (_, aux), g = nnx.value_and_grad(loss_fn, has_aux=True)(m, b)
        o.update(m, g)
        return aux

    rows = []
    for s, b in enumerate(data):
        ce, giou, pn = step(model, opt, b)
        if s % every == 0 or s == len(data) - 1:
            rows.append((s, float(ce), float(giou), img_dep(pn)))
    return rows


def run_torch(config, model, data, lr, every):
    import torch
    import transformers

    from lfi_jax.models.convert.detr import save_hf_detr

    with tempfile.TemporaryDirectory() as d:
        save_hf_detr(model, d)
        hf = transformers.DetrForObjectDetection.from_pretrained(d)
    hf.config.auxiliary_loss = True
    for p in hf.parameters():  # transformers freezes a ResNet's stem and first stage; train all, as JAX does
        p.requires_grad_(True)  # (the frozen BatchNorm tensors are buffers, not parameters)
    hf.train()
    params = [p for p in hf.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=float(config.optim.weight_decay))
    rows = []
    for s, b in enumerate(data):
        x = torch.from_numpy(b["image"]).permute(0, 3, 1, 2).contiguous()
        m = torch.from_numpy(b["pixel_mask"].astype(np.int64))
        labels = [{"class_labels": torch.from_numpy(lab[v]).long(), "boxes": torch.from_numpy(box[v])}
                  for lab, box, v in zip(b["labels"], b["boxes"], b["box_valid"])]
        opt.zero_grad(set_to_none=True)
        out = hf(pixel_values=x, pixel_mask=m, labels=labels)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, float(config.optim.grad_clip_norm))
        opt.step()
        if s % every == 0 or s == len(data) - 1:
            pn = out.logits.detach().softmax(-1)[..., -1].numpy()
            ld = {k: float(v.detach()) for k, v in out.loss_dict.items()}
            rows.append((s, ld["loss_ce"], ld["loss_giou"], img_dep(pn)))
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--every", type=int, default=100)
    ap.add_argument("--lr", type=float, default=None, help="default: the config's optim.lr")
    ap.add_argument("--frameworks", default="jax,torch")
    args = ap.parse_args()

    from flax import nnx

    from lfi_jax.config import load_config_file
    from lfi_jax.models.detr import Detr
    from lfi_jax.tasks.detection import model_config

    config = load_config_file(CONFIG, "detr")
    config.data.stride = 8
    lr = float(config.optim.lr if args.lr is None else args.lr)
    mcfg = model_config(config)
    data = batches(config, args.steps)
    results = {}
    for fw in args.frameworks.split(","):
        model = Detr(mcfg, rngs=nnx.Rngs(0))
        t = time.time()
        results[fw] = ({"jax": run_jax, "torch": run_torch}[fw])(config, model, data, lr, args.every)
        print(f"{fw}: {args.steps} steps in {time.time() - t:.0f} s", flush=True)
    print(f"\n| step | {' | '.join(f'{fw} ce | {fw} giou | {fw} img_dep' for fw in results)} |")
    print("|---" * (1 + 3 * len(results)) + "|")
    for i, row in enumerate(next(iter(results.values()))):
        cells = [f"{r[i][1]:.3f} | {r[i][2]:.3f} | {r[i][3]:.3f}" for r in results.values()]
        print(f"| {row[0]} | {' | '.join(cells)} |")


if __name__ == "__main__":
    main()
