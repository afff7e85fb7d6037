"""The one error type of configuration problems, below every layer that reads a config section.

``data/``, ``models/`` and ``training/`` all raise it; it lives here (it imports nothing) so that the low layers
need not import the training layer that composes their config sections. The CLI prints it without a traceback.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A config file, key or value is invalid; the message names where and what was expected."""
