"""``lamina bench continual``: train methods task after task and measure what they forget.

One module per job: :mod:`~bench.continual.config` (what a run measures), :mod:`~bench.continual.runner`
(training through the worker's path and evaluation on the live merge),
:mod:`~bench.continual.results` (the matrices and their metrics), :mod:`~bench.continual.writers`
(markdown, JSON, PNG) and :mod:`~bench.continual.cli` (the command). Provenance:
:mod:`bench.provenance`.
"""
