# The project is described in pyproject.toml; this file only serves tools that still
# call setup.py directly.
from setuptools import setup

setup()
