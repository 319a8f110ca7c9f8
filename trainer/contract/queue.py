"""The Celery application and the name of the training task. The API process only *sends* tasks by name;
the training code is imported by the worker alone (``include`` below)."""

from __future__ import annotations

from celery import Celery

from trainer.contract.settings import LaminaSettings

TRAIN_TASK = "lamina.train"


def make_celery(settings: LaminaSettings) -> Celery:
    """A Celery app for these settings: acks_late + prefetch 1 so a job whose worker dies is
    redelivered, not lost; one queue; results are not kept (jobs have their own records)."""
    app = Celery("lamina", include=["trainer.worker"])
    if settings.broker_url:
        app.conf.broker_url = settings.broker_url
    else:
        # The embedded default: kombu's filesystem transport, so the demo needs no service.
        folder = settings.home.resolve() / "broker"
        for sub in ("queue", "processed", "control"):
            (folder / sub).mkdir(parents=True, exist_ok=True)
        app.conf.broker_url = "filesystem://"
        app.conf.broker_transport_options = {
            "data_folder_in": str(folder / "queue"),
            "data_folder_out": str(folder / "queue"),
            "processed_folder": str(folder / "processed"),
            "control_folder": str(folder / "control"),  # else kombu writes ./control in the cwd
            "store_processed": False,
        }
    app.conf.update(
        task_default_queue=settings.queue,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_ignore_result=True,
        worker_hijack_root_logger=False,
        broker_connection_retry_on_startup=True,
        # A broker restart must not kill the training in progress: its job is on the job
        # board, which the worker keeps using (trainer/worker.py).
        worker_cancel_long_running_tasks_on_connection_loss=False,
        worker_send_task_events=False,
    )
    return app
