"""``python -m server`` is the same as the ``lamina`` command."""

from server.cli import app

if __name__ == "__main__":
    app()
