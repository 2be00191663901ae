"""`python -m sana ...`: the headless command line (see `sana.cli`)."""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
