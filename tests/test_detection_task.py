"""The detection task end to end on the embedded benchmark with a tiny DETR / I-DETR."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

pytest.importorskip("lfi_jax.models.detr")
pytest.importorskip("pycocotools")

from flax import nnx  # noqa: E402

from lfi_jax.data.det_transforms import DetAugment, collate, transform_detection, valid_cells  # noqa: E402
from lfi_jax.data.shortcut_digits_det import ShortcutDigitsDet  # noqa: E402
from lfi_jax.models.detr import downsample_mask  # noqa: E402
from lfi_jax.tasks.detection import TASK  # noqa: E402
from lfi_jax.teacher.oracle_dense import dense_entry  # noqa: E402

OPTIONS = {"num_train": 6, "num_val": 3, "canvas": 64, "size_range": [12, 28]}


def _config():
    return ml_collections.ConfigDict(
        {
            "task": "detection",
            "batch_size": 2,
            "eval_batch_size": 2,
            "init": {"hf": ""},
            "teacher": {"store": "", "allow_missing": False},
            "model": {
                "backbone": {"embedding_size": 4, "hidden_sizes": [4, 8, 8], "depths": [1, 1, 1]},
                "hidden_size": 8, "encoder_layers": 1, "decoder_layers": 2, "encoder_heads": 2,
                "decoder_heads": 2, "encoder_ffn_dim": 8, "decoder_ffn_dim": 8, "num_queries": 6,
                "num_classes": 10, "dropout": 0.0, "interaction_queries": True, "interaction_constraint": True,
            },
            "loss": {"align_weight": 1.0, "dense_align": "matched_mean"},
            "data": {
                "source": "shortcut_digits_det", "train_split": "train", "options": OPTIONS,
                "augment": {"scales": [48, 64], "max_size": 64, "crop_pre_scales": [48, 64], "crop_size": [32, 48]},
                "eval_size": 64, "max_size": 64, "pad_hw": [64, 64], "max_boxes": 6,
            },
        }
    )


def test_iterators_are_deterministic_and_resumable():
    config = _config()
    mcfg = TASK.model_config(config)
    assert mcfg.backbone.stride == 16
    it = TASK.train_iterator(config, mcfg, config.teacher, seed=0)
    first = next(it)
    assert first["image"].shape == (2, 64, 64, 3) and first["key_mask"].shape == (2, 16)
    assert first["boxes"].shape == (2, 6, 4) and first["box_valid"].any()
    state = it.get_state()
    b2 = next(it)
    it.set_state(state)
    b3 = next(it)
    for k in b2:
        np.testing.assert_array_equal(b2[k], b3[k])
    pixel_mask = np.zeros((1, 64, 64), bool)
    pixel_mask[:, :48, :40] = True
    model_cells = np.asarray(downsample_mask(jnp.asarray(pixel_mask), (4, 4)))[0]
    np.testing.assert_array_equal(valid_cells((48, 40), (64, 64), (4, 4)), model_cells)


def _teacher_batch(config):
    src = ShortcutDigitsDet("train", OPTIONS)
    rng = np.random.default_rng(0)
    aug = DetAugment.from_config(config.data.augment)
    exs = [transform_detection(src[i], dense_entry(src[i], grid=8), rng=rng, augment=aug) for i in range(2)]
    return collate(exs, max_boxes=6, stride=16, pad_hw=(64, 64))


def _loss_setup():
    config = _config()
    mcfg = TASK.model_config(config)
    graphdef, state = nnx.split(TASK.new_model(mcfg, 0))
    batch = {k: jnp.asarray(v) for k, v in _teacher_batch(config).items()}
    assert float(batch["teacher_mask"].min()) == 1.0
    return config, graphdef, state, batch


def test_loss_is_criterion_plus_alignment_with_finite_gradients():
    config, graphdef, state, batch = _loss_setup()
    f = jax.value_and_grad(lambda st: TASK.loss(nnx.merge(graphdef, st), batch, config), has_aux=True)
    (total, aux), grads = jax.jit(f)(state)  # one compile for both (a DETR's backward compiles slowly)
    assert np.isfinite(float(total)) and float(aux["align_loss"]) > 0 and float(aux["task_loss"]) > 0
    np.testing.assert_allclose(float(total), float(aux["task_loss"] + aux["align_loss"]), rtol=1e-6)
    leaves = jax.tree.leaves(grads)
    assert all(np.isfinite(np.asarray(g)).all() for g in leaves)
    assert any(np.abs(np.asarray(g)).max() > 0 for g in leaves)


def test_eval_path_scores_ground_truth_one_and_an_untrained_model_low():
    config = _config()
    mcfg = TASK.model_config(config)
    batches = list(TASK.eval_iterator(config, mcfg, "val"))
    assert len(batches) == 2 and batches[1]["valid"].tolist() == [1.0, 0.0]
    # ground truth as the eval step's outputs (boxes from the source, in the eval image's fractions)
    src = ShortcutDigitsDet("val", OPTIONS)
    outs = []
    for b in batches:
        scores, labels, boxes = np.zeros((2, 6)), np.zeros((2, 6), np.int32), np.zeros((2, 6, 4))
        for r in range(2):
            if b["valid"][r]:
                rec = src[int(b["image_id"][r]) - 1]
                k = len(rec["boxes"])
                y0, x0, y1, x1 = (rec["boxes"] / 64.0).T
                scores[r, :k], labels[r, :k] = 1.0, rec["labels"]
                boxes[r, :k] = np.stack([x0, y0, x1, y1], -1)
                boxes[r, k:] = [0.0, 0.0, 0.01, 0.01]
        outs.append({"scores": scores, "labels": labels, "boxes": boxes, "image_id": b["image_id"],
                     "orig_size": b["orig_size"], "valid": b["valid"]})
    m = TASK.evaluate(config, "val", outs)
    assert m["val/num_images"] == 3
    np.testing.assert_allclose(m["val/AP"], 1 / (1 + np.spacing(1)), rtol=1e-9)
    # the untrained model through the jitted eval step
    model = TASK.new_model(mcfg, 0)
    graphdef, state = nnx.split(model)
    step = jax.jit(lambda st, b: TASK.eval_step(nnx.merge(graphdef, st), b))
    outs = [jax.tree.map(np.asarray, step(state, {k: jnp.asarray(v) for k, v in b.items()})) for b in batches]
    m = TASK.evaluate(config, "val", outs)
    assert set(m) >= {"val/AP", "val/AP50", "val/AP75", "val/APs", "val/APm", "val/APl"}
    assert m["val/AP50"] < 0.2


def test_dense_teacher_store_joins_the_train_pipeline(tmp_path):
    pytest.importorskip("array_record")
    from lfi_jax.data.sources import get_source
    from lfi_jax.teacher.export import export_store

    config = _config()
    mcfg = TASK.model_config(config)
    src = get_source("shortcut_digits_det", "train", OPTIONS)
    store = export_store(src, str(tmp_path / "store"), "oracle_dense", data_spec="shortcut_digits_det",
                         progress=False, grid=8)
    assert store is not None and len(store) == 6 and store.provenance is not None
    config.teacher.store = str(tmp_path / "store")
    batch = next(TASK.train_iterator(config, mcfg, config.teacher, seed=0))
    assert (batch["teacher_mask"] == 1).all()
    for t, km in zip(batch["teacher"], batch["key_mask"]):
        np.testing.assert_allclose(t[km].sum(), 1.0, atol=1e-5)
        assert (t[~km] == 0).all()
    # a store of other data is refused, naming both sides
    other = get_source("shortcut_digits_det", "train", {**OPTIONS, "clutter": True})
    export_store(other, str(tmp_path / "other"), "oracle_dense", data_spec="shortcut_digits_det",
                 progress=False, grid=8)
    config.teacher.store = str(tmp_path / "other")
    with pytest.raises(ValueError, match="clutter"):
        TASK.train_iterator(config, mcfg, config.teacher, seed=0)
