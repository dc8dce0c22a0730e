"""Teacher maps C_vlm: the store, the oracle and LLaVA exporters, and which store a run reads
(`lfi_jax.teacher.resolve.resolve_teacher`)."""

from lfi_jax.teacher.provenance import DataIdentity, Provenance, check_compatible
from lfi_jax.teacher.store import StoreWriter, TeacherStore
from lfi_jax.teacher.types import Geometry, TeacherEntry

__all__ = ["DataIdentity", "Geometry", "Provenance", "StoreWriter", "TeacherEntry", "TeacherStore", "check_compatible"]
