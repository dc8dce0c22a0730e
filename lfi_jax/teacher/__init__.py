"""Teacher maps C_vlm: the store, the oracle and LLaVA exporters."""

from lfi_jax.teacher.types import Geometry, TeacherEntry

__all__ = ["Geometry", "TeacherEntry"]
