"""The paper configs: which weights each Table 3 row trains in the frozen setting, shared
LODO code, defaults (task, dtype, attention)."""

import jax
import pytest
from flax import nnx

from lfi_jax.config import ORIGINAL_QUERIES, load_config_file, model_config
from lfi_jax.models.vit import ViT
from lfi_jax.optim import path_str, trainable_mask


def _trainable_paths(config) -> dict[str, bool]:
    config.model.depth = 2  # the patterns do not depend on depth; a shallow model traces fast
    mcfg = model_config(config)
    params = nnx.state(nnx.eval_shape(lambda: ViT(mcfg, rngs=nnx.Rngs(0))), nnx.Param)
    mask = trainable_mask(params, config.optim.freeze, config.optim.trainable)
    return {path_str(p): bool(m) for p, m in jax.tree_util.tree_leaves_with_path(mask)}


@pytest.mark.parametrize("name,arg", [("tinyimagenet", "Ti/16,{},runlocal"), ("pacs", "sketch,Ti/16,{},runlocal"),
                                      ("vlcs", "SUN09,Ti/16,{},runlocal")])
def test_ic_only_trains_the_original_queries_in_the_frozen_configs(name, arg):
    ic = _trainable_paths(load_config_file(name, arg.format("ic_only")))
    vit = _trainable_paths(load_config_file(name, arg.format("vit")))
    queries = {f"encoder/layer/{i}/attention/query/{w}" for i in range(2) for w in ("kernel", "bias")}
    assert queries <= set(ic) and queries <= set(vit)
    assert all(ic[q] for q in queries)  # ic_only: the weights the teacher supervises train
    assert not any(vit[q] for q in queries)  # vit: frozen
    # everything else is the same in both rows: the head trains, the rest of the backbone is frozen
    for mask in (ic, vit):
        assert mask["classifier/kernel"] and mask["classifier/bias"]
        others = [p for p in mask if p not in queries and not p.startswith("classifier/")]
        assert others and not any(mask[p] for p in others)
    assert any(k.endswith("attention/key/kernel") for k in ic)


def test_ivit_row_keeps_the_original_queries_frozen():
    mask = _trainable_paths(load_config_file("tinyimagenet", "Ti/16,ivit,runlocal"))
    assert mask["encoder/layer/0/attention/interaction_query/kernel"]
    assert not mask["encoder/layer/0/attention/query/kernel"]
    assert ORIGINAL_QUERIES.startswith("^")  # anchored: never matches interaction_query paths


def test_scratch_trains_everything():
    c = load_config_file("tinyimagenet", "Ti/16,ic_only,scratch,runlocal")
    assert c.init.hf == "" and c.optim.freeze == ()
    assert all(_trainable_paths(c).values())


@pytest.mark.parametrize("name,arg", [("tinyimagenet", "B/16,ivit"), ("pacs", "sketch,ivit"), ("vlcs", "SUN09,vit")])
def test_paper_configs_defaults(name, arg):
    c = load_config_file(name, arg)
    assert c.task == "classification"
    assert c.model.dtype == "bfloat16" and c.model.attn_impl == "auto"
    local = load_config_file(name, arg + ",runlocal")
    assert local.model.dtype == "float32"  # CPU smoke tests


def test_vlcs_shares_the_pacs_builder():
    c = load_config_file("vlcs", "VOC2007,ivit,S/16")
    assert c.name == "vlcs-VOC2007-ivit-S16" and c.model.num_classes == 5
    assert c.data.source == "imagefolder:/path/to/vlcs_lodo/VOC2007"
    # 50 epochs over the three training domains at batch 64 (hand-worked from the domain sizes)
    assert c.total_steps == 50 * ((1415 + 2656 + 3282) // 64)
