"""Your own images: train a ViT or an I-ViT on an image folder (walk-through: docs/data.md).

    python -m lfi_jax.train --config=configs/imagefolder.py:/data/shapes,vit --workdir=runs/shapes_vit
    python -m lfi_jax.train --config=configs/imagefolder.py:/data/shapes,ivit \
        --config.teacher.store=stores/shapes_llava --workdir=runs/shapes_ivit

Layout: PATH/train/<class>/<image> and one directory per evaluation split beside it
(PATH/val/<class>/<image>, PATH/test/...); or PATH/<class>/<image> (train only, no evaluation).
The config reads the folder: the classes (the directories of PATH/train, sorted: class id =
position), `model.num_classes`, the evaluation splits (every directory of PATH but train;
override with --config.data.eval_splits=val,test) and the number of training images (the step
budget: 30 epochs).

Argument (comma-separated, the folder first; a path with commas is not supported):
  PATH                   the folder (relative paths are taken from the current directory)
  vit | ivit | iq_gc | ic_only | iq_ic
                         the model, a row of Table 3 (default ivit; every row but vit and
                         iq_gc reads a teacher store: --config.teacher.store=DIR)
  Ti/16 | S/16 | B/16 | L/16 (any patch: S/8 ...)
                         the size (default S/16)
  an integer             the image resolution in pixels (default 224)
  frozen                 the paper's frozen setting: start from a pretrained ViT
                         (--config.init.hf=DIR, the same size and resolution) and train only the
                         interaction queries, gates and head (ic_only: the original queries too);
                         default: every weight trained, from scratch or from --config.init.hf
  runlocal               a tiny model at 32 px and 4 steps: checks the whole path in seconds

Compute is float32 (set --config.model.dtype=bfloat16 on an accelerator) with attn_impl="auto".
"""

import os
import re

import ml_collections

from lfi_jax.config import ABLATIONS, PAPER_FREEZE, base_config, model_fields, paper_trainable, set_ablation
from lfi_jax.data.sources import ImageFolder
from lfi_jax.errors import UserError

SIZE_RE = re.compile(r"(Ti|S|B|L|H)/\d+")
EPOCHS = 30
USAGE = "configs/imagefolder.py:PATH[,vit|ivit|iq_gc|ic_only|iq_ic][,S/16][,224][,frozen][,runlocal]"


def parse(arg: str) -> dict:
    tokens = [t.strip() for t in (arg or "").split(",") if t.strip()]
    if not tokens:
        raise UserError(f"configs/imagefolder.py needs the folder: --config={USAGE}")
    out = {"path": os.path.abspath(os.path.expanduser(tokens[0])), "model": "ivit", "size": "S/16", "px": 224}
    for t in tokens[1:]:
        if t in ABLATIONS:
            out["model"] = t
        elif SIZE_RE.fullmatch(t):
            out["size"] = t
        elif t.isdigit():
            out["px"] = int(t)
        elif t in ("frozen", "runlocal"):
            out[t] = True
        else:
            raise UserError(f"configs/imagefolder.py: unknown argument {t!r} (expected {USAGE})")
    return out


def read_folder(path: str) -> tuple[list[str], tuple[str, ...], int]:
    """(classes, evaluation splits, training images) of the folder at `path`."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"configs/imagefolder.py: folder not found: {path}")
    train = ImageFolder(path, "train")
    splits = ()
    if os.path.isdir(os.path.join(path, "train")):
        dirs = (d for d in os.listdir(path) if not d.startswith(".") and os.path.isdir(os.path.join(path, d)))
        splits = tuple(sorted(d for d in dirs if d != "train"))
    return list(train.class_names), splits, len(train)


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    a = parse(arg)
    classes, splits, n_train = read_folder(a["path"])
    model, size, px = a["model"], a["size"], a["px"]
    c = base_config()
    folder = os.path.basename(a["path"].rstrip(os.sep)) or "imagefolder"
    c.name = f"{folder}-{model}-{'runlocal' if a.get('runlocal') else size.replace('/', '')}"
    c.batch_size = 64
    steps_per_epoch = max(1, n_train // c.batch_size)
    c.total_steps = EPOCHS * steps_per_epoch
    c.log_every = max(1, min(50, steps_per_epoch))
    c.eval_every = 5 * steps_per_epoch if splits else 0
    c.eval_batch_size = 64
    c.checkpoint_every = c.eval_every or 1000

    c.data.source = f"imagefolder:{a['path']}"
    c.data.train_split = "train"
    c.data.eval_splits = splits
    c.data.image_size = px
    c.data.options = ml_collections.ConfigDict()
    c.data.augment = ml_collections.ConfigDict(
        dict(random_resized_crop=True, crop_scale=(0.5, 1.0), crop_ratio=(0.75, 4 / 3), hflip=True)
    )

    c.model = ml_collections.ConfigDict(model_fields(size, image_size=px, num_classes=len(classes), attn_impl="auto"))
    set_ablation(c, model)
    c.teacher.store = ""  # a TeacherStore of PATH's train split (python -m lfi_jax.teacher.export ...)
    c.teacher.auto = ""  # an image folder has no masks: no oracle teacher
    c.loss.align_weight = 1.0

    c.optim.lr = 5e-4
    c.optim.warmup_steps = max(1, c.total_steps // 20)
    c.optim.weight_decay = 0.05
    if a.get("frozen"):
        c.optim.lr = 1e-3
        c.optim.freeze = PAPER_FREEZE
        c.optim.trainable = paper_trainable(model)

    if a.get("runlocal"):
        c.total_steps, c.batch_size, c.eval_batch_size = 4, 8, 8
        c.log_every, c.eval_every, c.checkpoint_every = 2, 0, 2
        c.optim.warmup_steps = 1
        c.data.image_size = 32
        fields = model_fields("Ti/8", hidden_size=64, depth=2, num_heads=2, mlp_dim=128, image_size=32,
                              num_classes=len(classes), attn_impl="xla", gate_hidden=0)
        c.model = ml_collections.ConfigDict(fields)
        set_ablation(c, model)
    return c
