"""lfi_jax.pretrain_backbone: the crops sit on the boxes, and the written file is the backbone
that trained (it loads through init.backbone's reader into a DETR, tensor for tensor)."""

import os

import numpy as np

from lfi_jax.config import load_config_file
from lfi_jax.models.convert.detr import to_hf_detr_state_dict
from lfi_jax.pretrain_backbone import CROP, box_crops, pretrain_backbone
from lfi_jax.tasks.detection import load_backbone, model_config, new_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class _Source:
    """One 40 x 60 image, 0 everywhere but 1 in rows 10-19, cols 30-49 (one box there, label 3)."""

    def __len__(self):
        return 1

    def __getitem__(self, i):
        image = np.zeros((40, 60, 3), np.uint8)
        image[10:20, 30:50] = 255
        return {"image": image, "boxes": np.float32([[10, 30, 20, 50]]), "labels": np.int64([3])}


def test_crop_is_the_box_with_a_margin():
    x, y = box_crops(_Source(), (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    assert x.shape == (1, CROP, CROP, 3) and y.tolist() == [3]
    # square side 1.2 * 20 + 2 = 26 around the centre (15, 40): rows 2..28, cols 27..53 of the image;
    # the box covers rows 10-19 of that window (8/26..18/26 of it) and cols 3/26..23/26
    crop = x[0, ..., 0]
    rows = np.flatnonzero(crop[:, CROP // 2] > 0.5)
    cols = np.flatnonzero(crop[CROP // 2] > 0.5)
    assert abs(rows[0] - 8 / 26 * CROP) <= 1.5 and abs(rows[-1] + 1 - 18 / 26 * CROP) <= 1.5, rows
    assert abs(cols[0] - 3 / 26 * CROP) <= 1.5 and abs(cols[-1] + 1 - 23 / 26 * CROP) <= 1.5, cols


def test_written_backbone_loads_into_detr(tmp_path):
    config = load_config_file(os.path.join(REPO, "configs", "detection_demo.py"), "detr,runlocal")
    out = str(tmp_path / "bb.safetensors")
    res = pretrain_backbone(config, out, log=lambda m: None)
    assert os.path.exists(out) and 0.0 <= res.val_accuracy <= 1.0 and res.train_crops > 0
    mcfg = model_config(config)
    fresh = new_model(mcfg, 123)
    before = {k: v for k, v in to_hf_detr_state_dict(fresh).items() if k.startswith("model.backbone.")}
    loaded = load_backbone(new_model(mcfg, 123), out)
    from safetensors.numpy import load_file

    want = load_file(out)
    got = to_hf_detr_state_dict(loaded)
    assert set(want) == set(before)
    for k, v in want.items():
        np.testing.assert_array_equal(got[k], v, err_msg=k)
    # the trained convolutions differ from a fresh model's (the file is not a copy of an init)
    conv = [k for k in want if k.endswith("convolution.weight")]
    assert any(not np.array_equal(want[k], before[k]) for k in conv)
