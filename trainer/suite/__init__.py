"""The offline continual-learning task suite: tasks with seeded train/test splits and
exact-match scoring (``tasks``), the seeds' six task orders (``orders``) and the CL metrics
AA, BWT, FWT and FR (``metrics``)."""

from trainer.suite.metrics import (
    average_accuracy,
    backward_transfer,
    forgetting_rate,
    forward_transfer,
    seen_task_accuracy,
    summarize,
)
from trainer.suite.orders import ORDERS, get_order
from trainer.suite.tasks import TASKS, Example, Task, accuracy, get_task, score

__all__ = [
    "ORDERS",
    "TASKS",
    "Example",
    "Task",
    "accuracy",
    "average_accuracy",
    "backward_transfer",
    "forgetting_rate",
    "forward_transfer",
    "get_order",
    "get_task",
    "score",
    "seen_task_accuracy",
    "summarize",
]
