"""The version of foldgpt, in a module of its own so that writers can record it without importing the package."""

__version__ = "0.2.0"
