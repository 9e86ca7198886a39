"""``python -m aemt`` = the ``aemt`` command."""

from aemt.cli import main

if __name__ == "__main__":  # not when a worker process of ``--jobs`` imports this module again
    main()
