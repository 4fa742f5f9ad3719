"""`python -m digitwatch`: the same entry point as the `digitwatch` script."""

from digitwatch.cli import main

if __name__ == "__main__":
    main()
