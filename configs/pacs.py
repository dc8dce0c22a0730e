"""PACS leave-one-domain-out (the cross-domain setting of Table 4): train ViT / I-ViT on three
domains, test on the held-out one.

    python -m lfi_jax.evaluate lodo-layout --root /data/PACS --held_out sketch --out /data/pacs_lodo/sketch
    python -m lfi_jax.teacher.export --teacher=llava --data imagefolder:/data/pacs_lodo/sketch \
        --split train --out /data/teachers/pacs-sketch-llava ...
    python -m lfi_jax.train --config=configs/pacs.py:sketch,ivit \
        --config.data.source=imagefolder:/data/pacs_lodo/sketch \
        --config.teacher.store=/data/teachers/pacs-sketch-llava \
        --config.init.hf=/models/vit-base-patch16-224-in21k --workdir=runs/pacs_sketch_ivit

Arguments (comma-separated): the held-out domain (art_painting | cartoon | photo | sketch,
default sketch), the model row of Table 3 (vit | iq_gc | ic_only | iq_ic | ivit, default ivit),
the size (Ti/16 | S/16 | B/16 | L/16, default B/16), optional `scratch` (train everything from
random init instead of the paper's frozen pretrained backbone), and `runlocal` (smoke-test sizes).

Data layout: PACS/<domain>/<class>/<file> (the DomainBed layout: domains art_painting, cartoon,
photo, sketch; classes dog, elephant, giraffe, guitar, horse, house, person).
`python -m lfi_jax.evaluate lodo-layout` links it into DIR/train (the three source domains,
files renamed <domain>__<file> so ids never collide) and DIR/test (the held-out domain), which
`imagefolder:DIR` reads as the splits `train` and `test`. The model is evaluated on `test`
during training; `python -m lfi_jax.evaluate domains` scores it on every domain afterwards.

Settings follow configs/tinyimagenet.py (the paper gives no PACS-specific ones): 224 px, 50
epochs over the three training domains, the original transformer layers frozen, only the
interaction queries, gates and head trained; the ViT baseline trains its head in the same
frozen setting, and the `ic_only` row trains the original query projections too (the weights
the teacher supervises; frozen, that row would train only the head). Steps per epoch come from
the domains' published image counts. Compute in bfloat16 (float32 parameters); `runlocal` in
float32.
"""

import ml_collections

from lfi_jax.config import ABLATIONS, PAPER_DTYPE, base_config, model_fields, parse_arg, set_ablation, set_paper_init

DOMAIN_SIZES = {"art_painting": 2048, "cartoon": 2344, "photo": 1670, "sketch": 3929}  # 9,991 images
CLASSES = ("dog", "elephant", "giraffe", "guitar", "horse", "house", "person")
SIZES = ("Ti/16", "S/16", "B/16", "L/16")
NAME = "pacs"


def lodo_config(arg, *, name, domain_sizes, num_classes, default_domain):
    a = parse_arg(
        arg,
        {
            "domain": tuple(domain_sizes),
            "model": tuple(ABLATIONS),
            "size": SIZES,
            "init": ("scratch",),
            "mode": ("runlocal",),
        },
    )
    held, model, size = a.get("domain", default_domain), a.get("model", "ivit"), a.get("size", "B/16")
    train_examples = sum(n for d, n in domain_sizes.items() if d != held)
    c = base_config()
    c.name = f"{name}-{held}-{model}-{size.replace('/', '')}"
    c.batch_size = 64
    epochs = 50
    steps_per_epoch = max(1, train_examples // c.batch_size)
    c.total_steps = epochs * steps_per_epoch
    c.log_every = 50
    c.eval_every = 5 * steps_per_epoch
    c.eval_batch_size = 256
    c.checkpoint_every = 1000

    c.data.source = f"imagefolder:/path/to/{name}_lodo/{held}"  # python -m lfi_jax.evaluate lodo-layout ...
    c.data.train_split = "train"
    c.data.eval_splits = ("test",)
    c.data.image_size = 224
    c.data.augment = ml_collections.ConfigDict(
        dict(random_resized_crop=True, crop_scale=(0.5, 1.0), crop_ratio=(0.75, 4 / 3), hflip=True)
    )
    c.data.num_workers = 8

    c.model = ml_collections.ConfigDict(
        model_fields(size, image_size=224, num_classes=num_classes, dtype=PAPER_DTYPE, attn_impl="auto")
    )
    set_ablation(c, model)
    c.teacher.store = ""  # a LLaVA store of the layout's train split (python -m lfi_jax.teacher.export --teacher=llava)
    c.loss.align_weight = 1.0

    c.optim.lr = 1e-3
    c.optim.warmup_steps = 2 * steps_per_epoch
    c.optim.weight_decay = 0.05
    set_paper_init(c, model, scratch=a.get("init") == "scratch", scratch_lr=5e-4, scratch_warmup=5 * steps_per_epoch)

    if a.get("mode") == "runlocal":
        c.total_steps, c.batch_size, c.eval_batch_size = 4, 8, 8
        c.log_every, c.eval_every, c.checkpoint_every = 1, 0, 2
        c.optim.warmup_steps = 1
        c.data.image_size = c.model.image_size = 64
        c.model.dtype = "float32"
        c.data.num_workers = 0
    return c


def get_config(arg: str = "sketch,ivit") -> ml_collections.ConfigDict:
    return lodo_config(arg, name=NAME, domain_sizes=DOMAIN_SIZES, num_classes=len(CLASSES), default_domain="sketch")
