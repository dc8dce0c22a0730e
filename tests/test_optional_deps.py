"""The main job (classification on the embedded benchmark) needs none of the optional extras:
`pip install -e .` alone must run it (README's first command). Checked in a fresh interpreter
in which the extras' packages cannot be imported."""

import subprocess
import sys
import textwrap

BLOCKED = ("pycocotools", "torch", "transformers", "safetensors", "tensorflow_datasets")

SCRIPT = textwrap.dedent(
    f"""
    import importlib.abc, sys

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in {BLOCKED!r}:
                raise ImportError(f"blocked optional dependency: {{name}}")
            return None

    sys.meta_path.insert(0, Block())
    import lfi_jax.demo, lfi_jax.train, lfi_jax.evaluate, lfi_jax.experiments.cli  # noqa: F401
    from lfi_jax.config import load_config_file
    from lfi_jax.data.sources import get_source

    config = load_config_file("configs/demo.py", "ivit")
    src = get_source(config.data.source, "train", config.data.options)
    assert src[0]["image"].shape == (48, 48, 3)
    print("ok")
    """
)


def test_main_job_imports_without_the_extras():
    r = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip().endswith("ok")
