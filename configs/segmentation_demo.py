"""The embedded instance-segmentation benchmark: a tiny DETR / I-DETR with DETR's mask head on
`shortcut_digits_det` (its records carry the digits' visible ink masks), sized for a 2-core
CPU, with the dense oracle teacher (issue 14, items 1 and 5).

One run by hand (the teacher store first; `detr` needs none):

    python -m lfi_jax.teacher.export --teacher=oracle_dense --data=shortcut_digits_det --split=train \
        --data-option canvas=128 ... --grid=16 --out=runs/seg_teacher
    python -m lfi_jax.train --config=configs/segmentation_demo.py:idetr --workdir=runs/seg_idetr \
        --config.teacher.store=runs/seg_teacher

Arguments (comma-separated), as `configs/detection_demo.py`: the model (detr | idetr | iq_gc |
ic_only | iq_ic; detr = no interaction, idetr = interaction queries + constraint + gated
control; default idetr), `shuffled` (the teacher-shuffled control: whoever builds the store
permutes its maps across images with `teacher.shuffle_seed`) and `runlocal` (a few steps on a
smaller model and canvas, for smoke tests). The trainer reads only `teacher.store`.

What differs from the detection demo. The mask head's FPN reads backbone stages 1-3, so the
backbone has four stages (stride 32): on the 128 px canvas that is a 4 x 4 feature grid (the
teacher's 16 x 16 oracle grid is area-pooled onto it) and masks at 32 x 32 (1/4 of the canvas),
compared with the 128 x 128 target masks (`data.mask_stride` 1, DETR's loss resolution).
Digits are 32-64 px so that each spans a few feature cells. Unlike Table 6 (a pretrained box
model, then the mask head for 25 epochs with the DETR frozen) nothing pretrained exists
offline at this size: box model, mask head and (for I-DETR) interaction queries and gates
train together from scratch, with the alignment loss on, so the comparison is of the two
training runs. Optimizer as the detection demo (AdamW 1e-3 cosine, weight decay 1e-4, clip 0.1).
"""

import ml_collections

from lfi_jax.config import ABLATIONS, base_config, parse_arg, set_ablation
from lfi_jax.models.detr import detr_fields

MODELS = {"detr": "vit", "iq_gc": "iq_gc", "ic_only": "ic_only", "iq_ic": "iq_ic", "idetr": "ivit"}
assert set(MODELS.values()) <= set(ABLATIONS)

CANVAS = 128
BACKBONE = dict(  # four stages (the mask head's FPN reads stages 1-3): stride 32, a 4 x 4 grid
    embedding_size=16, hidden_sizes=(16, 32, 64, 64), depths=(1, 1, 1, 1), layer_type="basic",
    downsample_in_first_stage=False, downsample_in_bottleneck=False, num_channels=3, dtype="float32",
)


def get_config(arg: str = "idetr") -> ml_collections.ConfigDict:
    a = parse_arg(arg, {"model": tuple(MODELS), "control": ("shuffled",), "mode": ("runlocal",)})
    model = a.get("model", "idetr")
    shuffled = a.get("control") == "shuffled"
    c = base_config()
    c.name = f"digits-seg-{model}" + ("-shuffled" if shuffled else "")
    c.task = "segmentation"
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
    c.data.options = ml_collections.ConfigDict(
        dict(canvas=CANVAS, num_train=2000, num_val=200, seed=0, objects=(1, 3), size_range=(32, 64))
    )
    c.data.augment = ml_collections.ConfigDict(
        dict(hflip=False, scales=(CANVAS,), max_size=CANVAS, crop_prob=0.0, crop_pre_scales=(CANVAS,),
             crop_size=(CANVAS // 2, CANVAS))
    )
    c.data.eval_size, c.data.max_size, c.data.pad_hw, c.data.max_boxes = CANVAS, CANVAS, (CANVAS, CANVAS), 4
    c.data.mask_stride = 1
    c.data.num_workers = 0
    c.data.num_threads = 1
    c.data.prefetch = 2

    c.model = ml_collections.ConfigDict(
        detr_fields(hidden_size=64, encoder_layers=1, decoder_layers=2, encoder_heads=8, decoder_heads=4,
                    encoder_ffn_dim=128, decoder_ffn_dim=128, num_queries=10, num_classes=10, dropout=0.0,
                    gate_hidden=0, gate_bias_init=(0.0, 0.0), attn_impl="xla")
    )
    c.model.backbone = ml_collections.ConfigDict(BACKBONE)
    set_ablation(c, MODELS[model])

    c.teacher.store = ""  # an oracle_dense store of the train split (--config.teacher.store)
    c.teacher.grid = 16  # the oracle's grid, pooled onto the 4 x 4 feature grid by area overlap
    c.teacher.shuffle = shuffled
    c.teacher.shuffle_seed = 0
    c.loss = ml_collections.ConfigDict(
        dict(align_weight=1.0, dense_align="query_mean", eos_coef=0.1, ce_weight=1.0, bbox_weight=5.0,
             giou_weight=2.0, match_class=1.0, match_bbox=5.0, match_giou=2.0, matcher="scipy",
             mask_weight=1.0, dice_weight=1.0, focal_alpha=0.25, focal_gamma=2.0)
    )
    c.eval = ml_collections.ConfigDict(dict(mask_threshold=0.5))

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
        c.data.options.update(dict(canvas=64, num_train=16, num_val=4, size_range=(16, 32)))
        c.data.augment.update(dict(scales=(64,), max_size=64, crop_pre_scales=(64,), crop_size=(32, 64)))
        c.data.eval_size, c.data.max_size, c.data.pad_hw = 64, 64, (64, 64)
        c.model.update(dict(hidden_size=16, encoder_heads=8, decoder_heads=2, encoder_ffn_dim=32,
                            decoder_ffn_dim=32, num_queries=6))
        c.model.backbone.update(dict(embedding_size=8, hidden_sizes=(8, 8, 16, 16)))
        c.teacher.grid = 8
    return c


__all__ = ["BACKBONE", "CANVAS", "MODELS", "get_config"]
