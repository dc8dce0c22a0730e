"""Start-up validation (lfi_jax.validate): wrong setups fail before the first step with one line
naming the config key and both sides."""

import os
from types import SimpleNamespace

import ml_collections
import numpy as np
import pytest
from PIL import Image

from lfi_jax import sharding as shd
from lfi_jax.config import load_config_file, validate
from lfi_jax.data.sources import get_source
from lfi_jax.errors import UserError
from lfi_jax.teacher.export import export_store
from lfi_jax.validate import (
    batch_device_count,
    check_batch_sizes,
    check_eval_splits,
    check_num_classes,
    validate_for_training,
)

CLASSES = tuple(f"c{i}" for i in range(10))


def make_folder(root, splits=(("train", 2), ("val", 1)), classes=CLASSES, size=(12, 10)):
    """root/<split>/<class>/<k>.png: `n` random RGB images per class."""
    rng = np.random.default_rng(0)
    for split, n in splits:
        for c in classes:
            d = os.path.join(root, split, c)
            os.makedirs(d, exist_ok=True)
            for k in range(n):
                Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(os.path.join(d, f"{k}.png"))
    return str(root)


def folder_config(path, **kw):
    c = load_config_file("demo", "vit,runlocal")
    c.data.source = f"imagefolder:{path}"
    c.data.options = {}
    c.data.eval_splits = ("val",)
    c.teacher.auto = ""
    for k, v in kw.items():
        node = c
        *parents, leaf = k.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = v
    return c


def mesh_of(shape, axes=("data", "fsdp")):
    if tuple(shape) == (1, 1):  # one device of the test's eight
        return SimpleNamespace(shape={"data": 1, "fsdp": 1}, axis_names=("data", "fsdp"))
    cfg = load_config_file("demo", "vit").mesh
    cfg.axes, cfg.shape = axes, shape
    return shd.make_mesh(cfg)


def _train_source(c):
    return get_source(c.data.source, c.data.train_split, c.data.options.to_dict())


def _fails(c, mesh, source, store=None):
    with pytest.raises(UserError) as e:
        validate_for_training(c, mesh, source, store)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_folder_setup_passes_and_reports(tmp_path):
    path = make_folder(tmp_path / "shapes")
    c = folder_config(path)
    report = validate_for_training(c, mesh_of((1, 1)), _train_source(c), None)
    assert report.classes == CLASSES and report.train_examples == 20
    assert report.eval_splits == (("val", 10),) and report.teacher is None and report.batch_devices == 1
    lines = report.lines()
    assert lines[0].startswith(f"data: imagefolder:{path} split train (20 examples), 10 classes: c0, c1")
    assert lines[1] == "eval splits: val (10)" and lines[2] == "teacher store: none"


@pytest.mark.parametrize("num_classes", [7, 200])
def test_wrong_class_count_names_key_and_both_numbers(tmp_path, num_classes):
    path = make_folder(tmp_path / "shapes")
    c = folder_config(path, **{"model.num_classes": num_classes})
    msg = _fails(c, mesh_of((1, 1)), _train_source(c))
    want = f"config.model.num_classes={num_classes} but the data (imagefolder:{path} split train) has 10 classes"
    assert msg.startswith(want)


def test_labels_beyond_the_head_are_refused():
    class Source:  # a source whose class list is absent but whose labels go up to 9
        name, split, class_names = "fake", "train", []

        def labels(self):
            return np.array([0, 3, 9])

    c = load_config_file("demo", "vit,runlocal")
    c.model.num_classes = 7
    with pytest.raises(UserError, match=r"num_classes=7 but the labels of fake split train range over \[0, 9\]"):
        check_num_classes(c, Source())


def test_missing_eval_split_names_split_and_source(tmp_path):
    path = make_folder(tmp_path / "shapes")
    c = folder_config(path, **{"data.eval_splits": ("val", "test_iid")})  # the demo's default split name
    msg = _fails(c, mesh_of((1, 1)), _train_source(c))
    assert f"config.data.eval_splits: split 'test_iid' of data.source='imagefolder:{path}' cannot be opened" in msg
    assert os.path.join(path, "test_iid") in msg


def test_corrupt_eval_image_names_the_file(tmp_path):
    path = make_folder(tmp_path / "shapes")
    bad = os.path.join(path, "val", "c0", "0.png")  # the split's first example
    with open(bad, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n not an image")
    c = folder_config(path)
    msg = _fails(c, mesh_of((1, 1)), _train_source(c))
    assert msg.startswith("config.data.eval_splits: split 'val' of ") and "first example 'c0/0.png'" in msg
    assert bad in msg


def test_eval_split_with_other_classes(tmp_path):
    class Opener:
        def __call__(self, spec, split, options):
            src = get_source(spec, split, options)
            src.class_names = list(CLASSES[:5])
            return src

    path = make_folder(tmp_path / "shapes")
    c = folder_config(path)
    with pytest.raises(UserError, match=r"split 'val' of .* has classes \[c0, c1, c2, c3, c4\] but the train split"):
        check_eval_splits(c, _train_source(c), open_source=Opener())


def test_batch_sizes_against_devices():
    c = load_config_file("demo", "vit,runlocal")
    # hand-worked: 8 devices on (data, fsdp); the tensor axis does not split the batch
    assert batch_device_count(mesh_of((4, 2))) == 8
    assert batch_device_count(mesh_of((2, 2, 2), ("data", "fsdp", "tensor"))) == 4
    c.batch_size, c.optim.grad_accum_steps, c.eval_batch_size = 64, 4, 64
    assert check_batch_sizes(c, mesh_of((4, 2))) == 8  # micro-batch 16 over 8 devices
    c.optim.grad_accum_steps = 16  # micro-batch 4 over 8 devices
    with pytest.raises(UserError, match=r"batch_size / config.optim.grad_accum_steps = 64 / 16 = 4 .* 8 devices"):
        check_batch_sizes(c, mesh_of((4, 2)))
    c.optim.grad_accum_steps, c.batch_size = 1, 12
    with pytest.raises(UserError, match=r"config.batch_size=12 is not divisible by the 8 devices"):
        check_batch_sizes(c, mesh_of((8, 1)))
    c.batch_size, c.eval_batch_size = 16, 20
    with pytest.raises(UserError, match=r"config.eval_batch_size=20 is not divisible by the 8 devices"):
        check_batch_sizes(c, mesh_of((-1, 1)))
    c.eval_batch_size = 20
    assert check_batch_sizes(c, mesh_of((2, 1, 4), ("data", "fsdp", "tensor"))) == 2


def test_embedded_benchmark_runlocal_with_its_teacher(tmp_path):
    c = load_config_file("demo", "ivit,runlocal")  # shortcut regime, 256 train examples
    src = _train_source(c)
    store_dir = str(tmp_path / "store")
    export_store(src, store_dir, grid=7, data_spec=c.data.source, progress=False)
    report = validate_for_training(c, mesh_of((1, 1)), src, store_dir)
    assert report.teacher == store_dir and report.teacher_missing == 0
    assert report.eval_splits == (("test_iid", 64), ("test_shifted", 64))
    assert report.classes == tuple(str(i) for i in range(10))
    # the same store for a clean-regime run: refused, naming both sides
    clean = load_config_file("demo", "ivit,clean,runlocal")
    msg = _fails(clean, mesh_of((1, 1)), _train_source(clean), store_dir)
    assert msg.startswith(f"config.teacher.store: teacher store {store_dir} does not fit")
    assert "spurious_p" in msg and "0.7" in msg and "0.0" in msg
    # validated before the store exists (teacher=False), the store checked afterwards
    assert validate_for_training(clean, mesh_of((1, 1)), _train_source(clean), None, teacher=False).teacher is None
    # no store while the model reads one
    msg = _fails(c, mesh_of((1, 1)), src, None)
    assert msg.startswith("config.model.interaction_constraint is on but no teacher store is in use")


def test_static_config_errors_are_user_errors(tmp_path):
    path = make_folder(tmp_path / "shapes")
    c = folder_config(path, **{"model.image_size": 64})  # divisible by the demo's patch (8), unlike data's 48
    msg = _fails(c, mesh_of((1, 1)), _train_source(c))
    assert "config.model.image_size=64 differs from config.data.image_size" in msg


def test_eval_split_of_a_flat_folder_would_be_the_training_images(tmp_path):
    root = tmp_path / "flat"  # root/<class>/<file>: every split name reads the same images
    for c in CLASSES[:2]:
        os.makedirs(root / c)
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / c / "0.png")
    c = folder_config(str(root), **{"model.num_classes": 2})
    msg = _fails(c, mesh_of((1, 1)), _train_source(c))
    assert msg.startswith(f"config.data.eval_splits: split 'val' of imagefolder:{root} has no directory of its own")
    c.data.eval_splits = ()
    assert validate_for_training(c, mesh_of((1, 1)), _train_source(c)).eval_splits == ()


@pytest.mark.parametrize(
    "name,arg,head", [("pacs", "sketch,vit,runlocal", 7), ("tinyimagenet", "Ti/16,vit,runlocal", 200)]
)
def test_paper_configs_on_ten_class_data_are_refused(tmp_path, name, arg, head):
    path = make_folder(tmp_path / "shapes", splits=(("train", 1), ("test", 1), ("val", 1)))
    c = load_config_file(name, arg)
    c.data.source = f"imagefolder:{path}"
    c.init.hf = ""
    msg = _fails(c, mesh_of((1, 1)), _train_source(c))
    want = f"config.model.num_classes={head} but the data (imagefolder:{path} split train) has 10 classes"
    assert msg.startswith(want)


def test_other_tasks_skip_the_vit_checks(tmp_path):
    path = make_folder(tmp_path / "shapes")
    c = folder_config(path)
    c.task = "detection"  # its model config is the task's business (no ViT fields, no data.image_size check)
    c.model = ml_collections.ConfigDict(dict(backbone="resnet50", num_queries=10, interaction_constraint=False))
    c.teacher.auto = "oracle_dense"
    validate(c)
    opened = []

    def open_split(spec, split, options):  # the task's own source, e.g. `task.source(config, split)`
        opened.append(split)
        return get_source(spec, split, options)

    report = validate_for_training(c, mesh_of((1, 1)), _train_source(c), None, open_source=open_split)
    assert opened == ["val"] and report.classes == CLASSES
    c.model.interaction_constraint = True
    c.teacher.auto = ""
    with pytest.raises(UserError, match="interaction_constraint is on but no teacher is configured"):
        validate(c)
