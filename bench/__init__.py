"""Lamina's benchmarks. Each ``bench/<name>/`` measures one thing and writes its table and JSON to
``bench/results/`` with :mod:`bench.provenance`'s machine header. ``bench`` and
``bench.continual`` are installed with Lamina (pyproject.toml) so that ``lamina bench continual``
runs from an installed checkout; the other benchmarks are scripts run from the checkout."""
