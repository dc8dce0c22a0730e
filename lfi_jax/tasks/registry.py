"""The config boundary: `config.task` (a name) -> the `Task` object. Past this point the
object is passed around, never the name."""

from __future__ import annotations

from lfi_jax.tasks import Task, classification, detection, segmentation

DEFAULT = "classification"
TASKS: dict[str, Task] = {
    "classification": classification.TASK,
    "detection": detection.TASK,
    "segmentation": segmentation.TASK,
}


def task_name(config) -> str:
    """`config.task`, or "classification" for configs written before the key existed."""
    name = config.get("task", DEFAULT) if hasattr(config, "get") else DEFAULT
    return name or DEFAULT


def get_task(config_or_name) -> Task:
    """The Task named by `config.task` (a ConfigDict) or by a name; an unknown name is an error
    naming the key and the known tasks."""
    name = config_or_name if isinstance(config_or_name, str) else task_name(config_or_name)
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"config.task={name!r}: unknown task (known: {', '.join(sorted(TASKS))})") from None
