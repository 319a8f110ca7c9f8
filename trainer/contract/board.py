"""The job board both sides use: the API creates and cancels jobs, the worker claims and updates
them (:class:`trainer.jobs.JobBoard`, JSON files beside the store; torch-free)."""

from __future__ import annotations

from trainer.jobs import JobBoard

__all__ = ["JobBoard"]
