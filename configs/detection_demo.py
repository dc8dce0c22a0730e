"""The embedded detection benchmark: a tiny DETR / I-DETR on `shortcut_digits_det`, sized to
train on a 2-core CPU, with the dense oracle teacher (issue 13, item 6).

    python -m lfi_jax.demo --task=detection --workdir=runs/det_demo      # DETR vs I-DETR, builds the teacher

or one run by hand (the teacher store and the backbone first):

    python -m lfi_jax.pretrain_backbone --config=configs/detection_demo.py:idetr --out=runs/det_backbone.safetensors
    python -m lfi_jax.teacher.export --teacher=oracle_dense --data=shortcut_digits_det --split=train \
        --data-option canvas=64 ... --grid=16 --out=runs/det_teacher
    python -m lfi_jax.train --config=configs/detection_demo.py:idetr --workdir=runs/det_idetr \
        --config.teacher.store=runs/det_teacher --config.init.backbone=runs/det_backbone.safetensors \
        '--config.optim.freeze=("^backbone/",)'

Arguments (comma-separated): the model (detr | idetr | iq_gc | ic_only | iq_ic, the rows of Table 3
applied to DETR: detr = no interaction, idetr = interaction queries + constraint + gated control;
default idetr), `shuffled` (the teacher-shuffled control: the demo gives the run a copy of the
store whose maps are permuted across images with `teacher.shuffle_seed`, so every image gets some
other image's map) and `runlocal` (a few steps, for smoke tests).

No pretrained detector or ImageNet backbone exists offline at this size. The demo pretrains the
backbone on the train split's digit crops (`backbone_pretrain`, `lfi_jax.pretrain_backbone`:
the stand-in for DETR's ImageNet backbone), loads it frozen, and trains the rest of DETR and
I-DETR alike from scratch (docs/detection.md, "Main job": the fully from-scratch tiny DETR does
not learn the classes). The optimizer is DETR's (AdamW, weight decay 1e-4, gradient clip 0.1)
at a learning rate for a from-scratch transformer this small (1e-3, cosine, warm-up). Digits
are not mirror-symmetric: no flip.

`teacher.shuffle` / `teacher.shuffle_seed`, `teacher.grid` and `backbone_pretrain` are read by
the demo (`lfi_jax.demo_detection`), which builds the stores and the backbone; the trainer reads
only `teacher.store`, `init.backbone` and `optim.freeze`. Run by hand, the config trains
everything from scratch unless `init.backbone` names a file.
"""

import ml_collections

from lfi_jax.config import ABLATIONS, base_config, parse_arg, set_ablation
from lfi_jax.models.detr import detr_fields

MODELS = {"detr": "vit", "iq_gc": "iq_gc", "ic_only": "ic_only", "iq_ic": "iq_ic", "idetr": "ivit"}
assert set(MODELS.values()) <= set(ABLATIONS)

CANVAS = 64
BACKBONE = dict(  # two stages: stride 8, an 8 x 8 feature grid on the 64 px canvas
    embedding_size=16, hidden_sizes=(32, 64), depths=(1, 1), layer_type="basic",
    downsample_in_first_stage=False, downsample_in_bottleneck=False, num_channels=3, dtype="float32",
)


def get_config(arg: str = "idetr") -> ml_collections.ConfigDict:
    a = parse_arg(arg, {"model": tuple(MODELS), "control": ("shuffled",), "mode": ("runlocal",)})
    model = a.get("model", "idetr")
    shuffled = a.get("control") == "shuffled"
    c = base_config()
    c.name = f"digits-det-{model}" + ("-shuffled" if shuffled else "")
    c.task = "detection"
    c.seed = 0
    c.total_steps = 4000
    c.batch_size = 16
    c.log_every = 100
    c.eval_every = 2000
    c.eval_batch_size = 50  # divides the 200 val images
    c.checkpoint_every = 1000

    c.data = ml_collections.ConfigDict()
    c.data.source = "shortcut_digits_det"
    c.data.train_split = "train"
    c.data.eval_splits = ("val",)
    c.data.options = ml_collections.ConfigDict(
        dict(canvas=CANVAS, num_train=2000, num_val=200, seed=0, objects=(1, 3), size_range=(16, 32))
    )
    c.data.augment = ml_collections.ConfigDict(
        dict(hflip=False, scales=(CANVAS,), max_size=CANVAS, crop_prob=0.0, crop_pre_scales=(CANVAS,),
             crop_size=(CANVAS // 2, CANVAS))
    )
    c.data.eval_size, c.data.max_size, c.data.pad_hw, c.data.max_boxes = CANVAS, CANVAS, (CANVAS, CANVAS), 4
    c.data.num_workers = 0
    c.data.num_threads = 1
    c.data.prefetch = 2

    c.model = ml_collections.ConfigDict(
        detr_fields(hidden_size=64, encoder_layers=1, decoder_layers=2, encoder_heads=4, decoder_heads=4,
                    encoder_ffn_dim=128, decoder_ffn_dim=128, num_queries=10, num_classes=10, dropout=0.0,
                    gate_hidden=0, gate_bias_init=(0.0, 0.0), attn_impl="xla")
    )
    c.model.backbone = ml_collections.ConfigDict(BACKBONE)
    set_ablation(c, MODELS[model])

    # The backbone: the demo pretrains it on the train split's digit crops (lfi_jax.pretrain_backbone,
    # the stand-in for DETR's ImageNet backbone), names the file in init.backbone and, with
    # backbone_pretrain.freeze, adds it to optim.freeze. init.backbone "" = from scratch.
    c.init.backbone = ""
    c.backbone_pretrain = ml_collections.ConfigDict(dict(steps=1500, batch_size=64, lr=1e-3, freeze=True))
    c.teacher.store = ""  # set by the demo (or --config.teacher.store): an oracle_dense store of the train split
    c.teacher.grid = 16  # the oracle's grid, pooled onto the 8 x 8 feature grid by area overlap
    c.teacher.shuffle = shuffled
    c.teacher.shuffle_seed = 0
    c.loss = ml_collections.ConfigDict(
        dict(align_weight=1.0, dense_align="query_mean", eos_coef=0.1, ce_weight=1.0, bbox_weight=5.0,
             giou_weight=2.0, match_class=1.0, match_bbox=5.0, match_giou=2.0, matcher="scipy")
    )

    c.optim.lr = 1e-3
    c.optim.warmup_steps = 50
    c.optim.schedule = "cosine"
    c.optim.weight_decay = 1e-4
    c.optim.grad_clip_norm = 0.1
    c.mesh.shape = (-1, 1)

    if a.get("mode") == "runlocal":
        c.name += "-runlocal"
        c.total_steps, c.batch_size, c.eval_batch_size = 4, 4, 4
        c.log_every, c.eval_every, c.checkpoint_every = 1, 0, 2
        c.backbone_pretrain.update(dict(steps=2, batch_size=4))
        c.data.options.num_train, c.data.options.num_val = 16, 4
        c.model.update(dict(hidden_size=16, encoder_heads=2, decoder_heads=2, encoder_ffn_dim=32,
                            decoder_ffn_dim=32, num_queries=6))
        c.model.backbone.update(dict(embedding_size=8, hidden_sizes=(8, 16)))
    return c


__all__ = ["BACKBONE", "MODELS", "get_config"]
