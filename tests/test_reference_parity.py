"""The PyTorch reference I-ViT, and parity of the JAX models with it (and with transformers).

The reference itself is checked against the float64 NumPy transcription of SPEC sections 1-2
(tests/reference_math.py); the JAX models are then checked against the reference, outputs
and gradients, through `lfi_jax.compare` and its command line.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
from reference_math import alignment_loss_ref, interaction_attention_ref  # noqa: E402
from transformers import ViTConfig, ViTForImageClassification  # noqa: E402

from lfi_jax import compare  # noqa: E402
from lfi_jax.cli import run_cli  # noqa: E402
from lfi_jax.compare.__main__ import SUBCOMMANDS, main  # noqa: E402
from lfi_jax.models import (  # noqa: E402
    ModelConfig,
    convert,  # noqa: E402
    ivit_config,
)
from lfi_jax.reference import IViTReference, alignment_loss  # noqa: E402

TINY = dict(hidden_size=32, depth=2, num_heads=4, mlp_dim=64, patch_size=4, image_size=16, num_classes=5)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    # Tiny models: one intra-op thread is fastest, and on a busy machine a thread pool
    # waiting for cores it does not get is many times slower.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _reference(lfi, *, seed=0, classes=5):
    torch.manual_seed(seed)
    config = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                       image_size=16, patch_size=4, num_labels=classes)
    config.lfi_interaction = lfi
    return IViTReference(config)


@pytest.mark.parametrize(
    "lfi",
    [
        dict(interaction_queries=True, interaction_constraint=True, gate_hidden=3),
        dict(interaction_queries=True, interaction_constraint=True, gate_hidden=0),
        dict(interaction_queries=True, interaction_constraint=True, gated_control=False),
    ],
    ids=["gate_hidden=3", "gate_hidden=0", "gc_off"],
)
def test_reference_attention_matches_the_float64_transcription(lfi):
    ref = _reference(lfi).double()
    layer = ref._layers()[0].attention
    a = layer.attention
    with torch.no_grad():
        if hasattr(a, "gate"):
            for p in a.gate.parameters():
                p.copy_(torch.randn_like(p))  # far from the initialisation
        for lin in (a.query, a.key, a.interaction_query):
            lin.weight.mul_(20.0)  # peaked maps
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 17, 32))
    with torch.no_grad():
        out, _ = layer(torch.tensor(x))
    lin = {n: (getattr(a, n).weight.detach().numpy(), getattr(a, n).bias.detach().numpy())
           for n in ("query", "interaction_query", "key", "value")}
    heads = {n: (x @ w.T + b).reshape(2, 17, 4, 8) for n, (w, b) in lin.items()}
    gate = None
    if hasattr(a, "gate"):
        gate = {n: p.detach().numpy() for n, p in a.gate.named_parameters()}
    o, agt_cls = interaction_attention_ref(
        heads["query"], heads["interaction_query"], heads["key"], heads["value"], gate)
    dense = layer.output.dense
    want = o.reshape(2, 17, 32) @ dense.weight.detach().numpy().T + dense.bias.detach().numpy()
    np.testing.assert_allclose(out.numpy(), want, atol=1e-10, rtol=0)
    np.testing.assert_allclose(layer.cls_row.numpy(), agt_cls, atol=1e-12, rtol=0)
    assert agt_cls.max() > 0.5  # the maps are peaked, so the gate sees more than uniform rows


@pytest.mark.parametrize("direction", ["teacher_student", "paper"])
def test_reference_alignment_loss_matches_the_float64_transcription(direction):
    rng = np.random.default_rng(1)
    cls_attn = rng.dirichlet(np.ones(17), size=(3, 2, 4))  # [B, L, H, N]
    teacher = np.maximum(rng.normal(size=(3, 16)), 0.0)  # exact zeros: 0 log 0 = 0
    teacher /= teacher.sum(-1, keepdims=True)
    mask = np.array([1.0, 0.0, 1.0])
    got = alignment_loss(torch.tensor(cls_attn), torch.tensor(teacher), torch.tensor(mask), direction=direction)
    want = alignment_loss_ref(cls_attn, teacher, mask, direction=direction)
    np.testing.assert_allclose(float(got), want, rtol=1e-5)


VARIANTS = {
    "ivit": dict(gate_hidden=8),
    "linear_gate": dict(gate_hidden=0),
    "gc_off": dict(gated_control=False),
    "iq_off_ic_on": dict(interaction_queries=False),
    "chunked_last_layer": dict(attn_impl="chunked", align_layers=(-1,)),
}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_jax_ivit_matches_the_reference_outputs_and_gradients(name):
    cfg = ivit_config(ModelConfig(**TINY), **VARIANTS[name])
    report = compare.compare_ivit(cfg, seed=3)
    diff, scale = report["max_abs_diff"], report["max_abs"]
    assert report["ok"], report
    expected = {"logits", "cls_attn", "loss", "grad/classifier", "grad/backbone"}
    if cfg.interaction_queries:
        expected |= {"grad/interaction_query"} | ({"grad/gate"} if cfg.gated_control else set())
    assert set(diff) == expected
    for key in expected:  # non-trivial values, matched to float32 precision
        assert scale[key] > 1e-3, (key, scale[key])
        assert diff[key] < 1e-4, (key, diff[key])
    assert report["config"]["num_heads"] == 4


def test_weights_move_both_ways_between_reference_and_jax(tmp_path):
    lfi = dict(interaction_queries=True, interaction_constraint=True, gate_hidden=2, align_layers=[0])
    ref = _reference(lfi, seed=5)
    ref.save(str(tmp_path))
    model, cfg = convert.load_hf_vit(str(tmp_path))
    assert cfg.interaction_queries and cfg.gate_hidden == 2 and cfg.align_layers == (0,)
    theirs, ours = ref.hf_state_dict(), convert.to_hf_state_dict(model)
    assert set(ours) == set(theirs)
    for k in theirs:
        np.testing.assert_array_equal(ours[k], theirs[k], err_msg=k)
    again = IViTReference.from_pretrained(str(tmp_path))
    for k, v in again.hf_state_dict().items():
        np.testing.assert_array_equal(v, theirs[k], err_msg=k)


def test_reference_rejects_mismatched_weights():
    ref = _reference(dict(interaction_queries=True, gate_hidden=2))
    sd = ref.hf_state_dict()
    del sd["vit.encoder.layer.0.attention.attention.gate.w1"]
    sd["vit.encoder.layer.1.attention.attention.gate.w2"] = np.zeros((4, 3, 2), np.float32)
    with pytest.raises(ValueError, match="gate.w1.*gate.w2|gate.w2.*gate.w1"):
        ref.load_hf_state_dict(sd)


def _hf_checkpoint(directory):
    torch.manual_seed(0)
    config = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                       image_size=16, patch_size=4, num_labels=5)
    model = ViTForImageClassification(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    model.save_pretrained(str(directory))
    return str(directory)


def test_compare_vit_against_transformers(tmp_path):
    report = compare.compare_vit(_hf_checkpoint(tmp_path), seed=1)
    assert report["ok"], report
    assert set(report["max_abs_diff"]) == {"logits", "loss", "grad/classifier", "grad/backbone"}
    assert report["max_abs"]["logits"] > 0.1 and report["max_abs_diff"]["logits"] < 1e-4


def _cli(*args):
    env = dict(os.environ, JAX_PLATFORMS="cpu", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "lfi_jax.compare", *args], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=600)


def test_compare_ivit_from_a_hf_checkpoint(tmp_path):
    report = compare.compare_ivit(hf=_hf_checkpoint(tmp_path), seed=2)
    assert report["ok"], report
    assert report["config"]["interaction_queries"] and report["config"]["num_classes"] == 5
    assert {"logits", "cls_attn", "loss", "grad/interaction_query", "grad/gate"} <= set(report["max_abs_diff"])
    assert max(report["max_abs_diff"].values()) < 1e-4
    assert report["max_abs"]["grad/gate"] > 1e-4  # the perturbed gate is not trivially zero


def test_compare_cli_prints_json_and_passes():
    proc = _cli("ivit", "--depth", "1", "--gate-hidden", "2")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["ok"] and report["mode"] == "ivit" and report["config"]["depth"] == 1
    assert {"logits", "cls_attn", "loss", "grad/interaction_query", "grad/gate", "grad/classifier"} <= set(
        report["max_abs_diff"])
    assert max(report["max_abs_diff"].values()) < 1e-4


def test_compare_cli_fails_on_a_perturbed_side(tmp_path):
    proc = _cli("vit", "--hf", _hf_checkpoint(tmp_path), "--perturb", "--tol", "0")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not report["ok"] and report["perturbed"]
    assert report["max_abs_diff"]["logits"] > 1e-4  # the perturbation, not rounding, trips it


def test_compare_cli_modes_come_from_the_subcommand_table(capsys):
    assert {"vit", "ivit"} <= set(SUBCOMMANDS)
    with pytest.raises(SystemExit) as e:  # argparse's usage error: vit needs --hf
        main(["vit"])
    assert e.value.code == 2 and "--hf" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["nonesuch"])
    assert e.value.code == 2
    capsys.readouterr()
    missing = os.path.join(ROOT, "no-such-checkpoint")
    assert run_cli(main, ["vit", "--hf", missing], exit=False) == 2  # bad input: one line, exit 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and missing in err[0]
