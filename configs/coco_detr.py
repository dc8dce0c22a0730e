"""The paper's detection setting (Table 6): DETR-R50 / I-DETR-R50 on COCO 2017.

    python -m lfi_jax.train --config=configs/coco_detr.py:idetr \
        --config.data.source=coco:/data/coco \
        --config.init.hf=/models/detr-resnet-50 \
        --config.teacher.store=/data/teachers/coco-llava-dense-train2017 --workdir=runs/coco_idetr

Arguments (comma-separated): the model (detr | iq_gc | ic_only | iq_ic | idetr, default idetr;
the rows of Table 3 applied to DETR: detr = no interaction, idetr = interaction queries +
constraint + gated control) and `runlocal` (a tiny DETR on the embedded `shortcut_digits_det`
benchmark, a few steps: a smoke test of the whole path; rows with the constraint need a dense
teacher store of its train split, `--config.teacher.store=DIR` from the export CLI's oracle_dense
backend, as start-up validation says).

init.hf is a transformers `DetrForObjectDetection` directory (the released facebook/detr-resnet-50,
timm backbone layout, is read too). With interaction queries the I-DETR starts from it with
Wq' = Wq and the gate bias [-4, +4] (SPEC section 7), so it starts out as the DETR. The DETR is
frozen; only the interaction queries, the gates and the two heads train (the paper's setting;
`ic_only` also trains the cross-attention query projections, the weights its teacher supervises).
COCO's 80 categories are contiguous class ids here, so the class head (81 outputs) starts fresh.
DETR's defaults otherwise: AdamW lr 1e-4, weight decay 1e-4, gradient clip 0.1, batch 64, DETR's
augmentation (flip, multi-scale 480-800 px, random crop), 50 epochs; the constant learning rate
has no step drop (the optimizer has cosine or constant schedules). The teacher is a LLaVA dense
store of train2017 (`python -m lfi_jax.teacher.export --teacher=llava --task=dense ...`).
Compute in float32 as DETR; `attn_impl="auto"` (the Pallas kernel on accelerators).
"""

import ml_collections

from lfi_jax.config import base_config, parse_arg, set_ablation
from lfi_jax.models.detr import PRETRAINED_GATE_BIAS, detr_fields

TRAIN_IMAGES = 118_287  # COCO train2017
MODELS = {"detr": "vit", "iq_gc": "iq_gc", "ic_only": "ic_only", "iq_ic": "iq_ic", "idetr": "ivit"}
FREEZE = (".*",)
TRAINABLE = (r".*interaction_query.*", r".*/gate/.*", r"^class_labels_classifier/.*", r"^bbox_predictor/.*")
# The decoder's original cross-attention queries: what `ic_only`'s teacher supervises.
CROSS_QUERIES = (r"^decoder/layers/\d+/encoder_attn/q_proj/.*",)


def get_config(arg: str = "idetr") -> ml_collections.ConfigDict:
    a = parse_arg(arg, {"model": tuple(MODELS), "mode": ("runlocal",)})
    model = a.get("model", "idetr")
    c = base_config()
    c.name = f"coco-{model}-r50"
    c.task = "detection"
    c.batch_size = 64
    epochs = 50
    c.total_steps = epochs * TRAIN_IMAGES // c.batch_size
    c.log_every = 100
    c.eval_every = 5 * TRAIN_IMAGES // c.batch_size  # every 5 epochs (COCOeval of val2017)
    c.eval_batch_size = 64
    c.checkpoint_every = 2000

    c.data = ml_collections.ConfigDict()
    c.data.source = "coco:/path/to/coco"  # PATH/annotations/instances_<split>.json, PATH/<split>/
    c.data.train_split = "train2017"
    c.data.eval_splits = ("val2017",)
    c.data.options = ml_collections.ConfigDict()
    c.data.augment = ml_collections.ConfigDict(
        dict(hflip=True, scales=tuple(range(480, 801, 32)), max_size=1333, crop_prob=0.5,
             crop_pre_scales=(400, 500, 600), crop_size=(384, 600))
    )
    c.data.eval_size = 800
    c.data.max_size = 1333
    c.data.pad_hw = (1333, 1333)
    c.data.max_boxes = 100
    c.data.num_workers = 8
    c.data.num_threads = 2
    c.data.prefetch = 4

    c.model = ml_collections.ConfigDict(detr_fields(num_classes=80, attn_impl="auto"))
    set_ablation(c, MODELS[model])
    if c.model.interaction_queries:
        c.model.gate_bias_init = PRETRAINED_GATE_BIAS  # from a pretrained detector: starts out as it
    c.init.hf = "/path/to/detr-resnet-50"  # a transformers DetrForObjectDetection directory (local)
    c.teacher.store = ""  # a dense LLaVA store of train2017
    c.loss = ml_collections.ConfigDict(
        dict(align_weight=1.0, dense_align="query_mean", eos_coef=0.1, ce_weight=1.0, bbox_weight=5.0,
             giou_weight=2.0, match_class=1.0, match_bbox=5.0, match_giou=2.0, matcher="scipy")
    )

    c.optim.lr = 1e-4
    c.optim.warmup_steps = 0
    c.optim.schedule = "constant"
    c.optim.weight_decay = 1e-4
    c.optim.grad_clip_norm = 0.1
    c.optim.freeze = FREEZE
    c.optim.trainable = TRAINABLE + (CROSS_QUERIES if model == "ic_only" else ())

    if a.get("mode") == "runlocal":
        c.name = f"digits-det-{model}-runlocal"
        c.total_steps, c.batch_size, c.eval_batch_size = 4, 8, 8  # divisible by up to 8 devices
        c.log_every, c.eval_every, c.checkpoint_every = 1, 0, 2
        c.data.source = "shortcut_digits_det"
        c.data.train_split, c.data.eval_splits = "train", ("val",)
        c.data.options = ml_collections.ConfigDict(dict(num_train=8, num_val=4, canvas=64, size_range=(12, 28)))
        c.data.augment = ml_collections.ConfigDict(
            dict(hflip=True, scales=(48, 64), max_size=64, crop_prob=0.5, crop_pre_scales=(48, 64),
                 crop_size=(32, 48))
        )
        c.data.eval_size, c.data.max_size, c.data.pad_hw, c.data.max_boxes = 64, 64, (64, 64), 6
        c.data.num_workers = 0
        c.model.backbone = ml_collections.ConfigDict(
            dict(embedding_size=8, hidden_sizes=(8, 16, 16), depths=(1, 1, 1), layer_type="bottleneck",
                 downsample_in_first_stage=False, downsample_in_bottleneck=False, num_channels=3, dtype="float32")
        )
        c.model.update(dict(hidden_size=16, encoder_layers=1, decoder_layers=2, encoder_heads=2, decoder_heads=2,
                            encoder_ffn_dim=32, decoder_ffn_dim=32, num_queries=6, num_classes=10, dropout=0.0,
                            gate_bias_init=(0.0, 0.0), attn_impl="xla"))
        c.init.hf = ""  # a fresh tiny DETR (no checkpoint offline); the freeze patterns still apply
    return c


__all__ = ["CROSS_QUERIES", "FREEZE", "MODELS", "TRAINABLE", "get_config"]
