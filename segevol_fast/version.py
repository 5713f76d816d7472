"""The package version, in a module of its own so that results and `info()` can name it without
importing the package that imports them."""

__version__ = "0.1.0"
