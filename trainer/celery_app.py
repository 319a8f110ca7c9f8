"""The Celery application; it lives in the contract (:mod:`trainer.contract.queue`), since the API
sends tasks with it. The worker's own code imports it from here."""

from trainer.contract.queue import TRAIN_TASK, make_celery

__all__ = ["TRAIN_TASK", "make_celery"]
