"""The server↔trainer contract: everything the API process shares with the worker, and the only
part of ``trainer`` that ``server`` may import (``tests/unit/test_import_contract.py`` checks it).

It loads no training code (no transformers, PEFT or training loop), and no torch except where
admission reads the store (:mod:`.admission`, through ``adapters_store``, which the server uses anyway):

- :mod:`.settings`: the settings every process agrees on (``LAMINA_*``), and how a bad one reads;
- :mod:`.jobs`: the job model (the worker's record and the public view the API returns) and the
  board both sides read and write;
- :mod:`.tasks`: what a task request holds (examples, method, hyper-parameters), re-exported from
  the method catalogue's side (the one module that re-exports; its docstring says why);
- :mod:`.admission`: can a task join the store, and why not, as a reason the server maps to an
  HTTP status;
- :mod:`.queue`: the Celery app and the name of the training task the API sends;
- :mod:`.chat`: the chat template both the engine and the trainer render with;
- :mod:`.logs`: one log configuration for both processes.

Import the submodules, not this package's namespace: the package re-exports nothing, so that
trainer modules can import a contract module without loading the rest.
"""
