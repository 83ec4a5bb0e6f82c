"""The version of fastreg, in one place (read by setup.py, pyproject.toml and the package)."""
__version__ = "0.1.0"
