"""Data: sources named by a spec string, geometry-exact transforms, the grain pipeline."""

from lfi_jax.data.shortcut_digits import SPURIOUS_PRESETS, ShortcutDigits
from lfi_jax.data.sources import DataSource, get_source

__all__ = ["DataSource", "SPURIOUS_PRESETS", "ShortcutDigits", "get_source"]
