"""What the DETR-family tests share: tiny random transformers configs, their weights redrawn at
scales where every term matters, the padded input batch, micro configs with NumPy-drawn
parameters, and small helpers on model outputs and parameters.

    from detr_fixtures import one_torch_thread  # noqa: F401  (autouse, module scope)
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lfi_jax.compare.detr import make_inputs
from lfi_jax.models.resnet import ResNetConfig

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

SIZES = ((70, 90), (40, 50))  # two images of different sizes, padded to 70 x 90
MICRO_SIZES = ((40, 40), (24, 32))


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    # Tiny models: one intra-op thread is fastest, and on a busy machine a thread pool
    # waiting for cores it does not get is many times slower.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def hf_config(config_cls, *, stages=("stage4",), **kw):
    """A tiny transformers DETR-family config (`config_cls`: transformers.DetrConfig, ...): a small
    ResNet backbone (no timm, `stages` its outputs), D = 32, 2 encoder and 3 decoder layers."""
    backbone = transformers.ResNetConfig(
        embedding_size=8, hidden_sizes=[8, 16, 16, 32], depths=[1, 2, 1, 1], layer_type="bottleneck",
        out_features=list(stages),
    )
    base = dict(use_timm_backbone=False, backbone_config=backbone, use_pretrained_backbone=False, d_model=32,
                encoder_layers=2, decoder_layers=3, encoder_attention_heads=4, decoder_attention_heads=4,
                encoder_ffn_dim=48, decoder_ffn_dim=40, num_queries=6, num_labels=5)
    base.update(kw)
    return config_cls(**base)


def randomize(model, seed):
    """Every floating tensor of a torch model redrawn: BatchNorm variances in [0.5, 1.5), norm
    weights ~ 1 + 0.2 N, biases and means 0.2 N, query embeddings N, weights unit-variance outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if not t.is_floating_point():
                continue
            if name.endswith("running_var"):
                t.copy_(0.5 + torch.rand(t.shape, generator=g))
            elif "norm" in name and name.endswith("weight"):
                t.copy_(1.0 + 0.2 * torch.randn(t.shape, generator=g))
            elif name.endswith(("bias", "running_mean")):
                t.copy_(0.2 * torch.randn(t.shape, generator=g))
            elif "query_position_embeddings" in name:
                t.copy_(torch.randn(t.shape, generator=g))
            else:  # conv / linear weights: unit-variance outputs
                t.copy_(torch.randn(t.shape, generator=g) / math.sqrt(math.prod(t.shape[1:])))


def random_hf_model(model_cls, config, seed=0):
    """A transformers model of `config` with `randomize`d weights, in eval mode."""
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    randomize(model, seed)
    return model


def inputs(sizes=SIZES, seed=1):
    """(pixels [B, 3, H, W], mask [B, H, W] int64) for torch and the same as JAX NHWC / bool."""
    pixels, mask = make_inputs(sizes, seed)
    return pixels, mask, jnp.asarray(pixels.transpose(0, 2, 3, 1)), jnp.asarray(mask.astype(bool))


def torch_out(model, pixels, mask, **kw):
    with torch.no_grad():
        return model(pixel_values=torch.from_numpy(pixels), pixel_mask=torch.from_numpy(mask), **kw)


def max_diff(a, b):
    """The largest difference of two DetrOutputs' logits and boxes."""
    return max(float(jnp.max(jnp.abs(a.logits - b.logits))), float(jnp.max(jnp.abs(a.pred_boxes - b.pred_boxes))))


def set_params(model, pred, fn):
    """Replace the parameters whose path satisfies `pred` by fn(path, value), in place."""
    _, state = nnx.split(model)
    flat = nnx.to_flat_state(state)
    for path, var in flat:
        if pred(path):
            var.set_value(fn(path, var.get_value()))
    nnx.update(model, nnx.from_flat_state(flat))


def perturb_interaction_queries(model):
    set_params(model, lambda p: "interaction_query" in p and p[-1] == "kernel",
               lambda p, v: v + 0.5 * jax.random.normal(jax.random.key(0), v.shape))


def gate_bias(model, bias):
    set_params(model, lambda p: p[-1] == "b2", lambda p, v: jnp.broadcast_to(jnp.asarray(bias), v.shape))


def flat_equal(a, b):
    """Two models' parameters are the same paths and the same values, bit for bit."""
    fa = dict(nnx.to_flat_state(nnx.state(a, nnx.Param)))
    fb = dict(nnx.to_flat_state(nnx.state(b, nnx.Param)))
    assert set(fa) == set(fb)
    for p in fa:
        np.testing.assert_array_equal(np.asarray(fa[p].get_value()), np.asarray(fb[p].get_value()), err_msg=str(p))
    return fa


def micro_fields(**kw):
    """The fields of a very small DETR-family config (for tests whose point is not parity): a
    2-stage backbone, D = 8, 1 encoder and 2 decoder layers."""
    base = dict(backbone=ResNetConfig(embedding_size=4, hidden_sizes=(4, 8), depths=(1, 1)),
                hidden_size=8, encoder_layers=1, decoder_layers=2, encoder_heads=2, decoder_heads=2,
                encoder_ffn_dim=8, decoder_ffn_dim=8, num_queries=3, num_classes=2)
    base.update(kw)
    return base


def random_values(shapes, seed=0):
    """{path: float32 array} drawn with NumPy for ((path, shape), ...) (an eager random init
    compiles op by op: slow): BatchNorm variances in [0.5, 1.5), scales ~ 1, biases, means and
    gate biases 0.1 N, embeddings N, kernels unit-variance outputs."""
    rng = np.random.default_rng(seed)
    values = {}
    for path, shape in shapes:
        name = path[-1]
        if name == "running_var":
            v = 0.5 + rng.random(shape)
        elif name == "scale" or name == "weight" and "normalization" in path:
            v = 1.0 + 0.1 * rng.normal(size=shape)
        elif name in ("bias", "running_mean", "b1", "b2"):
            v = 0.1 * rng.normal(size=shape)
        elif name == "weight":  # query position embeddings
            v = rng.normal(size=shape)
        else:
            v = rng.normal(size=shape) / math.sqrt(math.prod(shape[:-1]))
        values[path] = v.astype(np.float32)
    return values


def grad_norms(grads):
    """{path: max |gradient|} of a gradient state."""
    return {path: float(jnp.max(jnp.abs(g.get_value()))) for path, g in nnx.to_flat_state(grads)}


def saved(model, tmp_path_factory, name):
    """`model.save_pretrained` into a fresh temporary directory -> its path."""
    d = tmp_path_factory.mktemp(name) / name
    model.save_pretrained(d)
    return str(d)


def reference_outputs(model_cls, hf_dir):
    """transformers' outputs (attention maps included) of a saved model on the default inputs."""
    pixels, mask, _, _ = inputs()
    hf = model_cls.from_pretrained(hf_dir, attn_implementation="eager").eval()
    return torch_out(hf, pixels, mask, output_attentions=True)


def check_compare_command(mode, hf_dir, capsys, *, perturbed, num_classes):
    """`python -m lfi_jax.compare MODE --hf DIR` on the padded batch of SIZES: one JSON line, exit
    0, every output within 1e-4 of transformers' and far from trivial; with `--perturb` (noise on a
    PyTorch weight whose name holds `perturbed`) exit 1 with the logits above the tolerance."""
    import json

    from lfi_jax.compare.__main__ import main

    def printed():  # the report is the last line printed
        return json.loads(capsys.readouterr().out.strip().splitlines()[-1])

    sizes = ["--sizes", ",".join(f"{h}x{w}" for h, w in SIZES), "--seed", "1"]
    assert main([mode, "--hf", hf_dir, *sizes]) == 0
    report = printed()
    assert report["mode"] == mode and report["ok"] and report["sizes"] == [list(s) for s in SIZES]
    assert set(report["max_abs_diff"]) == {"logits", "pred_boxes", "aux_logits", "aux_boxes"}
    for key, diff in report["max_abs_diff"].items():
        assert diff < 1e-4, (key, diff)
    assert report["max_abs"]["logits"] > 1.0  # the weights make the outputs far from trivial
    assert report["config"]["num_classes"] == num_classes
    assert main([mode, "--hf", hf_dir, *sizes, "--perturb"]) == 1
    report = printed()
    assert not report["ok"] and "logits" in report["above_tol"] and perturbed in report["perturbed"]
