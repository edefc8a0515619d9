"""Where generation and scoring run: in-process (`local`) or on Ray actors (`ray`), behind one interface."""
from align.backends.base import Backend
from align.backends.local import LocalBackend

__all__ = ["Backend", "LocalBackend"]
