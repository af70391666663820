"""``python -m gradtool`` runs the command-line tool (the same as the ``gradtool`` script)."""

from gradtool.cli import run

run()
