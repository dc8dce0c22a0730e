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


# --------------------------------------------------------------------------- Conditional-DETR, init


def _cond_config(**model):
    config = _config()
    config.model.arch = "conditional_detr"
    config.model.update(model)
    return config


def _params(model):
    return {tuple(p): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def test_model_arch_selects_conditional_detr_and_unset_gate_bias_follows_init():
    from lfi_jax.models.conditional_detr import ConditionalDetr, ConditionalDetrConfig
    from lfi_jax.models.detr import PRETRAINED_GATE_BIAS, DetrConfig

    config = _cond_config(gate_bias_init=None)
    mcfg = TASK.model_config(config)
    assert type(mcfg) is ConditionalDetrConfig and mcfg.gate_bias_init == (0.0, 0.0)
    assert isinstance(TASK.new_model(mcfg, 0), ConditionalDetr)
    config.init.hf = "/some/checkpoint"
    assert TASK.model_config(config).gate_bias_init == PRETRAINED_GATE_BIAS
    assert type(TASK.model_config(_config())) is DetrConfig
    config.model.arch = "yolo"
    with pytest.raises(ValueError, match="model.arch"):
        TASK.model_config(config)


def test_load_model_takes_non_architecture_fields_from_the_config(tmp_path):
    """A DETR checkpoint into a config differing in gate_bias_init / gate_hidden / dropout (not
    architecture): every tensor is the checkpoint's, the run's fields are the config's."""
    from lfi_jax.models.convert.detr import save_hf_detr

    config = _config()
    config.model.update(dict(interaction_queries=False, interaction_constraint=False))
    saved = TASK.new_model(TASK.model_config(config), 7)
    save_hf_detr(saved, str(tmp_path / "detr"))
    config.model.update(dict(gate_bias_init=(1.0, 2.0), gate_hidden=4, dropout=0.2))
    config.init.hf = str(tmp_path / "detr")
    mcfg = TASK.model_config(config)
    got = TASK.load_model(config, mcfg, 0)
    assert got.cfg == mcfg
    want = _params(saved)
    assert _params(got).keys() == want.keys()
    for p, v in _params(got).items():
        np.testing.assert_array_equal(v, want[p], err_msg=str(p))


def test_conditional_detr_checkpoint_into_an_i_model_keeping_the_source_class_rows(tmp_path):
    from lfi_jax.models.convert.conditional_detr import save_hf_conditional_detr
    from lfi_jax.models.detr import PRETRAINED_GATE_BIAS

    few = dict(OPTIONS, classes=3, shots=2, class_seed=0)
    config = _cond_config(num_classes=11, interaction_queries=False, interaction_constraint=False)
    saved = TASK.new_model(TASK.model_config(config), 3)
    # a checkpoint whose id2label names the digits by category id (1 -> "0", ..., 10 -> "9")
    save_hf_conditional_detr(saved, str(tmp_path / "cd"), id2label={0: "N/A", **{i: str(i - 1) for i in range(1, 11)}})
    config = _cond_config(num_classes=3, gate_bias_init=None)
    config.data.options = few
    config.init.hf = str(tmp_path / "cd")
    mcfg = TASK.model_config(config)
    got = TASK.load_model(config, mcfg, 0)
    src = ShortcutDigitsDet("train", few)
    cats = src.category_ids
    assert len(cats) == 3 and src.class_names == [str(c - 1) for c in cats]
    g, s = _params(got), _params(saved)
    head = "class_labels_classifier"
    np.testing.assert_array_equal(g[(head, "kernel")], s[(head, "kernel")][:, cats])
    np.testing.assert_array_equal(g[(head, "bias")], s[(head, "bias")][cats])
    for i in range(mcfg.decoder_layers):
        for leaf in ("kernel", "bias"):
            np.testing.assert_array_equal(g[("decoder", "layers", i, "encoder_attn", "interaction_query", leaf)],
                                          s[("decoder", "layers", i, "ca_qcontent_proj", leaf)])
        b2 = g[("decoder", "layers", i, "encoder_attn", "gate", "b2")]  # [heads, 2]: the gate's output bias
        np.testing.assert_array_equal(b2, np.tile(PRETRAINED_GATE_BIAS, (len(b2), 1)))
    for p, v in s.items():
        if p[0] != "class_labels_classifier":
            np.testing.assert_array_equal(g[p], v, err_msg=str(p))
    # class_head="fresh": a new head, not the checkpoint's rows
    config.init.class_head = "fresh"
    fresh = _params(TASK.load_model(config, mcfg, 0))[("class_labels_classifier", "kernel")]
    assert fresh.shape == (8, 3) and not np.allclose(fresh, s[("class_labels_classifier", "kernel")][:, cats])


def test_init_backbone_reads_a_transformers_resnet(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    config = _cond_config()
    mcfg = TASK.model_config(config)
    bb = mcfg.backbone
    hf = transformers.ResNetConfig(embedding_size=bb.embedding_size, hidden_sizes=list(bb.hidden_sizes),
                                   depths=list(bb.depths), layer_type=bb.layer_type,
                                   downsample_in_first_stage=bb.downsample_in_first_stage,
                                   downsample_in_bottleneck=bb.downsample_in_bottleneck)
    torch.manual_seed(0)
    ref = transformers.ResNetModel(hf).eval()
    with torch.no_grad():  # non-trivial frozen statistics
        for m in ref.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.3, 0.3)
    ref.save_pretrained(str(tmp_path / "resnet"))
    config.init.backbone = str(tmp_path / "resnet")
    model = TASK.load_model(config, mcfg, 0)
    x = np.random.default_rng(0).normal(size=(1, 3, 32, 48)).astype(np.float32)
    with torch.no_grad():
        want = ref(torch.as_tensor(x)).last_hidden_state.numpy().transpose(0, 2, 3, 1)
    got = np.asarray(model.backbone(jnp.asarray(x.transpose(0, 2, 3, 1)))[-1])
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    config.init.hf = "/elsewhere"
    with pytest.raises(ValueError, match="set one"):
        TASK.load_model(config, mcfg, 0)


def _runlocal(tmp_path, name, arg):
    from lfi_jax.config import load_config_file
    from lfi_jax.data.sources import get_source
    from lfi_jax.teacher.export import export_store
    from lfi_jax.train import train_and_evaluate

    c = load_config_file(name, arg)
    c.total_steps, c.checkpoint_every = 2, 0
    if c.model.interaction_constraint:  # a dense oracle store of the whole train split
        pytest.importorskip("array_record")
        opts = {k: v for k, v in c.data.options.to_dict().items() if k != "subset_seed"}
        src = get_source(c.data.source, c.data.train_split, opts)
        export_store(src, str(tmp_path / "store"), "oracle_dense", data_spec=c.data.source, progress=False,
                     grid=int(c.teacher.get("grid", 16)))
        c.teacher.store = str(tmp_path / "store")
    out = train_and_evaluate(c, str(tmp_path / "run"))
    assert out["step"] == 2 and np.isfinite(out["val/AP"]) and 0.0 <= out["val/AP50"] <= 1.0
    return c, out


@pytest.mark.slow  # compiles a Conditional-DETR train step
def test_conddetr_demo_iconddetr_runlocal_trains_and_evaluates(tmp_path):
    c, _ = _runlocal(tmp_path, "conddetr_demo", "iconddetr,runlocal")
    assert c.model.arch == "conditional_detr" and c.model.interaction_queries


@pytest.mark.slow  # compiles a Conditional-DETR train step
def test_voc_conddetr_runlocal_trains_and_evaluates_on_a_subset(tmp_path):
    import json

    c, _ = _runlocal(tmp_path, "voc_conddetr", "runlocal")
    info = json.loads((tmp_path / "run" / "run_info.json").read_text())
    assert c.data.data_ratio == 0.5 and c.model.interaction_constraint
    assert info["data"]["num_examples"] == 9  # the subset: 3 of each class's 6 few-shot train images
