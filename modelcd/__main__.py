"""`python -m modelcd`: the same entry point as the `modelcd` command."""

from modelcd.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
