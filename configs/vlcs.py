"""VLCS leave-one-domain-out (the cross-domain setting of Table 5): train ViT / I-ViT on three
of VOC2007, LabelMe, Caltech101, SUN09 and test on the fourth.

    python -m lfi_jax.evaluate lodo-layout --root /data/VLCS --held_out SUN09 --out /data/vlcs_lodo/SUN09
    python -m lfi_jax.train --config=configs/vlcs.py:SUN09,ivit \
        --config.data.source=imagefolder:/data/vlcs_lodo/SUN09 \
        --config.teacher.store=/data/teachers/vlcs-sun09-llava \
        --config.init.hf=/models/vit-base-patch16-224-in21k --workdir=runs/vlcs_sun09_ivit

Arguments (comma-separated): the held-out domain (Caltech101 | LabelMe | SUN09 | VOC2007,
default SUN09), the model row of Table 3 (default ivit), the size (default B/16), optional
`scratch`, and `runlocal`. Layout VLCS/<domain>/<class>/<file> (DomainBed: classes bird, car,
chair, dog, person). Everything else as in configs/pacs.py.
"""

import os

import ml_collections

from lfi_jax.config import load_config_module

DOMAIN_SIZES = {"Caltech101": 1415, "LabelMe": 2656, "SUN09": 3282, "VOC2007": 3376}  # 10,729 images
CLASSES = ("bird", "car", "chair", "dog", "person")
NAME = "vlcs"


def get_config(arg: str = "SUN09,ivit") -> ml_collections.ConfigDict:
    pacs = load_config_module(os.path.join(os.path.dirname(os.path.abspath(__file__)), "pacs.py"))
    return pacs.lodo_config(arg, name=NAME, domain_sizes=DOMAIN_SIZES, num_classes=len(CLASSES), default_domain="SUN09")
