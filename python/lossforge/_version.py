# The one place the version is written (pyproject.toml reads it through setuptools' `attr:`).
__version__ = "0.1.0"
