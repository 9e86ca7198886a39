"""``python -m aemt`` = the ``aemt`` command."""

from aemt.cli import main

if __name__ == "__main__":  # only as `python -m aemt`, never on import
    main()
