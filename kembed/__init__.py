"""kembed: embed domain knowledge into language models and compare the methods that do it.

Importing this package is cheap (no torch); the heavy modules are imported by the commands
that need them.
"""

__version__ = "0.1.0"
