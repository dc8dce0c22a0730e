"""The paper's Table 7: Conditional-DETR-R50 / I-Conditional-DETR-R50 trained from scratch on a
seeded 10 % subset of PASCAL VOC's training images (40.9 / 4.9 / 24.2 / 53.5 AP / APs / APm /
APl with C_vlm vs 38.6 / 5.0 / 22.4 / 51.2 without).

    python -m lfi_jax.train --config=configs/voc_conddetr.py:iconddetr \\
        --config.data.source=voc:/data/VOCdevkit/VOC2007 \\
        --config.init.backbone=/models/resnet50.pth \\
        --config.teacher.store=/data/teachers/voc2007-llava-dense-trainval --workdir=runs/voc_iconddetr

Arguments (comma-separated): the model (conddetr | iconddetr, default iconddetr), then the
alternatives the paper's text names (docs/detection.md, "Conditional-DETR on VOC"): `coco` (10 % of COCO train2017,
evaluated on val2017, instead of VOC), `frozen` (start from a trained Conditional-DETR,
`init.hf`, and train only the interaction queries, the gates and the two heads, as Table 6's
DETR setting), and `runlocal` (a tiny Conditional-DETR on the embedded few-shot
`shortcut_digits_det`, a few steps: a smoke test of the whole path; `iconddetr,runlocal` needs
a dense teacher store of its train split, `--config.teacher.store=DIR`).

The decision (Table 7 over the text): VOC, from scratch. "From scratch" is the detector: every
transformer layer and head starts fresh and trains; the backbone starts from ImageNet weights
when `init.backbone` names a local ResNet-50 checkpoint (a timm / torchvision `.pth` or
`.safetensors`, or a transformers `ResNetModel` directory such as microsoft/resnet-50; "" = a
random backbone, everything from scratch) and trains with the rest. Data: VOC2007 `trainval`
(5,011 images) -> the `data.data_ratio = 0.1` subset (stratified by each image's most frequent
class, seed `data.options.subset_seed`; the same seed gives the same images), evaluated on
VOC2007 `test` with COCOeval (AP, AP50, APs/m/l; difficult objects ignored). VOC2012 works the
same (`voc:.../VOC2012`, splits train / val).

Recipe: Conditional-DETR's (Meng et al. 2021): 300 queries, 6 + 6 layers, d 256, sigmoid focal
classification (alpha 0.25, gamma 2), matching cost class 2 / L1 5 / GIoU 2, loss weights
2 / 5 / 2 on every decoder layer; AdamW lr 1e-4, weight decay 1e-4, gradient clip 0.1, batch
16, DETR's augmentation (flip, multi-scale 480-800 px, random crop), 50 epochs with the
learning rate x0.1 after epoch 40 (`optim.schedule="step"`). One difference: the original
trains the backbone at 1e-5 (the optimizer has one learning rate: here the backbone trains at
1e-4 with the rest). The teacher of iconddetr is a dense LLaVA store of
the train split (`python -m lfi_jax.teacher.export --teacher=llava --task=dense ...`).
"""

import math

import ml_collections

from lfi_jax.config import base_config, parse_arg, set_ablation
from lfi_jax.models.detr import detr_fields

VOC07_TRAINVAL = 5_011
COCO_TRAIN = 118_287
RATIO = 0.1
EPOCHS, DROP_EPOCH = 50, 40
MODELS = {"conddetr": "vit", "iconddetr": "ivit"}
FREEZE = (".*",)
TRAINABLE = (r".*interaction_query.*", r".*/gate/.*", r"^class_labels_classifier/.*", r"^bbox_predictor/.*")
LOSS = dict(align_weight=1.0, dense_align="query_mean", ce_weight=2.0, bbox_weight=5.0, giou_weight=2.0,
            match_class=2.0, match_bbox=5.0, match_giou=2.0, focal_alpha=0.25, focal_gamma=2.0, matcher="scipy")


def get_config(arg: str = "iconddetr") -> ml_collections.ConfigDict:
    a = parse_arg(arg, {"model": tuple(MODELS), "data": ("coco",), "init": ("frozen",), "mode": ("runlocal",)})
    model = a.get("model", "iconddetr")
    coco, frozen = a.get("data") == "coco", a.get("init") == "frozen"
    c = base_config()
    c.name = f"{'coco' if coco else 'voc'}10-{model}-r50" + ("-frozen" if frozen else "")
    c.task = "detection"
    c.batch_size = 16
    images = round(RATIO * (COCO_TRAIN if coco else VOC07_TRAINVAL))
    epoch = math.ceil(images / c.batch_size)
    c.total_steps = EPOCHS * epoch
    c.log_every = 50
    c.eval_every = 5 * epoch
    c.eval_batch_size = 16
    c.checkpoint_every = 5 * epoch

    c.data = ml_collections.ConfigDict()
    if coco:
        c.data.source = "coco:/path/to/coco"
        c.data.train_split, c.data.eval_splits = "train2017", ("val2017",)
    else:
        c.data.source = "voc:/path/to/VOCdevkit/VOC2007"
        c.data.train_split, c.data.eval_splits = "trainval", ("test",)
    c.data.data_ratio = RATIO
    c.data.options = ml_collections.ConfigDict(dict(subset_seed=0))
    c.data.augment = ml_collections.ConfigDict(
        dict(hflip=True, scales=tuple(range(480, 801, 32)), max_size=1333, crop_prob=0.5,
             crop_pre_scales=(400, 500, 600), crop_size=(384, 600))
    )
    c.data.eval_size, c.data.max_size, c.data.pad_hw, c.data.max_boxes = 800, 1333, (1333, 1333), 100
    c.data.num_workers = 8
    c.data.num_threads = 2
    c.data.prefetch = 4

    c.model = ml_collections.ConfigDict(
        detr_fields(num_queries=300, num_classes=80 if coco else 20, attn_impl="auto")
    )
    c.model.gate_bias_init = None  # unset: [0, 0] from scratch, [-4, +4] from init.hf (README deviation 4)
    c.model.arch = "conditional_detr"
    set_ablation(c, MODELS[model])
    c.init.hf = ""
    c.init.backbone = ""  # a local ImageNet ResNet-50 checkpoint ("" = a random backbone)
    c.init.class_head = "auto"
    c.teacher.store = ""  # a dense LLaVA store of the train split (iconddetr)
    c.loss = ml_collections.ConfigDict(LOSS)

    c.optim.lr = 1e-4
    c.optim.warmup_steps = 0
    c.optim.schedule = "step"
    c.optim.drop_steps = (DROP_EPOCH * epoch,)
    c.optim.drop_factor = 0.1
    c.optim.weight_decay = 1e-4
    c.optim.grad_clip_norm = 0.1
    if frozen:  # the paper's text: a trained Conditional-DETR, its original layers frozen
        c.init.hf = "/path/to/conditional-detr-resnet-50"  # a transformers ConditionalDetrForObjectDetection
        c.optim.freeze = FREEZE
        c.optim.trainable = TRAINABLE

    if a.get("mode") == "runlocal":
        c.name = f"digits-fewshot-{model}-runlocal" + ("-frozen" if frozen else "")
        c.total_steps, c.batch_size, c.eval_batch_size = 4, 8, 8  # divisible by up to 8 devices
        c.log_every, c.eval_every, c.checkpoint_every = 1, 0, 2
        c.optim.drop_steps = (3,)
        c.data.source = "shortcut_digits_det"
        c.data.train_split, c.data.eval_splits = "train", ("val",)
        c.data.data_ratio = 0.5  # of the few-shot train split (3 classes x 6 images)
        c.data.options = ml_collections.ConfigDict(
            dict(canvas=64, num_val=4, size_range=(12, 28), objects=(1, 2), classes=3, shots=6, class_seed=0,
                 subset_seed=0)
        )
        c.data.augment = ml_collections.ConfigDict(
            dict(hflip=True, scales=(48, 64), max_size=64, crop_prob=0.5, crop_pre_scales=(48, 64),
                 crop_size=(32, 48))
        )
        c.data.eval_size, c.data.max_size, c.data.pad_hw, c.data.max_boxes = 64, 64, (64, 64), 4
        c.data.num_workers = 0
        c.model.backbone = ml_collections.ConfigDict(
            dict(embedding_size=8, hidden_sizes=(8, 16, 16), depths=(1, 1, 1), layer_type="bottleneck",
                 downsample_in_first_stage=False, downsample_in_bottleneck=False, num_channels=3, dtype="float32")
        )
        c.model.update(dict(hidden_size=16, encoder_layers=1, decoder_layers=2, encoder_heads=2, decoder_heads=2,
                            encoder_ffn_dim=32, decoder_ffn_dim=32, num_queries=6, num_classes=3, dropout=0.0,
                            gate_bias_init=(0.0, 0.0), attn_impl="xla"))
        c.init.hf = ""  # no checkpoint offline; with `frozen` the freeze patterns still apply
    return c


__all__ = ["FREEZE", "LOSS", "MODELS", "TRAINABLE", "get_config"]
