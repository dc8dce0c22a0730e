"""configs/coco_detr.py: Table 6's detection setting, and its runlocal variant on the embedded data."""

import jax
import numpy as np
import pytest

pytest.importorskip("pycocotools")
from flax import nnx  # noqa: E402

from lfi_jax.config import load_config_file  # noqa: E402
from lfi_jax.models.detr import Detr, DetrConfig, feature_grid, idetr_config  # noqa: E402
from lfi_jax.models.resnet import resnet_config  # noqa: E402
from lfi_jax.optim import trainable_mask  # noqa: E402
from lfi_jax.tasks.detection import TASK  # noqa: E402


def _trained(config, mcfg):
    """{"/"-joined path: size} of the parameters the config's freeze patterns leave trainable."""
    params = nnx.state(nnx.eval_shape(lambda: Detr(mcfg, rngs=nnx.Rngs(0))), nnx.Param)
    mask = trainable_mask(params, config.optim.freeze, config.optim.trainable)
    flat_p = nnx.to_flat_state(params)
    flat_m = dict(nnx.to_flat_state(mask))
    return {"/".join(map(str, p)): int(np.prod(v.shape)) for p, v in flat_p if flat_m[p].get_value()}


def test_idetr_r50_is_table_6s_setting():
    c = load_config_file("coco_detr", "idetr")
    mcfg = TASK.model_config(c)
    want = idetr_config(DetrConfig(backbone=resnet_config(50), num_classes=80, gate_bias_init=(-4.0, 4.0),
                                   attn_impl="auto"))
    assert mcfg == want and mcfg.interaction_in == "decoder_cross"
    assert (c.optim.lr, c.optim.weight_decay, c.optim.grad_clip_norm) == (1e-4, 1e-4, 0.1)
    assert round(c.total_steps * c.batch_size / 118_287) == 50 and c.task == "detection"
    trained = _trained(c, mcfg)
    # Only the interaction queries, the gates and the two heads: 6 x (256^2 + 256) + 6 gates of
    # 8 x (2*8 + 8 + 8*2 + 2) + the class head (256 x 81 + 81) + the box head (2 x (256^2 + 256) + 256 x 4 + 4).
    assert all(any(k in p for k in ("interaction_query", "/gate/", "class_labels_classifier", "bbox_predictor"))
               for p in trained)
    assert sum(trained.values()) == 6 * (256 * 256 + 256) + 6 * 8 * 42 + (256 * 81 + 81) + 2 * 65792 + 1028


def test_the_detr_row_and_ic_only():
    c = load_config_file("coco_detr", "detr")
    mcfg = TASK.model_config(c)
    assert not (mcfg.interaction_queries or mcfg.interaction_constraint)
    assert set(p.split("/")[0] for p in _trained(c, mcfg)) == {"class_labels_classifier", "bbox_predictor"}
    c = load_config_file("coco_detr", "ic_only")
    mcfg = TASK.model_config(c)
    assert mcfg.interaction_constraint and not mcfg.interaction_queries
    queries = [p for p in _trained(c, mcfg) if "encoder_attn/q_proj" in p]
    assert len(queries) == 2 * mcfg.decoder_layers  # kernel and bias of each decoder layer


def test_runlocal_batches_fit_the_model_and_the_loss_traces():
    c = load_config_file("coco_detr", "idetr,runlocal")
    mcfg = TASK.model_config(c)
    batch = next(iter(TASK.train_iterator(c, mcfg, c.teacher, seed=0)))
    assert batch["image"].shape[0] == c.batch_size
    gh, gw = feature_grid(mcfg, *batch["image"].shape[1:3])
    assert batch["key_mask"].shape == (c.batch_size, gh * gw)
    # The whole loss (criterion + dense alignment) traced on the abstract model: shapes only.
    loss, aux = nnx.eval_shape(lambda: TASK.loss(Detr(mcfg, rngs=nnx.Rngs(0)), batch, c))
    assert loss.shape == () and {"task_loss", "align_loss"} <= set(aux)


@pytest.mark.slow  # compiling a DETR train step takes minutes on a loaded CPU
def test_runlocal_trains(tmp_path):
    """Without the constraint (no teacher store needed; `idetr,runlocal` needs a dense one)."""
    from lfi_jax.train import train_and_evaluate

    c = load_config_file("coco_detr", "iq_gc,runlocal")
    c.total_steps, c.checkpoint_every = 2, 0
    out = train_and_evaluate(c, str(tmp_path / "run"))
    assert out is not None
    assert jax.tree.leaves(out)
