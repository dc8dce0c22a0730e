"""Sharded training in one process (8 fake CPU devices): FSDP and tensor-parallel steps equal
the 1-device step; checkpoints move between topologies; parameters export to plain files."""

import json
import math
import os

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from lfi_jax import sharding as shd
from lfi_jax.checkpoint import Checkpointer
from lfi_jax.config import load_config_file, model_config
from lfi_jax.trainer import create_trainer

STEPS = 3


def _config(shape=(1, 1), axes=("data", "fsdp")):
    c = load_config_file("demo", "ivit,runlocal")
    c.model.depth, c.model.hidden_size, c.model.num_heads, c.model.mlp_dim, c.model.gate_hidden = 2, 32, 2, 64, 2
    c.batch_size = 8
    c.optim.warmup_steps = 0
    # The test's own rate, not the demo's: Adam normalises a near-zero gradient, so the last-bit
    # differences of a sharded reduction grow into parameter differences in proportion to the
    # rate; the tolerance below is set for this one.
    c.optim.lr = 1e-3
    c.mesh.axes = axes
    c.mesh.shape = shape
    c.mesh.fsdp_min_size = 64  # small enough that the tiny model's matrices are sharded
    return c


def _batches(c, n=STEPS):
    g = (c.data.image_size // c.model.patch_size) ** 2
    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        t = rng.random((c.batch_size, g)).astype(np.float32)
        out.append({
            "image": rng.standard_normal((c.batch_size, c.data.image_size, c.data.image_size, 3)).astype(np.float32),
            "label": rng.integers(0, 10, c.batch_size).astype(np.int32),
            "teacher": t / t.sum(-1, keepdims=True),
            "teacher_mask": np.ones((c.batch_size,), np.float32),
        })
    return out


def _train(c, devices):
    mesh = shd.make_mesh(c.mesh, devices=devices)
    trainer, init, shapes = create_trainer(c, model_config(c), mesh, seed=0)
    state = init()
    losses = []
    for b in _batches(c):
        state, m = trainer.train_step(state, shd.global_batch(b, mesh))
        losses.append(float(m["loss"]))
    return trainer, shapes, state, np.array(losses)


@pytest.fixture(scope="module")
def one_device():
    return _train(_config(), jax.devices()[:1])


def _shard_shape(x):
    return x.addressable_shards[0].data.shape


def _by_path(tree):
    """{"/"-joined parameter path: leaf} (the trailing "value" of an NNX variable dropped)."""
    out = {}
    for path, x in jax.tree_util.tree_leaves_with_path(tree):
        parts = shd.path_str(path).split("/")
        out["/".join(parts[:-1] if parts[-1] == "value" else parts)] = x
    return out


@pytest.mark.parametrize(
    "axes,shape",
    [(("data", "fsdp"), (2, 4)), (("data", "fsdp", "tensor"), (2, 2, 2))],
    ids=["fsdp_2x4", "fsdp_tensor_2x2x2"],
)
def test_sharded_steps_match_one_device(one_device, axes, shape):
    _, _, ref_state, ref_losses = one_device
    c = _config(shape, axes)
    trainer, _, state, losses = _train(c, jax.devices())
    params = state["params"]
    flat = _by_path(params)
    qk = flat["encoder/layer/0/attention/query/kernel"]
    up = flat["encoder/layer/1/intermediate/dense/kernel"]
    if "tensor" in axes:  # column-parallel over tensor, FSDP on the other dimension
        assert qk.sharding.spec == P("fsdp", "tensor")
        assert _shard_shape(qk) == (16, 16)
        assert flat["encoder/layer/0/attention/output/dense/kernel"].sharding.spec == P("tensor", "fsdp")
        assert flat["encoder/layer/0/attention/gate/w1"].sharding.spec == P("tensor", None, None)
    else:
        assert up.sharding.spec == P(None, "fsdp")
        assert _shard_shape(up) == (32, 16)  # [32, 64] split 4 ways along its largest dim
    described = shd.describe(state["params"], trainer.state_shardings["params"])
    assert len(described) >= 8, described
    # Optimizer moments follow their parameters.
    mu = jax.tree.leaves(state["opt_state"])
    assert any(
        getattr(x, "sharding", None) is not None and x.sharding.spec == up.sharding.spec and x.shape == up.shape
        for x in mu
    )
    np.testing.assert_allclose(losses, ref_losses, rtol=2e-5)
    assert len(set(np.round(losses, 6))) > 1  # the steps really trained
    for a, b in zip(jax.tree.leaves(ref_state["params"]), jax.tree.leaves(params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5)


def test_param_spec_rules():
    c = _config((1, 2, 4), ("data", "fsdp", "tensor"))
    mesh = shd.make_mesh(c.mesh)
    spec = lambda shape, path, m=64: shd.param_spec(shape, mesh, fsdp_min_size=m, path=path)  # noqa: E731
    assert spec((384, 1536), "encoder/layer/3/intermediate/dense/kernel") == P("fsdp", "tensor")
    assert spec((1536,), "encoder/layer/3/intermediate/dense/bias") == P("tensor")
    assert spec((1536, 384), "encoder/layer/3/output/dense/kernel") == P("tensor", "fsdp")
    assert spec((384, 384), "encoder/layer/0/attention/output/dense/kernel") == P("tensor", "fsdp")
    assert spec((384,), "encoder/layer/0/attention/output/dense/bias", 10**9) == P()
    assert spec((6, 2, 8), "encoder/layer/0/attention/gate/w1/value", 10**9) == P()  # 6 heads % 4
    # Adam moments carry the parameter path after the optimizer's own keys.
    mu_path = "0/inner_states/train/inner_state/1/0/mu/encoder/layer/0/attention/key/kernel/value"
    assert spec((384, 384), mu_path) == P("fsdp", "tensor")
    assert spec((1, 65, 384), "embeddings/position_embeddings") == P(None, None, "fsdp")
    # Without a tensor axis the rules are inert: classic FSDP.
    mesh2 = shd.make_mesh(_config((2, 4)).mesh)
    up_path = "encoder/layer/3/intermediate/dense/kernel"
    assert shd.param_spec((384, 1536), mesh2, fsdp_min_size=1, path=up_path) == P(None, "fsdp")


def test_bytes_per_device_counts_shards():
    c = _config((2, 4))
    mesh = shd.make_mesh(c.mesh)
    _, _, shapes = create_trainer(c, model_config(c), mesh, seed=0)
    params = shapes["params"]
    shardings = shd.tree_shardings(params, mesh, fsdp_min_size=64)
    expected = 0
    for x in jax.tree.leaves(params):
        n = math.prod(x.shape)
        divisible = any(d % 4 == 0 for d in x.shape)
        expected += 4 * (n // 4 if (n >= 64 and divisible) else n)
    assert shd.bytes_per_device(params, shardings) == expected
    total = sum(4 * math.prod(x.shape) for x in jax.tree.leaves(params))
    assert shd.bytes_per_device(params, shd.tree_shardings(params, mesh, fsdp_min_size=10**12)) == total


def _save(c, devices, workdir):
    """Checkpoints an FSDP-sharded train state on `devices` (random values, as if at step
    STEPS; built without compiling anything) with a train iterator that has read STEPS batches."""
    from lfi_jax.data.pipeline import make_train_iterator

    mesh = shd.make_mesh(c.mesh, devices=devices)
    trainer, _, shapes = create_trainer(c, model_config(c), mesh, seed=0)
    rng = np.random.default_rng(1)
    state = jax.tree.map(
        lambda a: jax.device_put(rng.standard_normal(a.shape).astype(a.dtype), a.sharding),
        trainer.abstract_state(shapes),
    )
    state["step"] = jax.device_put(np.int32(STEPS), trainer.state_shardings["step"])
    assert shd.describe(state["params"], trainer.state_shardings["params"])  # really sharded
    it = make_train_iterator(c.data, c.teacher, global_batch_size=c.batch_size, patch_size=c.model.patch_size,
                             seed=0, return_index=True)
    for _ in range(STEPS):
        next(it)
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False)
    ckpt.save(STEPS, state, it, force=True)
    ckpt.close()
    with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(c.to_json_best_effort(indent=2))
    return jax.tree.map(np.asarray, state["params"])


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("fsdp_run"))
    c = _config((2, 4))
    c.model.interaction_constraint = False  # the iterator below then needs no teacher store
    c.teacher.auto = ""
    c.data.options.num_train = 64
    return c, workdir, _save(c, jax.devices(), workdir)


@pytest.mark.parametrize("shape,ndev", [((1, 4), 4), ((1, 1), 1)], ids=["4_devices", "1_device"])
def test_checkpoint_restores_onto_another_topology(saved_run, shape, ndev):
    c, workdir, saved = saved_run
    c2 = _config(shape)
    c2.model.interaction_constraint = False
    mesh = shd.make_mesh(c2.mesh, devices=jax.devices()[:ndev])
    trainer, _, shapes = create_trainer(c2, model_config(c2), mesh, seed=0)
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False)
    step, state = ckpt.restore(trainer.abstract_state(shapes))
    ckpt.close()
    assert step == STEPS
    shardings = jax.tree.leaves(trainer.state_shardings["params"])
    for a, b, s in zip(jax.tree.leaves(saved), jax.tree.leaves(state["params"]), shardings):
        np.testing.assert_array_equal(a, np.asarray(b))
        assert b.sharding == s
    assert len(_by_path(state["params"])["classifier/kernel"].sharding.device_set) == ndev
    assert int(state["step"]) == STEPS


def test_data_iterator_continues_the_global_stream_on_another_process_count(saved_run, tmp_path):
    """A checkpoint written by 2 processes (data/process_{0,1}-of-2.json) restored here (1
    process) by iterators playing 'process p of 2': their next batches together are exactly
    the batch the uninterrupted 1-process stream reads next."""
    import logging
    import shutil

    from lfi_jax.data.pipeline import make_train_iterator

    c, workdir, _ = saved_run
    ckpt_dir = tmp_path / "checkpoints"
    shutil.copytree(os.path.join(workdir, "checkpoints"), ckpt_dir)
    data = ckpt_dir / str(STEPS) / "data"
    state = json.loads((data / "process_0-of-1.json").read_text())
    assert state == {"next_index": STEPS}
    (data / "process_0-of-1.json").rename(data / "process_0-of-2.json")
    (data / "process_1-of-2.json").write_text(json.dumps(state))

    kw = dict(global_batch_size=c.batch_size, patch_size=c.model.patch_size, seed=0, return_index=True)
    single = make_train_iterator(c.data, c.teacher, **kw)
    for _ in range(STEPS):
        next(single)
    expected = next(single)
    mesh = shd.make_mesh(_config((1, 1)).mesh, devices=jax.devices()[:1])
    trainer, _, shapes = create_trainer(c, model_config(c), mesh, seed=0)

    messages = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    logger = logging.getLogger("lfi_jax.checkpoint")
    logger.addHandler(handler)
    halves = []
    try:
        for p in range(2):
            it = make_train_iterator(c.data, c.teacher, process_index=p, process_count=2, **kw)
            ckpt = Checkpointer(str(ckpt_dir), async_save=False)
            ckpt.restore(trainer.abstract_state(shapes), it)
            ckpt.close()
            halves.append(next(it))
    finally:
        logger.removeHandler(handler)
    assert any(f"continuing the global stream at batch {STEPS}" in m for m in messages), messages
    got = np.concatenate([h["index"] for h in halves])
    assert sorted(got.tolist()) == sorted(expected["index"].tolist())
    by_index = {int(i): img for i, img in zip(expected["index"], expected["image"])}
    for h in halves:
        for i, img in zip(h["index"], h["image"]):
            np.testing.assert_array_equal(img, by_index[int(i)])  # same augmentation too


def test_data_iterator_restarts_when_the_saved_state_is_not_a_plain_position(tmp_path, caplog):
    from lfi_jax.checkpoint import _plain_position

    d = tmp_path / "checkpoints" / "5" / "data"
    d.mkdir(parents=True)
    (d / "process_0-of-2.json").write_text(json.dumps({"next_index": 5}))
    ckpt = Checkpointer(str(tmp_path / "checkpoints"), async_save=False)
    assert ckpt._saved_position(5) is None  # process 1's file is missing
    (d / "process_1-of-2.json").write_text(json.dumps({"next_index": 5}))
    assert ckpt._saved_position(5) == 5
    (d / "process_1-of-2.json").write_text(json.dumps({"workers": [1, 2]}))
    assert ckpt._saved_position(5) is None
    ckpt.close()
    assert _plain_position({"next_index": 3}) and not _plain_position({"next_index": 3, "w": 1})


@pytest.mark.parametrize("fmt", ["safetensors", "msgpack"])
def test_export_params_writes_the_checkpoint_params(saved_run, tmp_path, fmt):
    from lfi_jax.export_params import flat_params, load_exported, main

    _, workdir, saved = saved_run
    out = tmp_path / fmt
    assert main(["--workdir", workdir, "--out", str(out), "--format", fmt]) == 0
    info = json.loads((out / "export_info.json").read_text())
    assert info["step"] == STEPS and info["format"] == fmt
    # The source knows its classes; the preprocessing is the run's (no run_info.json here: the
    # class names come from the data source itself).
    assert info["class_names"] == [str(i) for i in range(10)]
    c, _, _ = saved_run
    assert info["preprocessing"]["image_size"] == c.data.image_size
    assert info["preprocessing"]["mean"] == list(c.data.mean) and info["preprocessing"]["std"] == list(c.data.std)
    got = flat_params(load_exported(str(out)))
    want = _by_path(saved)
    assert set(got) == set(want)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    if fmt == "safetensors":  # HF names and torch layouts: what the PyTorch reference loads
        from safetensors.numpy import load_file

        sd = load_file(str(out / "model.safetensors"))
        q = want["encoder/layer/0/attention/query/kernel"]
        np.testing.assert_array_equal(sd["vit.encoder.layer.0.attention.attention.query.weight"], q.T)
        np.testing.assert_array_equal(
            sd["vit.encoder.layer.1.attention.attention.interaction_query.weight"],
            want["encoder/layer/1/attention/interaction_query/kernel"].T,
        )
        hf = json.loads((out / "config.json").read_text())
        assert hf["lfi_interaction"]["interaction_queries"] is True
        assert hf["id2label"] == {str(i): str(i) for i in range(10)} and hf["label2id"]["7"] == 7
        prep = json.loads((out / "preprocessor_config.json").read_text())
        assert prep["size"] == {"height": c.data.image_size, "width": c.data.image_size}
        assert prep["image_mean"] == list(c.data.mean) and prep["do_normalize"]
        assert abs(prep["rescale_factor"] - 1 / 255) < 1e-12


def test_export_params_errors_name_the_problem(tmp_path):
    from lfi_jax.export_params import main

    with pytest.raises(FileNotFoundError, match="config.json"):
        main(["--workdir", str(tmp_path), "--out", str(tmp_path / "o")])
    (tmp_path / "config.json").write_text(_config().to_json_best_effort())
    with pytest.raises(FileNotFoundError, match="no checkpoints"):
        main(["--workdir", str(tmp_path), "--out", str(tmp_path / "o")])


def test_export_params_cli_prints_one_error_line(tmp_path, capsys):
    from lfi_jax.cli import run_cli
    from lfi_jax.export_params import main

    code = run_cli(main, ["--workdir", str(tmp_path), "--out", str(tmp_path / "o")], exit=False)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and "config.json" in err[0], err


def test_export_params_uses_the_trainers_class_names(saved_run, tmp_path):
    """WORKDIR/run_info.json (written by the trainer at start) names the classes."""
    import shutil

    from lfi_jax.export_params import main

    _, workdir, _ = saved_run
    work = tmp_path / "run"
    shutil.copytree(workdir, work)
    names = [f"class_{i}" for i in range(10)]
    (work / "run_info.json").write_text(json.dumps({"data": {"class_names": names}}))
    assert main(["--workdir", str(work), "--out", str(tmp_path / "o")]) == 0
    hf = json.loads((tmp_path / "o" / "config.json").read_text())
    assert [hf["id2label"][str(i)] for i in range(10)] == names
