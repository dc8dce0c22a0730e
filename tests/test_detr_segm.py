"""DetrForSegmentation (DETR + mask head) against transformers' DetrForSegmentation (same weights).

A tiny random transformers model (a small `ResNetConfig` backbone with every stage an output,
no timm) is saved with `save_pretrained` and loaded by path; weights are redrawn at scales
where every term matters (GroupNorm affine, biases, frozen BatchNorm statistics).
"""


import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from detr_fixtures import randomize  # noqa: E402
from flax import nnx  # noqa: E402

from lfi_jax.compare.detr import forward, make_inputs  # noqa: E402
from lfi_jax.models.convert.detr_segm import (  # noqa: E402
    detr_segm_from_detr,
    load_hf_detr_segm,
    normalize_hf_segm_names,
    save_hf_detr_segm,
)
from lfi_jax.models.detr_segm import DetrForSegmentation, resize_nearest  # noqa: E402

SIZES = ((70, 90), (40, 50))


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _hf_config():
    backbone = transformers.ResNetConfig(
        embedding_size=8, hidden_sizes=[8, 16, 16, 32], depths=[1, 2, 1, 1], layer_type="bottleneck",
        out_features=["stage1", "stage2", "stage3", "stage4"],
    )
    return transformers.DetrConfig(
        use_timm_backbone=False, backbone_config=backbone, use_pretrained_backbone=False, d_model=32,
        encoder_layers=2, decoder_layers=2, encoder_attention_heads=8, decoder_attention_heads=4,
        encoder_ffn_dim=48, decoder_ffn_dim=40, num_queries=5, num_labels=4)


@pytest.fixture(scope="module")
def hf_model_dir(tmp_path_factory):
    torch.manual_seed(0)
    model = transformers.DetrForSegmentation(_hf_config()).eval()
    randomize(model, 0)
    d = tmp_path_factory.mktemp("detr_segm") / "tiny-detr-segm"
    model.save_pretrained(d)
    return model, str(d)


def _torch_out(model, pixels, mask):
    with torch.no_grad():
        out = model(pixel_values=torch.from_numpy(pixels), pixel_mask=torch.from_numpy(mask))
    return {k: getattr(out, k).numpy().astype(np.float64) for k in ("logits", "pred_boxes", "pred_masks")}


def _jax_out(model, pixels, mask):
    out = forward(model, pixels.transpose(0, 2, 3, 1), mask.astype(bool))
    res = {"logits": out.detr.logits, "pred_boxes": out.detr.pred_boxes, "pred_masks": out.pred_masks}
    return {k: np.asarray(v, np.float64) for k, v in res.items()}


def test_parity_with_transformers_on_a_padded_batch(hf_model_dir):
    hf_model, d = hf_model_dir
    model, cfg = load_hf_detr_segm(d)
    assert cfg.encoder_heads == 8 and cfg.num_queries == 5
    pixels, mask = make_inputs(SIZES, 1)
    ref, got = _torch_out(hf_model, pixels, mask), _jax_out(model, pixels, mask)
    assert got["pred_masks"].shape == ref["pred_masks"].shape == (2, 5, 18, 23)
    for k in ref:
        assert np.abs(got[k] - ref[k]).max() < 1e-4, (k, np.abs(got[k] - ref[k]).max())
    assert np.abs(ref["pred_masks"]).max() > 1.0  # far from trivial
    # the padded image's masks depend on the padding mask (the attention map excludes padded cells)
    free = _jax_out(model, pixels, np.ones_like(mask))
    assert np.abs(free["pred_masks"][1] - ref["pred_masks"][1]).max() > 1e-3


def test_a_perturbed_head_weight_is_caught(hf_model_dir):
    hf_model, d = hf_model_dir
    model, _ = load_hf_detr_segm(d)
    k = model.mask_head.fpn_stages[2].refine.norm.scale
    k.set_value(k[...] * 1.01)
    pixels, mask = make_inputs(SIZES, 1)
    ref, got = _torch_out(hf_model, pixels, mask), _jax_out(model, pixels, mask)
    assert np.abs(got["pred_masks"] - ref["pred_masks"]).max() > 1e-3
    assert np.abs(got["logits"] - ref["logits"]).max() < 1e-4


def test_save_round_trip_loads_in_transformers(hf_model_dir, tmp_path):
    hf_model, d = hf_model_dir
    model, _ = load_hf_detr_segm(d)
    out = tmp_path / "ours"
    save_hf_detr_segm(model, str(out))
    reloaded = transformers.DetrForSegmentation.from_pretrained(str(out)).eval()
    pixels, mask = make_inputs(SIZES, 2)
    ref, back = _torch_out(hf_model, pixels, mask), _torch_out(reloaded, pixels, mask)
    for k in ref:
        assert np.abs(back[k] - ref[k]).max() < 1e-5, k
    again, _ = load_hf_detr_segm(str(out))
    a = nnx.to_flat_state(nnx.state(model, nnx.Param))
    b = dict(nnx.to_flat_state(nnx.state(again, nnx.Param)))
    for p, v in a:
        np.testing.assert_array_equal(np.asarray(v.get_value()), np.asarray(b[p].get_value()))


def test_transformers_4_head_names_are_read():
    old = ["bbox_attention.q_linear.weight", "mask_head.lay1.weight", "mask_head.gn2.bias",
           "mask_head.adapter3.weight", "mask_head.lay4.bias", "mask_head.gn5.weight", "mask_head.out_lay.weight",
           "detr.model.backbone.conv_encoder.model.embedder.embedder.convolution.weight"]
    got = sorted(normalize_hf_segm_names({k: np.zeros(1) for k in old}))
    assert got == sorted(["bbox_attention.q_proj.weight", "mask_head.conv1.conv.weight", "mask_head.conv2.norm.bias",
                          "mask_head.fpn_stages.2.fpn_adapter.weight", "mask_head.fpn_stages.1.refine.conv.bias",
                          "mask_head.fpn_stages.2.refine.norm.weight", "mask_head.output_conv.weight",
                          "detr.model.backbone.conv_encoder.model.embedder.embedder.convolution.weight"])


def test_interaction_and_second_phase_keep_the_box_model(hf_model_dir):
    _, d = hf_model_dir
    model, _ = load_hf_detr_segm(d)
    imodel, icfg = load_hf_detr_segm(d, interaction=True)
    assert icfg.interaction_queries and icfg.interaction_constraint
    pixels, mask = make_inputs(SIZES, 1)
    a, b = _jax_out(model, pixels, mask), _jax_out(imodel, pixels, mask)
    # I-DETR from Wq' = Wq with the pretrained gate bias starts out almost as the DETR
    assert np.abs(a["pred_masks"] - b["pred_masks"]).max() < 0.05 * np.abs(a["pred_masks"]).max()
    fresh = detr_segm_from_detr(model.detr, seed=3)
    c = _jax_out(fresh, pixels, mask)
    np.testing.assert_array_equal(c["logits"], a["logits"])
    assert isinstance(fresh, DetrForSegmentation)


def test_nearest_resize_matches_torch():
    x = np.random.default_rng(0).normal(size=(2, 5, 7, 3)).astype(np.float32)
    for size in ((9, 13), (10, 14), (11, 15)):
        ref = torch.nn.functional.interpolate(torch.from_numpy(x.transpose(0, 3, 1, 2)), size=size, mode="nearest")
        np.testing.assert_array_equal(np.asarray(resize_nearest(jnp.asarray(x), size)),
                                      ref.numpy().transpose(0, 2, 3, 1))
