"""Evaluation tasks (RULER-style synthetic, passkey, user jsonl, LongBench v1) and their metrics."""

from kvcompress.tasks.base import Sample, Task, TaskDataError
from kvcompress.tasks.metrics import METRICS, postprocess, score
from kvcompress.tasks.registry import TASKS, build_task

__all__ = ["METRICS", "TASKS", "Sample", "Task", "TaskDataError", "build_task", "postprocess", "score"]
