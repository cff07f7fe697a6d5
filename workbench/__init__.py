"""workbench: measure inference-acceleration techniques on your own hardware, quality beside speed."""

__version__ = "0.1.0"
