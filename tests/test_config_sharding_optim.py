import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from lfi_jax import sharding as shd
from lfi_jax.config import PAPER_FREEZE, PAPER_TRAINABLE, base_config, load_config_file, model_config, validate
from lfi_jax.optim import path_str, trainable_mask


def test_mesh_shape_resolution_and_errors():
    assert shd.resolve_mesh_shape((-1, 2), 8) == (4, 2)
    assert shd.resolve_mesh_shape((2, 4), 8) == (2, 4)
    with pytest.raises(ValueError, match="needs 6 devices"):
        shd.resolve_mesh_shape((2, 3), 8)
    with pytest.raises(ValueError, match="more than one -1"):
        shd.resolve_mesh_shape((-1, -1), 8)
    cfg = base_config().mesh
    cfg.shape = (2, 4)
    mesh = shd.make_mesh(cfg)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 4}


def test_fsdp_param_spec_picks_largest_divisible_dim():
    cfg = base_config().mesh
    cfg.shape = (2, 4)
    mesh = shd.make_mesh(cfg)
    assert shd.param_spec((384, 1536), mesh, fsdp_min_size=1) == P(None, "fsdp")
    assert shd.param_spec((1536, 384), mesh, fsdp_min_size=1) == P("fsdp", None)
    assert shd.param_spec((6, 3, 3), mesh, fsdp_min_size=1) == P()  # nothing divisible by 4
    assert shd.param_spec((384,), mesh, fsdp_min_size=10_000) == P()  # small: replicated


def test_global_batch_is_sharded_over_batch_axes():
    cfg = base_config().mesh
    cfg.shape = (2, 4)
    mesh = shd.make_mesh(cfg)
    x = np.arange(16 * 3, dtype=np.float32).reshape(16, 3)
    g = shd.global_batch({"x": x}, mesh)["x"]
    assert g.sharding.spec == P(("data", "fsdp"), None)
    np.testing.assert_array_equal(np.asarray(g), x)


def test_paper_freeze_patterns_select_new_params_and_head():
    tree = {
        "encoder": {"layer": {0: {"attention": {"query": {"kernel": 0}, "interaction_query": {"kernel": 0},
                                                "gate": {"w1": 0, "b2": 0}}}}},
        "classifier": {"kernel": 0},
        "embeddings": {"cls_token": 0},
    }
    mask = trainable_mask(tree, PAPER_FREEZE, PAPER_TRAINABLE)
    flat = {path_str(p): v for p, v in jax.tree_util.tree_leaves_with_path(mask)}
    assert flat == {
        "encoder/layer/0/attention/query/kernel": False,
        "encoder/layer/0/attention/interaction_query/kernel": True,
        "encoder/layer/0/attention/gate/w1": True,
        "encoder/layer/0/attention/gate/b2": True,
        "classifier/kernel": True,
        "embeddings/cls_token": False,
    }


def test_config_validation_names_keys():
    c = load_config_file("demo", "ivit")
    validate(c)
    c.model.image_size = 64  # divisible by the demo's patch (8), unlike data.image_size (48)
    with pytest.raises(ValueError, match="config.model.image_size=64 differs from config.data.image_size"):
        validate(c)
    c = load_config_file("demo", "ivit")
    c.optim.grad_accum_steps = 5
    with pytest.raises(ValueError, match="grad_accum_steps"):
        validate(c)
    c = load_config_file("demo", "ivit")
    c.model.unlock()
    c.model.bogus = 1
    with pytest.raises(ValueError, match="model.bogus"):
        model_config(c)


@pytest.mark.parametrize("name,arg", [("demo", "vit"), ("demo", "iq_ic,hard"), ("demo", "ic_only,clean,runlocal"),
                                      ("tinyimagenet", "S/16,ivit"), ("tinyimagenet", "L/16,vit,scratch")])
def test_every_config_builds_and_validates(name, arg):
    c = load_config_file(name, arg)
    if c.model.interaction_constraint and not (c.teacher.store or c.teacher.auto):
        c.teacher.store = "/some/store"
    validate(c)


def test_unknown_config_arg_fails():
    with pytest.raises(ValueError, match="unknown config argument 'resnet'"):
        load_config_file("demo", "resnet")


def test_request_cpu_devices_before_and_after_backend_start():
    import os
    import subprocess
    import sys

    def run(code: str, **env) -> list[str]:
        base = {k: v for k, v in os.environ.items() if k not in ("JAX_NUM_CPU_DEVICES", "XLA_FLAGS")}
        out = subprocess.run([sys.executable, "-c", "from lfi_jax import sharding as shd\nimport jax\n" + code],
                             capture_output=True, text=True, timeout=120, env={**base, "JAX_PLATFORMS": "cpu", **env})
        assert out.returncode == 0, out.stderr
        return out.stdout.split() + (["warned"] if "not applied" in out.stderr else [])

    # A fresh process: the request applies.
    assert run("print(shd.request_cpu_devices(3), len(jax.devices('cpu')))") == ["3", "3"]
    # A count chosen outside the config (a launcher's JAX_NUM_CPU_DEVICES) stands.
    assert run("print(shd.request_cpu_devices(3), len(jax.devices('cpu')))", JAX_NUM_CPU_DEVICES="2") == ["2", "2"]
    # After the first JAX operation the backends have started: logged, the run goes on with one.
    assert run("jax.numpy.zeros(1).block_until_ready()\nimport logging\nlogging.basicConfig()\n"
               "print(shd.request_cpu_devices(3), len(jax.devices('cpu')))") == ["1", "1", "warned"]
    with pytest.raises(ValueError, match="cpu_devices=-1"):
        shd.request_cpu_devices(-1)
