"""User-facing errors: the CLI prints ``fxsdc: <message>`` and exits with status 2, no traceback."""
from __future__ import annotations


class UserError(ValueError):
    """A mistake in what the user asked for (a name, a bit, an index, a config file)."""
