"""configs/imagefolder.py and the recipe in docs/data.md: the documented commands run as
written on a tiny generated folder (a few steps), and the config reads the folder."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from lfi_jax.config import load_config_file, validate
from lfi_jax.data.sources import get_source
from lfi_jax.errors import UserError
from lfi_jax.teacher.export import export_store

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOC = os.path.join(ROOT, "docs", "data.md")


def recipe_block(marker: str) -> str:
    """The fenced block right after `<!-- recipe: MARKER -->` in docs/data.md."""
    text = open(DOC).read()
    m = re.search(r"<!-- recipe: " + re.escape(marker) + r" -->\n```bash\n(.*?)\n```", text, re.S)
    assert m, f"no '{marker}' recipe block in {DOC}"
    return m.group(1)


def _env():
    return dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))


def _bash(script: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=cwd, env=_env(),
                          capture_output=True, text=True, timeout=900)


class _UniformMaskSource:
    """The folder's train split with a full-image mask per example: the oracle backend then
    writes a valid store for it (the stand-in for the LLaVA export, which needs torch)."""

    def __init__(self, base):
        self.base, self.name, self.split, self.class_names = base, base.name, base.split, base.class_names

    def __len__(self):
        return len(self.base)

    def example_id(self, i):
        return self.base.example_id(i)

    def __getitem__(self, i):
        ex = dict(self.base[i])
        ex["mask"] = np.ones(ex["image"].shape[:2], np.float32)
        return ex


def test_recipe_runs_as_written(tmp_path):
    r = _bash(recipe_block("run"), tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads([line for line in r.stdout.splitlines() if line.startswith("{")][0])
    assert result["step"] == 4 and result["val/count"] == 12
    ev = json.load(open(tmp_path / "runs/shapes_check/eval/val.json"))
    assert "accuracy" in json.dumps(ev)
    assert (tmp_path / "exported/shapes_check/model.safetensors").is_file()
    hf = json.load(open(tmp_path / "exported/shapes_check/config.json"))
    assert hf["id2label"] == {"0": "circle", "1": "square", "2": "triangle"}  # as docs/data.md says
    assert sorted(os.listdir(tmp_path / "shapes")) == ["train", "val"]

    # the I-ViT block, with a store standing in for the LLaVA export of step 3
    base = get_source(f"imagefolder:{tmp_path / 'shapes'}", "train")
    base.name = "imagefolder:shapes"  # the spec the documented commands use
    src = _UniformMaskSource(base)
    export_store(src, str(tmp_path / "stores/shapes_llava"), grid=4, data_spec="imagefolder:shapes", progress=False)
    r = _bash(recipe_block("run with a store"), tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "teacher store: stores/shapes_llava" in r.stderr


def test_wrong_class_count_stops_before_anything_is_written(tmp_path):
    make_shapes(tmp_path / "shapes", classes=("a", "b", "c"))
    r = subprocess.run(
        [sys.executable, "-m", "lfi_jax.train", "--config=configs/imagefolder.py:shapes,vit,runlocal",
         "--config.model.num_classes=7", "--workdir=runs/x"],
        cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=600,
    )
    assert r.returncode == 2, r.stderr[-3000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "config.model.num_classes=7" in errors[0] and "has 3 classes" in errors[0]
    assert not (tmp_path / "runs" / "x" / "config.json").exists()


def make_shapes(root, splits=(("train", 2), ("val", 1)), classes=("circle", "square")):
    rng = np.random.default_rng(0)
    for split, n in splits:
        for c in classes:
            os.makedirs(root / split / c, exist_ok=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (9, 11, 3), dtype=np.uint8)).save(root / split / c / f"{i}.png")
    return root


def test_config_reads_classes_splits_and_size_from_the_folder(tmp_path, monkeypatch):
    root = make_shapes(tmp_path / "shapes", splits=(("train", 70), ("val", 1), ("test", 1)), classes=("b", "a", "c"))
    c = load_config_file("imagefolder", f"{root},vit,B/16,384")
    assert c.data.source == f"imagefolder:{root}" and c.data.eval_splits == ("test", "val")
    assert c.model.num_classes == 3 and c.model.hidden_size == 768 and c.model.patch_size == 16
    assert c.data.image_size == c.model.image_size == 384
    assert not c.model.interaction_queries and not c.model.interaction_constraint
    # 210 training images at batch 64: 3 steps per epoch, 30 epochs (hand-worked)
    assert c.total_steps == 90 and c.eval_every == 15 and c.name == "shapes-vit-B16"
    validate(c)
    monkeypatch.chdir(tmp_path)  # a relative folder is taken from the current directory
    ic = load_config_file("configs/imagefolder.py", "shapes,ic_only,frozen")
    assert ic.data.source == f"imagefolder:{root}" and ic.model.interaction_constraint
    assert ic.optim.freeze == (".*",) and any("attention/query" in p for p in ic.optim.trainable)
    local = load_config_file("imagefolder", "shapes,runlocal")
    assert local.total_steps == 4 and local.model.image_size == 32 and local.model.interaction_queries


def test_flat_folder_trains_on_everything_and_evaluates_nothing(tmp_path):
    root = tmp_path / "flat"
    for c in ("x", "y"):
        os.makedirs(root / c)
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / c / "0.png")
    c = load_config_file("imagefolder", f"{root},vit")
    assert c.data.eval_splits == () and c.eval_every == 0 and c.model.num_classes == 2


def test_config_argument_errors(tmp_path):
    with pytest.raises(UserError, match="needs the folder"):
        load_config_file("imagefolder", "")
    with pytest.raises(FileNotFoundError, match="folder not found: .*nowhere"):
        load_config_file("imagefolder", str(tmp_path / "nowhere"))
    make_shapes(tmp_path / "shapes")
    with pytest.raises(UserError, match="unknown argument 'resnet'"):
        load_config_file("imagefolder", f"{tmp_path / 'shapes'},resnet")
