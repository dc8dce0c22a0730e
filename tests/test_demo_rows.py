"""Per-row settings of a config (`row_edits`, applied by set_ablation): the main job's ViT gets
its own learning rate whichever way its config is built."""

from lfi_jax.config import CONFIG_DIR, load_config_file
from lfi_jax.experiments.base import Cell
from lfi_jax.experiments.cells import cell_config, config_hash


def test_vit_row_gets_its_learning_rate_from_the_file_and_from_cells():
    assert load_config_file("demo", "vit").optim.lr == 2e-3
    assert load_config_file("demo", "ivit").optim.lr == 4e-3
    base = f"{CONFIG_DIR}/demo.py"
    vit = cell_config(base, "ivit,shortcut", Cell({"model": "vit"}, {"ablation": "vit"}), {}, {})
    ivit = cell_config(base, "ivit,shortcut", Cell({"model": "ivit"}, {"ablation": "ivit"}), {}, {})
    assert (vit.optim.lr, vit.model.interaction_queries) == (2e-3, False)
    assert (ivit.optim.lr, ivit.model.interaction_queries) == (4e-3, True)
    # --set comes after the row's edits, so the user's value wins
    mine = cell_config(base, "ivit", Cell({"model": "vit"}, {"ablation": "vit"}), {}, {"optim.lr": 5e-4})
    assert mine.optim.lr == 5e-4
    # a ViT cell is the ViT config file's run
    assert config_hash(vit) == config_hash(load_config_file("demo", "vit"))


def test_input_thread_scheduling_does_not_change_a_cells_identity():
    base = load_config_file("demo", "ivit")
    other = load_config_file("demo", "ivit")
    other.data.thread_nice = base.data.thread_nice + 5
    other.data.num_workers = base.data.num_workers + 1
    assert config_hash(other) == config_hash(base)
    other.mesh.cpu_devices = base.mesh.cpu_devices + 1  # float reduction order: a different run
    assert config_hash(other) != config_hash(base)


def test_a_key_added_at_its_default_keeps_the_hash_of_cells_trained_before_it():
    import json

    import ml_collections

    config = load_config_file("demo", "ivit")
    config.mesh.cpu_devices = 0  # the library default: what every run was before the key existed
    older = json.loads(config.to_json_best_effort())
    del older["mesh"]["cpu_devices"], older["loss"]["align_rows"]
    assert config_hash(ml_collections.ConfigDict(older)) == config_hash(config)


def test_unhashed_keys_at_every_depth_leave_the_hash_and_others_change_it():
    base = load_config_file("demo", "ivit")
    h = config_hash(base)
    other = load_config_file("demo", "ivit")
    other.name, other.log_every, other.teacher.store = "renamed", base.log_every + 7, "/elsewhere/store"
    assert config_hash(other) == h
    other.teacher.noise.blur = 1.0  # a sibling of teacher.store: part of the model's identity
    assert config_hash(other) != h
    other = load_config_file("demo", "ivit")
    other.loss.align_rows = "cls_and_object"  # an UNHASHED_DEFAULTS key away from its default
    assert config_hash(other) != h


# Tables trained at the main job's previous settings (docs/experiments.md, its intro): their
# cells are not today's configs, so their commands train anew.
_PREVIOUS_SETTINGS = {"ablation.json", "data_ratio.json", "spurious_p.json", "teacher_noise.json"}


def test_documented_tables_find_their_finished_cells_again():
    """Re-running a documented command (with `--set mesh.cpu_devices=0`, as the docs say, for
    tables trained before the 4-device default) names every cell's workdir as recorded, so
    finished cells are reused rather than retrained: the contract UNHASHED and
    UNHASHED_DEFAULTS keep while keys are added."""
    import glob
    import json
    import os
    import shlex

    from lfi_jax.experiments import EXPERIMENTS
    from lfi_jax.experiments.cells import cell_dirname
    from lfi_jax.experiments.cli import build_parser, grid_options, parse_sets
    from lfi_jax.experiments.runner import prepare

    docs = os.path.join(os.path.dirname(CONFIG_DIR), "docs", "experiments")
    checked = 0
    for path in sorted(glob.glob(os.path.join(docs, "**", "*.json"), recursive=True)):
        with open(path) as f:
            payload = json.load(f)
        if not isinstance(payload, dict) or "cells" not in payload or os.path.relpath(path, docs) in _PREVIOUS_SETTINGS:
            continue
        args = build_parser().parse_args(shlex.split(payload["command"])[3:])
        sets = {"mesh.cpu_devices": 0, **parse_sets(args.set)}
        exp = EXPERIMENTS[args.name]
        seeds = args.seeds if args.seeds is not None else getattr(exp, "default_seeds", 1)
        configs = prepare(exp, config=args.config, budget=args.budget, seeds=seeds, sets=sets,
                          options=grid_options(args))[4]
        recorded = [os.path.basename(c["workdir"]) for c in payload["cells"]]
        assert [cell_dirname(c) for c in configs] == recorded, path
        checked += len(recorded)
    assert checked >= 100  # choices, hard, peers (3 tables), teacher noise in the shortcut regime (2)
