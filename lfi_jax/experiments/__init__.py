"""The experiment runner: a grid of training runs, then a Markdown table and a figure.

    python -m lfi_jax.experiments data_ratio    [--out DIR] [--budget full|small] [--seeds N]
    python -m lfi_jax.experiments ablation      ...
    python -m lfi_jax.experiments teacher_noise ...
    python -m lfi_jax.experiments spurious_p    ...
    python -m lfi_jax.experiments peers         ...   [--regimes shortcut,hard]
    python -m lfi_jax.experiments choices       ...   [--regimes shortcut]
    python -m lfi_jax.experiments hard          ...
    python -m lfi_jax.experiments seeds --config configs/demo.py:ivit,shortcut --seeds 3

Experiments (each grid point is trained for every seed 0..N-1):
  data_ratio     Table 2: ViT vs I-ViT at 1 / 10 / 50 / 100 % of the training data
                 (`config.data.data_ratio`, a class-stratified nested subset).
  ablation       Table 3: the five rows vit, iq_gc, ic_only, iq_ic, ivit (`config.ABLATIONS`).
  teacher_noise  I-ViT's accuracy against the quality of its teacher: the oracle degraded by
                 blur / shift / uniform mixing (`config.teacher.noise`), with ViT as reference.
  spurious_p     ViT vs I-ViT in the clean / shortcut / hard regimes (SPEC section 4).
                 teacher_noise takes one regime too (`--regimes shortcut`).
  peers          RRR (Ross et al., 2017; `loss.rrr_weight`, a small grid) and attention
                 transfer (the ViT's CLS attention supervised: ablation row ic_only) beside
                 ViT and I-ViT in the shortcut and hard regimes.
  choices        one I-ViT setting changed per row (alignment weight 3, gate bias (-4, 4) from
                 scratch, augmentation off, `loss.align_reduce="layer_mean"`), shortcut regime.
  hard           the hard regime: I-ViT variants (`loss.align_rows="cls_and_object"`, weight 3).
  seeds          any config (--config) over N seeds.

The base config is `configs/demo.py` (the embedded benchmark; clean regime, except for
spurious_p which sweeps it) unless `--config FILE[:ARG]` names another one, e.g.
`configs/tinyimagenet.py:B/16` on a GPU box; the grid then overrides the model switches
(`set_ablation`), `data.data_ratio` or `teacher.noise` of that config.

Every cell trains in its own workdir under `--workdir` (default workdirs/experiments), named by a
hash of its full config, so cells shared between experiments (ViT on all the data is a cell of
data_ratio, ablation and teacher_noise) run once, and re-running an experiment only trains
what is missing: a cell is finished when it holds the checkpoint of step `total_steps`; an
unfinished one resumes from its latest checkpoint. With `teacher.auto = "oracle"` the oracle
teacher store is built once per (data, grid, noise) under WORKDIR/teachers and shared.

Outputs (atomically written) in `--out` (default docs/experiments): NAME.md (the table, mean
and spread over seeds, with the budget and the wall time), NAME.png and NAME.json (every
cell's numbers).

Layout: each experiment is a module (data_ratio, ablation, teacher_noise, spurious_p, peers,
choices, hard, seeds)
with its grid, table and plot functions in an `Experiment` (base.py); cells.py makes a cell's
config and names its workdir, runner.py trains the cells and writes the outputs, cli.py is the
command line. The main job (`lfi_jax.demo`) is a preset of the same runner.

Budgets: `full` (default) uses the config as written (the demo: 800 steps of batch 128,
the same budget as the main job; 3-5 minutes per cell on 2 CPU cores, see docs/experiments.md);
`small` trains each demo cell for 300 steps (the demo's batch, evaluation every 50 steps on 500 test
images per split) for quick looks: at that budget the from-scratch ViT is still on its loss
plateau. On a config other than the demo, `small` divides total_steps, warmup, eval and
checkpoint intervals by 10.
"""

from lfi_jax.experiments.base import ABLATION_NAMES, MODEL_NAMES, Cell, CellResult, Experiment, GridOptions, Group
from lfi_jax.experiments.cells import budget_overrides, cell_config, cell_dirname, config_hash, config_label
from lfi_jax.experiments.cli import EXPERIMENTS, main
from lfi_jax.experiments.runner import finished_metrics, run_cells, run_experiment, summarise
from lfi_jax.experiments.teacher_noise import NOISE_LEVELS

__all__ = [
    "ABLATION_NAMES",
    "EXPERIMENTS",
    "MODEL_NAMES",
    "NOISE_LEVELS",
    "Cell",
    "CellResult",
    "Experiment",
    "GridOptions",
    "Group",
    "budget_overrides",
    "cell_config",
    "cell_dirname",
    "config_hash",
    "config_label",
    "finished_metrics",
    "main",
    "run_cells",
    "run_experiment",
    "summarise",
]
