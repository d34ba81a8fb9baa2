"""`python -m dvi ...` runs the `dvi` command line (the same entry point as the installed script)."""

from dvi.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
