"""The package's version: a leaf every layer may import (the stores record it)."""

__version__ = "0.1.0"
