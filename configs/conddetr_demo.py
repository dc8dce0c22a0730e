"""The embedded few-shot Conditional-DETR benchmark (the Table 7 path on embedded data): a tiny
Conditional-DETR / I-Conditional-DETR trained from scratch on the few-shot variant of
`shortcut_digits_det` (5 of the 10 digit classes, drawn by `class_seed`, 30 training images per
class; 200 validation images of the same classes), sized for a 2-core CPU, with the dense
oracle teacher.

One run by hand (the teacher store first):

    python -m lfi_jax.teacher.export --teacher=oracle_dense --data=shortcut_digits_det --split=train \\
        --data-option canvas=64 --data-option classes=5 --data-option shots=30 ... --grid=16 \\
        --out=runs/cdet_teacher
    python -m lfi_jax.train --config=configs/conddetr_demo.py:iconddetr --workdir=runs/cdet_iconddetr \\
        --config.teacher.store=runs/cdet_teacher

Arguments (comma-separated): the model (conddetr = no interaction | iconddetr = interaction
queries + constraint + gated control, default iconddetr), `shuffled` (the teacher-shuffled
control: a runner gives the run a copy of the store whose maps are permuted across images with
`teacher.shuffle_seed`, as `configs/detection_demo.py`) and `runlocal` (a few steps, for smoke
tests).

As in `configs/detection_demo.py` everything trains from scratch (no pretrained detector
offline at this size), on the same 64 px canvas with a stride-8 two-stage ResNet (an 8 x 8
feature grid). What differs is the detector (Conditional-DETR: sigmoid focal classification,
focal matching cost 2 / L1 5 / GIoU 2, class loss weight 2, `model.arch="conditional_detr"`)
and the data (few classes, few examples). The interaction query replaces the content half of
the cross-attention query; the spatial half stays shared (README deviation 9).
"""

import ml_collections

from lfi_jax.config import ABLATIONS, base_config, parse_arg, set_ablation
from lfi_jax.models.detr import detr_fields

MODELS = {"conddetr": "vit", "iconddetr": "ivit"}
assert set(MODELS.values()) <= set(ABLATIONS)

CANVAS = 64
CLASSES, SHOTS = 5, 30
BACKBONE = dict(  # two stages: stride 8, an 8 x 8 feature grid on the 64 px canvas
    embedding_size=16, hidden_sizes=(32, 64), depths=(1, 1), layer_type="basic",
    downsample_in_first_stage=False, downsample_in_bottleneck=False, num_channels=3, dtype="float32",
)
LOSS = dict(align_weight=1.0, dense_align="query_mean", ce_weight=2.0, bbox_weight=5.0, giou_weight=2.0,
            match_class=2.0, match_bbox=5.0, match_giou=2.0, focal_alpha=0.25, focal_gamma=2.0, matcher="scipy")


def get_config(arg: str = "iconddetr") -> ml_collections.ConfigDict:
    a = parse_arg(arg, {"model": tuple(MODELS), "control": ("shuffled",), "mode": ("runlocal",)})
    model = a.get("model", "iconddetr")
    shuffled = a.get("control") == "shuffled"
    c = base_config()
    c.name = f"digits-fewshot-{model}" + ("-shuffled" if shuffled else "")
    c.task = "detection"
    c.seed = 0
    c.total_steps = 1200
    c.batch_size = 16
    c.log_every = 50
    c.eval_every = 600
    c.eval_batch_size = 50  # divides the 200 val images
    c.checkpoint_every = 600

    c.data = ml_collections.ConfigDict()
    c.data.source = "shortcut_digits_det"
    c.data.train_split = "train"
    c.data.eval_splits = ("val",)
    c.data.data_ratio = 1.0  # the few-shot subset is the data's own (options classes / shots / class_seed)
    c.data.options = ml_collections.ConfigDict(
        dict(canvas=CANVAS, num_val=200, seed=0, objects=(1, 3), size_range=(16, 32), classes=CLASSES,
             shots=SHOTS, class_seed=0)
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
                    encoder_ffn_dim=128, decoder_ffn_dim=128, num_queries=20, num_classes=CLASSES, dropout=0.0,
                    gate_hidden=0, gate_bias_init=(0.0, 0.0), attn_impl="xla")
    )
    c.model.arch = "conditional_detr"
    c.model.backbone = ml_collections.ConfigDict(BACKBONE)
    set_ablation(c, MODELS[model])
    c.init.backbone = ""  # from scratch

    c.teacher.store = ""  # an oracle_dense store of the train split (a runner or --config.teacher.store)
    c.teacher.grid = 16  # the oracle's grid, pooled onto the 8 x 8 feature grid by area overlap
    c.teacher.shuffle = shuffled
    c.teacher.shuffle_seed = 0
    c.loss = ml_collections.ConfigDict(LOSS)

    c.optim.lr = 1e-3
    c.optim.warmup_steps = 50
    c.optim.schedule = "cosine"
    c.optim.weight_decay = 1e-4
    c.optim.grad_clip_norm = 0.1
    c.mesh.shape = (-1, 1)

    if a.get("mode") == "runlocal":
        c.name += "-runlocal"
        c.total_steps, c.batch_size, c.eval_batch_size = 4, 8, 8  # divisible by up to 8 devices
        c.log_every, c.eval_every, c.checkpoint_every = 1, 0, 2
        c.data.options.update(dict(classes=3, shots=4, num_val=4))
        c.model.update(dict(hidden_size=16, encoder_heads=2, decoder_heads=2, encoder_ffn_dim=32,
                            decoder_ffn_dim=32, num_queries=6, num_classes=3))
        c.model.backbone.update(dict(embedding_size=8, hidden_sizes=(8, 16)))
    return c


__all__ = ["BACKBONE", "CLASSES", "LOSS", "MODELS", "SHOTS", "get_config"]
