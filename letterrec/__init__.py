"""The `letterrec` command line: a thin dispatcher over training/ and service/."""

__version__ = "0.1.0"
