"""``python -m changedetect`` is the ``changedetect`` command."""

from changedetect.cli.main import cli

if __name__ == "__main__":
    cli()
