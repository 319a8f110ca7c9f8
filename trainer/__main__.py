"""``python -m trainer`` is the ``lamina-worker`` command: the training worker on its own entry
point, which is how :mod:`server.processes` starts it without importing training code."""

from trainer.cli import main

if __name__ == "__main__":
    main()
