"""The LLaVA teacher against an independent computation on a tiny random LLaVA.

The reference takes the same conversation through a plain forward with
`output_attentions=True`, finds the spans by searching token-id subsequences (not character
offsets), averages heads / span tokens / layers by hand and applies Eq. 11/12 by hand.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from PIL import Image, ImageDraw  # noqa: E402

from lfi_jax.data.sources import get_source  # noqa: E402
from lfi_jax.data.transforms import render_teacher  # noqa: E402
from lfi_jax.teacher import export, llava_export, show  # noqa: E402
from lfi_jax.teacher import llava_conv as conv  # noqa: E402
from lfi_jax.teacher.export import export_store  # noqa: E402
from lfi_jax.teacher.llava import LlavaTeacher  # noqa: E402
from lfi_jax.teacher.llava_export import export_backend  # noqa: E402
from lfi_jax.teacher.store import TeacherStore  # noqa: E402
from lfi_jax.teacher.types import Geometry, TeacherEntry  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from tiny_llava import build_tiny_llava  # noqa: E402

BG = "the surrounding scene"


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    # These models are tiny: one intra-op thread is fastest, and on a busy machine a thread
    # pool spinning for cores it does not get is 10-40x slower.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_llava(tmp_path_factory.mktemp("llava") / "tiny")


@pytest.fixture(scope="module")
def teacher(tiny):
    return LlavaTeacher(tiny, batch_size=4, device="cpu")


@pytest.fixture(scope="module")
def ref_model(tiny):
    proc = transformers.AutoProcessor.from_pretrained(tiny)
    model = transformers.LlavaForConditionalGeneration.from_pretrained(tiny, attn_implementation="eager").eval()
    return proc, model


def _images():
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in [(20, 40), (32, 32), (50, 30), (17, 23)]]


def _find_all(seq, sub):
    return [i for i in range(len(seq) - len(sub) + 1) if seq[i : i + len(sub)] == sub]


def reference_map(ref, image, names, *, task="classify", background=BG, layers=None, boxes=None, strategy_extra=0):
    """Independent C_vlm: output_attentions + spans by token-id subsequence search."""
    proc, model = ref
    tok = proc.tokenizer
    if task == "classify":
        prompt, response = "Classify foreground vs. background", f"foreground: {names[0]}, background: {background}"
    else:
        prompt = f"Locate all {names[0]} instances"
        response = f"objects: {', '.join(names)}, background: {background}"
        im = Image.fromarray(image)
        d = ImageDraw.Draw(im)
        lw = max(1, round(0.01 * max(image.shape[:2])))
        for y0, x0, y1, x1 in boxes:
            d.rectangle([x0, y0, x1 - 1, y1 - 1], outline=(255, 0, 0), width=lw)
        image = np.asarray(im)
    chat = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]},
        {"role": "assistant", "content": [{"type": "text", "text": response}]},
    ]
    text = proc.apply_chat_template(chat, tokenize=False)
    enc = proc(text=[text], images=[Image.fromarray(image)], return_tensors="pt")
    with torch.no_grad():
        att = model(**enc, output_attentions=True).attentions
    ids = enc["input_ids"][0].tolist()
    img_cols = [i for i, t in enumerate(ids) if t == model.config.image_token_id][strategy_extra:]
    def blank(i):
        return not tok.decode([i]).strip()

    def rows(words, k):
        sub = tok.encode(" " + words, add_special_tokens=False)
        starts = _find_all(ids, sub)[-k:]  # the response comes last
        assert len(starts) == k, (words, sub, ids)
        # A span's rows: its tokens, less any token that is only blank.
        return [[s + j for j in range(len(sub)) if not blank(sub[j])] for s in starts]

    layers = range(len(att)) if layers is None else layers

    def c(r):
        per_layer = [att[l][0][:, r][:, :, img_cols].double().mean(dim=(0, 1)) for l in layers]
        return torch.stack(per_layer).mean(0).numpy()

    fore = sum(c(r) for r in rows(names[0], len(names)))
    back = c(rows(background, 1)[0])
    d = np.maximum(fore - back, 0)
    return d / d.sum()


def test_map_matches_output_attentions(teacher, ref_model):
    imgs = _images()
    names = ["cat", "dog", "bird", "horse"]
    entries = teacher.maps(imgs, names)
    for img, name, e in zip(imgs, names, entries):
        assert e.map.shape == (4, 4) and e.map.dtype == np.float32 and not e.degenerate
        ref = reference_map(ref_model, img, [name]).reshape(4, 4)
        np.testing.assert_allclose(e.map, ref, atol=2e-6)
        assert abs(e.map.sum() - 1) < 1e-5
    # The maps carry structure (a wrong column or span would not match by chance).
    assert np.std(entries[0].map) > 1e-3
    assert not np.allclose(entries[0].map, entries[1].map, atol=1e-3)


def test_batched_equals_one_at_a_time(tiny, teacher):
    imgs = _images()
    names = ["cat", "golden_retriever", "bird", "horse"]  # different lengths: left padding
    one = LlavaTeacher(tiny, batch_size=1, device="cpu")
    lens = {len(teacher.processor.tokenizer(conv.clean_name(n))["input_ids"]) for n in names}
    assert len(lens) > 1
    for a, b in zip(teacher.maps(imgs, names), one.maps(imgs, names)):
        np.testing.assert_allclose(a.map, b.map, atol=1e-6)
        assert a.geometry == b.geometry


def test_layer_subset(tiny, ref_model):
    t = LlavaTeacher(tiny, layers="1", device="cpu")
    img = _images()[0]
    (e,) = t.maps([img], ["cat"])
    np.testing.assert_allclose(e.map.ravel(), reference_map(ref_model, img, ["cat"], layers=[1]), atol=2e-6)
    assert t.provenance()["layers"] == [1]


def test_dense_with_boxes(tiny, ref_model):
    t = LlavaTeacher(tiny, task="dense", device="cpu", batch_size=2)
    imgs = _images()[:2]
    boxes = [np.array([[2, 3, 12, 15], [5, 20, 18, 38]], np.float32), np.array([[4, 4, 20, 28]], np.float32)]
    entries = t.maps(imgs, ["dog", "cat"], boxes)
    for img, bx, name, e in zip(imgs, boxes, ["dog", "cat"], entries):
        ref = reference_map(ref_model, img, [name] * len(bx), task="dense", boxes=bx)
        np.testing.assert_allclose(e.map.ravel(), ref, atol=2e-6)
    with pytest.raises(ValueError, match="at least one box"):
        t.maps([imgs[0]], ["dog"], [np.zeros((0, 4))], ids=["img7"])


def test_background_generate(tiny, ref_model):
    t = LlavaTeacher(tiny, background="generate", background_max_tokens=4, device="cpu", batch_size=2)
    imgs = _images()[:2]
    entries = t.maps(imgs, ["cat", "dog"])
    for img, name, e in zip(imgs, ["cat", "dog"], entries):
        words = e.meta["background_words"]
        assert words and "\n" not in words
        if e.meta.get("background_fallback"):
            assert words == BG
        np.testing.assert_allclose(e.map.ravel(), reference_map(ref_model, img, [name], background=words), atol=2e-6)
    assert t.provenance()["background"] == "generate"


def test_full_feature_strategy_drops_cls(tmp_path):
    path = build_tiny_llava(tmp_path / "full", select_strategy="full", image_size=48, patch_size=12)
    t = LlavaTeacher(path, device="cpu")
    assert (t.grid_h, t.grid_w, t.num_image_tokens) == (4, 4, 17)
    proc = transformers.AutoProcessor.from_pretrained(path)
    model = transformers.LlavaForConditionalGeneration.from_pretrained(path, attn_implementation="eager").eval()
    img = _images()[2]
    (e,) = t.maps([img], ["cat"])
    np.testing.assert_allclose(e.map.ravel(), reference_map((proc, model), img, ["cat"], strategy_extra=1), atol=2e-6)


@pytest.mark.parametrize(
    "settings",
    [
        dict(do_pad=True, size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        dict(do_pad=False, size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        dict(do_pad=False, do_center_crop=False, size={"height": 32, "width": 32}),
        dict(do_pad=False, size={"shortest_edge": 24}, crop_size={"height": 32, "width": 32}),
    ],
)
def test_geometry_matches_the_processor(settings):
    """A bright block's centre lands where the geometry says, for pad, crop, resize."""
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

    ip = LlavaImageProcessorPil(do_rescale=False, do_normalize=False, **settings)
    checked = 0
    for h, w in [(20, 40), (50, 30), (17, 23), (17, 24), (64, 64)]:
        img = np.zeros((h, w, 3), np.uint8)
        y0, x0, y1, x1 = h // 4, w // 3, h // 4 + h // 2, w // 3 + w // 3
        img[y0:y1, x0:x1] = 255
        geom, (oh, ow) = conv.processor_geometry(ip, h, w)
        out = np.asarray(ip(images=[img], return_tensors="np")["pixel_values"][0], np.float64)[0]
        assert out.shape == (oh, ow)
        yy, xx = np.mgrid[0:oh, 0:ow] + 0.5
        wgt = np.clip(out - 160.0, 0, None)  # the block only (padding is CLIP-mean grey)
        cy, cx = (wgt * yy).sum() / wgt.sum(), (wgt * xx).sum() / wgt.sum()
        gy0, gx0, gy1, gx1 = geom.box
        # The block's centre in processed pixels, through the geometry (block fully visible).
        py = ((y0 + y1) / 2 - gy0) * oh / (gy1 - gy0)
        px = ((x0 + x1) / 2 - gx0) * ow / (gx1 - gx0)
        if 0 <= (y0 - gy0) and (y1 - gy0) <= gy1 - gy0 and 0 <= (x0 - gx0) and (x1 - gx0) <= gx1 - gx0:
            assert abs(cy - py) < 0.3 and abs(cx - px) < 0.3, (h, w, settings, (cy, cx), (py, px))
            checked += 1
        assert geom.image_hw == (h, w)
    assert checked >= 3


def test_geometry_by_hand():
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

    pad = LlavaImageProcessorPil(do_pad=True, size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
    assert conv.processor_geometry(pad, 480, 640)[0].box == (-80.0, 0.0, 560.0, 640.0)
    crop = LlavaImageProcessorPil(do_pad=False, size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
    g, hw = conv.processor_geometry(crop, 480, 640)  # -> 336 x 448, crop columns 56..392
    assert hw == (336, 336)
    np.testing.assert_allclose(g.box, (0.0, 80.0, 480.0, 560.0))


def test_spans_layers_templates():
    text = "abcd: cat, x"
    offs = [(0, 0), (0, 4), (4, 5), (5, 9), (9, 10), (10, 11), (11, 12)]  # <s> abcd : _cat , _ x
    assert conv.span_token_positions(text, offs, 6, 9) == [3]
    assert conv.span_token_positions(text, offs, 0, 5) == [1, 2]
    assert conv.span_token_positions(text, offs, 10, 12) == [6]  # the lone blank is not "x"
    with pytest.raises(ValueError):
        conv.span_token_positions(text, offs, 20, 22)
    assert conv.parse_layers("all", 4) == [0, 1, 2, 3]
    assert conv.parse_layers("-2:", 4) == [2, 3]
    assert conv.parse_layers("0,3,3", 4) == [0, 3]
    for bad in ("7", "x", "3:1"):
        with pytest.raises(ValueError, match="--layers"):
            conv.parse_layers(bad, 4)
    r = conv.build_response(conv.DENSE_RESPONSE, objects=["dog", "dog"], background="grass", task="dense")
    assert r.text == "objects: dog, dog, background: grass"
    assert [r.text[a:b] for _, a, b in r.spans] == ["dog", "dog", "grass"]
    assert r.prefix_before_background() == "objects: dog, dog, background:"
    with pytest.raises(ValueError, match="--response-template"):
        conv.check_templates("classify", conv.CLASSIFY_PROMPT, "foreground: {class_name}")
    with pytest.raises(ValueError, match="--prompt"):
        conv.check_templates("dense", "Locate things", conv.DENSE_RESPONSE)


def test_degenerate_flagged_not_replaced():
    m, deg, why = conv.map_from_spans(np.array([[0.1, 0.2], [0.3, 0.4]]), ["fore", "back"])
    assert deg and why and not m.any()
    m, deg, _ = conv.map_from_spans(np.array([[0.3, 0.1], [0.1, 0.2], [0.2, 0.2]]), ["obj0", "obj1", "back"])
    np.testing.assert_allclose(m, [0.2 / 0.3, 0.1 / 0.3], rtol=1e-6)
    assert not deg


class _Source:
    name, split = "fake", "train"

    def __init__(self, images, labels, class_names, broken=()):
        self.images, self.labels, self.class_names, self.broken = images, labels, class_names, set(broken)

    def __len__(self):
        return len(self.images)

    def example_id(self, i):
        return f"ex{i:03d}"

    def __getitem__(self, i):
        if i in self.broken:
            raise ValueError(f"cannot decode image file /data/ex{i:03d}.png")
        return {"id": self.example_id(i), "image": self.images[i], "label": self.labels[i]}


def test_backend_and_bad_inputs(tiny, teacher):
    imgs = _images()
    src = _Source(imgs, [0, 1, 0, 1], ["cat", "dog"])
    opts = {"model": tiny, "device": "cpu", "batch_size": 4, "progress": False}
    out = export_backend(src, [2, 0], opts)
    assert [i for i, _ in out] == ["ex002", "ex000"]
    np.testing.assert_allclose(out[1][1].map, teacher.maps([imgs[0]], ["cat"])[0].map, atol=1e-6)
    with pytest.raises(ValueError, match="ex001.*no class name for label 5"):
        export_backend(_Source(imgs, [0, 5, 0, 0], ["cat", "dog"]), [0, 1], opts)
    with pytest.raises(ValueError, match="ex003.*cannot read"):
        export_backend(_Source(imgs, [0, 0, 0, 0], ["cat"], broken=[3]), [3], opts)
    with pytest.raises(ValueError, match="example bad.*uint8"):
        teacher.maps([imgs[0].astype(np.float32)], ["cat"], ids=["bad"])


def test_bad_model_dirs(tiny, tmp_path):
    bare = tmp_path / "no_processor"
    bare.mkdir()
    for f in ("config.json", "model.safetensors"):
        shutil.copy(os.path.join(tiny, f), bare / f)
    with pytest.raises(ValueError, match="no_processor.*processor"):
        LlavaTeacher(str(bare), device="cpu")
    with pytest.raises(ValueError, match="cannot load its config"):
        LlavaTeacher(str(tmp_path / "missing"), device="cpu")
    cfg = json.load(open(os.path.join(tiny, "config.json")))
    other = tmp_path / "not_llava"
    other.mkdir()
    json.dump(cfg["text_config"] | {"model_type": "llama"}, open(other / "config.json", "w"))
    with pytest.raises(ValueError, match="'llama' checkpoint"):
        LlavaTeacher(str(other), device="cpu")
    with pytest.raises(ValueError, match="--layers"):
        LlavaTeacher(tiny, layers="5", device="cpu")


# --------------------------------------------------------------------------- export + store


def _image_folder(root, sizes=((20, 40), (32, 32), (50, 30), (17, 23), (40, 24))):
    rng = np.random.default_rng(1)
    for k, (h, w) in enumerate(sizes):
        d = root / ("cat" if k % 2 == 0 else "red_fox")
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(d / f"im{k}.png")
    return root


def _maps(store):
    return {eid: store[eid] for eid in store.ids()}


def test_cli_end_to_end(tiny, teacher, tmp_path):
    """The CLI in a subprocess, over an image folder; the store equals the in-process maps."""
    data = _image_folder(tmp_path / "imgs")
    out = tmp_path / "store"
    cmd = [sys.executable, "-m", "lfi_jax.teacher.export", "--teacher=llava", f"--model={tiny}",
           f"--data=imagefolder:{data}", "--split=train", f"--out={out}", "--shard_size=2",
           "--device=cpu", "--batch_size=2"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["complete"] and summary["count"] == 5 and summary["grid"] == [4, 4]
    assert "img/s" in r.stderr and "ETA" in r.stderr
    store = TeacherStore(str(out))
    m = store.manifest
    assert m["teacher"]["model"] == tiny and m["teacher"]["grid"] == [4, 4] and m["teacher"]["image_tokens"] == 16
    assert m["teacher"]["prompt"] == conv.CLASSIFY_PROMPT and m["teacher"]["layers"] == [0, 1]
    assert m["split"] == "train" and m["degenerate_count"] == 0
    src = get_source(f"imagefolder:{data}", "train")
    for i in range(len(src)):
        ex = src[i]
        (want,) = teacher.maps([ex["image"]], [src.class_names[ex["label"]]])
        got = store[ex["id"]]
        np.testing.assert_allclose(got.map, want.map, atol=1e-6)
        assert got.geometry == want.geometry

    # show draws it (Fig. 5 style), the data source read from the manifest.
    png = tmp_path / "grid.png"
    assert show.main(["--store", str(out), "--n", "4", "--out", str(png), "--pairs"]) == 0
    assert Image.open(png).size[0] > 100


def test_cli_unreadable_image(tiny, tmp_path, capsys):
    data = _image_folder(tmp_path / "imgs", sizes=((20, 40),))
    (data / "cat" / "broken.png").write_bytes(b"not an image")
    rc = export.main(["--teacher=llava", f"--model={tiny}", f"--data=imagefolder:{data}",
                      f"--out={tmp_path / 'store'}", "--device=cpu"])
    err = capsys.readouterr().err
    assert rc == 2  # lfi_jax.cli: a user error exits 2
    assert "example cat/broken.png" in err and "cannot decode" in err


def test_shards_resume_and_other_model(tiny, tmp_path, monkeypatch):
    src = get_source(f"imagefolder:{_image_folder(tmp_path / 'imgs')}", "train")
    opts = dict(model=tiny, device="cpu", batch_size=2)
    full = export_store(src, str(tmp_path / "full"), "llava", shard_size=2, progress=False, **opts)
    # --shard 0/2 and 1/2 into one directory: the union is the whole store.
    parts_dir = str(tmp_path / "parts")
    assert export_store(src, parts_dir, "llava", shard_size=2, shard="0/2", progress=False, **opts) is None
    parts = export_store(src, str(tmp_path / "parts"), "llava", shard_size=2, shard="1/2", progress=False, **opts)
    assert parts.manifest["content_hash"] == full.manifest["content_hash"]
    # A killed export (dies in its second shard) resumes to the same store.
    real, calls = llava_export.export_backend, []

    def dies_on_second(source, indices, options):
        calls.append(list(indices))
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")
        return real(source, indices, options)

    registered = export.BACKENDS["llava"]
    monkeypatch.setitem(export.BACKENDS, "llava", dataclasses.replace(registered, export=dies_on_second))
    with pytest.raises(KeyboardInterrupt):
        export_store(src, str(tmp_path / "resumed"), "llava", shard_size=2, progress=False, **opts)
    monkeypatch.setitem(export.BACKENDS, "llava", registered)
    resumed = export_store(src, str(tmp_path / "resumed"), "llava", shard_size=2, progress=False, **opts)
    assert resumed.manifest["content_hash"] == full.manifest["content_hash"]
    for eid in full.ids():
        np.testing.assert_array_equal(resumed[eid].map, full[eid].map)
    # The same directory with another model is refused, naming the difference.
    other = tmp_path / "other_model"
    shutil.copytree(tiny, other)
    with pytest.raises(ValueError, match="teacher.model"):
        export_store(
            src, str(tmp_path / "full"), "llava", shard_size=2, progress=False, **(opts | {"model": str(other)})
        )


def test_dense_export_and_show_oracle(tiny, tmp_path):
    """Dense maps through the export over a source with boxes; show works on an oracle store."""
    src = get_source("shortcut_digits", "train", {"num_train": 4})
    store = export_store(src, str(tmp_path / "dense"), "llava", shard_size=4, progress=False,
                         model=tiny, device="cpu", task="dense", box_width=2, data_options={"num_train": 4})
    t = LlavaTeacher(tiny, task="dense", box_width=2, device="cpu")
    ex = src[1]
    (want,) = t.maps([ex["image"]], [src.class_names[ex["label"]]], [ex["boxes"]])
    np.testing.assert_allclose(store[ex["id"]].map, want.map, atol=1e-6)
    assert store.manifest["teacher"]["task"] == "dense" and store.manifest["teacher"]["box_width"] == 2
    oracle = export_store(src, str(tmp_path / "oracle"), "oracle", shard_size=4, progress=False,
                          data_options={"num_train": 4}, grid=6, geometry="pad")
    for st in (store, oracle):
        png = tmp_path / f"{st.manifest['backend']}.png"
        assert show.main(["--store", st.path, "--n", "3", "--out", str(png)]) == 0
        assert Image.open(png).size[0] > 100


def test_pad_to_square_puts_the_borders_of_a_non_square_image_on_the_grid(tmp_path):
    """llava-hf processors resize the short side and centre-crop; LLaVA-1.5 (and SPEC section 3)
    pads to a square. With pad="square" (the default) the model sees the whole image padded with
    the processor's mean colour, and the stored geometry maps grid mass back onto the image."""

    ckpt = build_tiny_llava(tmp_path / "crop", do_pad=False)  # a processor that crops
    img = np.full((16, 32, 3), 40, np.uint8)
    img[4:8, 0:4] = (255, 0, 0)  # a marker at the left border (a centre crop drops it)
    padded = LlavaTeacher(ckpt, device="cpu")
    own = LlavaTeacher(ckpt, device="cpu", pad="processor")
    prep = padded.prepare([img], ["cat"])
    geom = prep["geometry"][0]
    assert geom == Geometry.pad_to_square(16, 32) and geom.box == (-8.0, 0.0, 24.0, 32.0)
    crop = own.prepare([img], ["cat"])["geometry"][0]
    assert crop.box == (0.0, 8.0, 16.0, 24.0)  # the crop's columns 8..24: the marker is outside
    # Independent: pad by hand (mean colour, truncated like LLaVA's expand2square), normalise.
    ip = padded.processor.image_processor
    mean, std = np.asarray(ip.image_mean, np.float64), np.asarray(ip.image_std, np.float64)
    want = np.empty((32, 32, 3), np.float64)
    want[:] = [int(255 * m) for m in ip.image_mean]
    want[8:24] = img
    want = (want / 255.0 - mean) / std
    got = prep["inputs"]["pixel_values"][0].permute(1, 2, 0).double().numpy()
    np.testing.assert_allclose(got, want, atol=2e-2)
    # Mass on the grid cell that holds the marker (4x4 grid of 8-pixel patches: row 1, column 0)
    # lands on the marker's region of the original image, rows 0..8 and columns 0..8.
    m = np.zeros((padded.grid_h, padded.grid_w), np.float32)
    m[1, 0] = 1.0
    mass = render_teacher(TeacherEntry(m, geom))
    assert mass.shape == (16, 32)
    np.testing.assert_allclose(mass[0:8, 0:8].sum(), 1.0, atol=1e-6)
    assert mass[8:].sum() == 0 and mass[:, 8:].sum() == 0
    # A processor without a pad of its own: the image is padded before it, same input and geometry.
    padded.pad_before, ip.do_pad = True, False
    again = padded.prepare([img], ["cat"])
    assert again["geometry"][0] == geom
    np.testing.assert_allclose(
        again["inputs"]["pixel_values"].numpy(), prep["inputs"]["pixel_values"].numpy(), atol=1e-5
    )
    assert padded.provenance()["image_pad"] == "square" and own.provenance()["image_pad"] == "processor"


def test_processor_without_patch_size_is_a_clear_error(tiny, tmp_path):
    broken = tmp_path / "no_patch"
    shutil.copytree(tiny, broken)
    cfg_file = broken / "processor_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg.pop("patch_size", None)
    cfg_file.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"no patch_size.*\"patch_size\": 8"):
        LlavaTeacher(str(broken), device="cpu")


def test_export_refuses_other_settings_before_loading_the_model(tiny, tmp_path, monkeypatch):
    src = get_source(f"imagefolder:{_image_folder(tmp_path / 'imgs', sizes=((20, 40), (32, 32)))}", "train")
    out = str(tmp_path / "store")
    export_store(src, out, "llava", shard_size=2, progress=False, model=tiny, device="cpu")

    def no_loading(*a, **k):
        raise AssertionError("the model was loaded before the settings were compared")

    llava_export._CACHE.clear()
    monkeypatch.setattr(llava_export, "LlavaTeacher", no_loading)
    with pytest.raises(ValueError, match=r"manifest\.teacher\.prompt: store has .*this export has \"Where is it\""):
        export_store(src, out, "llava", shard_size=2, progress=False, model=tiny, device="cpu", prompt="Where is it")
    with pytest.raises(ValueError, match=r"manifest\.teacher\.image_pad"):
        export_store(src, out, "llava", shard_size=2, progress=False, model=tiny, device="cpu", pad="processor")


def test_export_error_line_is_not_glued_to_the_progress_bar(tiny, tmp_path, capsys):
    data = _image_folder(tmp_path / "imgs", sizes=((20, 40), (32, 32)))
    (data / "red_fox" / "zz_broken.png").write_bytes(b"not an image")  # read after a drawn bar
    rc = export.main(["--teacher=llava", f"--model={tiny}", f"--data=imagefolder:{data}",
                      f"--out={tmp_path / 'store'}", "--device=cpu", "--batch_size=1"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "\rllava [" in err  # the bar was drawn
    error_lines = [line for line in err.split("\n") if "error:" in line]
    assert len(error_lines) == 1 and error_lines[0].startswith("error: "), err
    assert "zz_broken.png" in error_lines[0]
