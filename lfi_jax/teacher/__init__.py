"""Teacher maps C_vlm: the store, the oracle and LLaVA exporters."""

from lfi_jax.teacher.store import StoreWriter, TeacherStore
from lfi_jax.teacher.types import Geometry, TeacherEntry

__all__ = ["Geometry", "StoreWriter", "TeacherEntry", "TeacherStore"]
