"""The paper's instance-segmentation setting (Table 6, second half): DETR-R50 / I-DETR-R50 with
DETR's mask head on COCO 2017 (33.5 AP_mask with C_vlm vs 31.1 without in the paper).

    python -m lfi_jax.train --config=configs/coco_detr_seg.py:idetr \
        --config.data.source=coco:/data/coco \
        --config.init.hf=/models/detr-resnet-50 \
        --config.teacher.store=/data/teachers/coco-llava-dense-train2017 --workdir=runs/coco_idetr_seg

Arguments (comma-separated): the model (detr | iq_gc | ic_only | iq_ic | idetr, default idetr; the
rows of Table 3 applied to DETR, as `configs/coco_detr.py`) and `runlocal` (a tiny DETR with a
four-stage backbone on the embedded `shortcut_digits_det`, a few steps: a smoke test of the whole
path; rows with the constraint need a dense teacher store of its train split,
`--config.teacher.store=DIR` from the export CLI's oracle_dense backend).

DETR's recipe (Carion et al. 2020, section 4.4): the box model first, then the mask head alone
for 25 epochs (the box model frozen) with the learning rate dropped 10x after 15. Here init.hf is
the box model, a transformers `DetrForObjectDetection` directory (the released
facebook/detr-resnet-50 is read too) or a `DetrForSegmentation` one; the segmentation task puts
a fresh mask head on a box model. The DETR is frozen; what trains is the mask head
(`bbox_attention`, `mask_head`), the two box heads (COCO's 80 contiguous classes: the class head
starts fresh, as in `coco_detr.py`) and, with interaction learning, the interaction queries and
gates under the same Eq. 12 dense teacher as detection (I-DETR from the box model: Wq' = Wq,
gate bias [-4, +4], so it starts out as the DETR; `ic_only` also trains the decoder's
cross-attention query projections). A box model trained by `configs/coco_detr.py` can only be
the start once that run is written out as such a directory (`export_params` writes ViTs only).

AdamW at 1e-4 (weight decay 1e-4, gradient clip 0.1), dropped 10x after epoch `LR_DROP_EPOCH`
(`optim.schedule="step"`). Not as the paper: target masks live on 4 x 4 pixel cells of the padded
canvas (`data.mask_stride=4`, the mask head's own resolution) rather than at every pixel as DETR:
100 targets of a 1333 x 1333 canvas per image would be 177 MB; `--config.data.mask_stride=1` is
DETR's exact loss resolution. Evaluation returns each query's mask logits at 1/4 of the canvas to
the host (44 MB per COCO image for 100 queries), hence eval batches of 8.
"""

import ml_collections

from lfi_jax.config import base_config, parse_arg, set_ablation
from lfi_jax.models.detr import PRETRAINED_GATE_BIAS, detr_fields

TRAIN_IMAGES = 118_287  # COCO train2017
EPOCHS = 25
LR_DROP_EPOCH = 15  # DETR's segmentation phase: lr x 0.1 after 15 of the 25 epochs
MODELS = {"detr": "vit", "iq_gc": "iq_gc", "ic_only": "ic_only", "iq_ic": "iq_ic", "idetr": "ivit"}
FREEZE = (".*",)
TRAINABLE = (
    r"^bbox_attention/.*",
    r"^mask_head/.*",
    r".*interaction_query.*",
    r".*/gate/.*",
    r"^detr/class_labels_classifier/.*",
    r"^detr/bbox_predictor/.*",
)
CROSS_QUERIES = (r"^detr/decoder/layers/\d+/encoder_attn/q_proj/.*",)


def get_config(arg: str = "idetr") -> ml_collections.ConfigDict:
    a = parse_arg(arg, {"model": tuple(MODELS), "mode": ("runlocal",)})
    model = a.get("model", "idetr")
    c = base_config()
    c.name = f"coco-seg-{model}-r50"
    c.task = "segmentation"
    c.batch_size = 32
    c.total_steps = EPOCHS * TRAIN_IMAGES // c.batch_size
    c.log_every = 100
    c.eval_every = 5 * TRAIN_IMAGES // c.batch_size  # every 5 epochs (COCOeval bbox + segm of val2017)
    c.eval_batch_size = 8
    c.checkpoint_every = 2000

    c.data = ml_collections.ConfigDict()
    c.data.source = "coco:/path/to/coco"  # PATH/annotations/instances_<split>.json, PATH/<split>/
    c.data.train_split = "train2017"
    c.data.eval_splits = ("val2017",)
    c.data.options = ml_collections.ConfigDict(dict(masks=True))  # polygons / RLE through pycocotools
    c.data.augment = ml_collections.ConfigDict(
        dict(hflip=True, scales=tuple(range(480, 801, 32)), max_size=1333, crop_prob=0.5,
             crop_pre_scales=(400, 500, 600), crop_size=(384, 600))
    )
    c.data.eval_size = 800
    c.data.max_size = 1333
    c.data.pad_hw = (1336, 1336)  # the largest image rounded up to a multiple of mask_stride
    c.data.mask_stride = 4
    c.data.max_boxes = 100
    c.data.num_workers = 8
    c.data.num_threads = 2
    c.data.prefetch = 4

    c.model = ml_collections.ConfigDict(detr_fields(num_classes=80, attn_impl="auto"))
    set_ablation(c, MODELS[model])
    if c.model.interaction_queries:
        c.model.gate_bias_init = PRETRAINED_GATE_BIAS  # from a pretrained detector: starts out as it
    c.init.hf = "/path/to/detr-resnet-50"  # the box model (local directory)
    c.teacher.store = ""  # a dense LLaVA store of train2017
    c.loss = ml_collections.ConfigDict(
        dict(align_weight=1.0, dense_align="query_mean", eos_coef=0.1, ce_weight=1.0, bbox_weight=5.0,
             giou_weight=2.0, match_class=1.0, match_bbox=5.0, match_giou=2.0, matcher="scipy",
             mask_weight=1.0, dice_weight=1.0, focal_alpha=0.25, focal_gamma=2.0)
    )
    c.eval = ml_collections.ConfigDict(dict(mask_threshold=0.5))

    c.optim.lr = 1e-4
    c.optim.warmup_steps = 0
    c.optim.schedule = "step"
    c.optim.drop_steps = (LR_DROP_EPOCH * TRAIN_IMAGES // c.batch_size,)
    c.optim.drop_factor = 0.1
    c.optim.weight_decay = 1e-4
    c.optim.grad_clip_norm = 0.1
    c.optim.freeze = FREEZE
    c.optim.trainable = TRAINABLE + (CROSS_QUERIES if model == "ic_only" else ())

    if a.get("mode") == "runlocal":
        c.name = f"digits-seg-{model}-runlocal"
        c.total_steps, c.batch_size, c.eval_batch_size = 4, 8, 8  # divisible by up to 8 devices
        c.log_every, c.eval_every, c.checkpoint_every = 1, 0, 2
        c.optim.drop_steps = (3,)
        c.data.source = "shortcut_digits_det"
        c.data.train_split, c.data.eval_splits = "train", ("val",)
        c.data.options = ml_collections.ConfigDict(dict(num_train=8, num_val=4, canvas=64, size_range=(16, 32)))
        c.data.augment = ml_collections.ConfigDict(
            dict(hflip=True, scales=(48, 64), max_size=64, crop_prob=0.5, crop_pre_scales=(48, 64),
                 crop_size=(32, 48))
        )
        c.data.eval_size, c.data.max_size, c.data.pad_hw, c.data.max_boxes = 64, 64, (64, 64), 6
        c.data.num_workers = 0
        c.model.backbone = ml_collections.ConfigDict(
            dict(embedding_size=8, hidden_sizes=(8, 8, 16, 16), depths=(1, 1, 1, 1), layer_type="bottleneck",
                 downsample_in_first_stage=False, downsample_in_bottleneck=False, num_channels=3, dtype="float32")
        )
        c.model.update(dict(hidden_size=16, encoder_layers=1, decoder_layers=2, encoder_heads=8, decoder_heads=2,
                            encoder_ffn_dim=32, decoder_ffn_dim=32, num_queries=6, num_classes=10, dropout=0.0,
                            gate_bias_init=(0.0, 0.0), attn_impl="xla"))
        c.init.hf = ""  # a fresh tiny DETR (no checkpoint offline); the freeze patterns still apply
        c.teacher.grid = 8
    return c


__all__ = ["CROSS_QUERIES", "EPOCHS", "FREEZE", "LR_DROP_EPOCH", "MODELS", "TRAINABLE", "get_config"]
