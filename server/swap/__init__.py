"""The hot-swap: keeping what the engine serves in step with the adapter store, with no restart.

A newcomer's map, in the order a publish meets it:

- :mod:`server.swap.sync` (``AdapterSync``) hears of a ledger change (a Redis event or the poll),
  verifies the live versions and loads what the engine lacks;
- :mod:`server.swap.engine_adapters` keeps one record per adapter put into the engine;
- :mod:`server.swap.registry` maps each public model name (``base``, a task, ``continual``) to
  what answers it, and holds requests back while a weights swap runs;
- :mod:`server.swap.weights` writes the live merge into the engine's weights (weights serving)
  and serves every other model as a :mod:`server.swap.corrections` adapter relative to them.
"""
