"""The rewrites, one a module, each declared once in :mod:`.registry` (docs/writing-a-pass.md).

Importing this package imports every pass module, so the registry, and the pass names options
accept, are complete from then on.
"""

from .registry import discover

discover()
