"""``python -m aemt`` = the ``aemt`` command."""

from aemt.cli import main

main()
