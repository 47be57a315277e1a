"""``rlmonitor demo``: RLVR vs SFT geometry on a laptop CPU. See :mod:`.run`."""

from .run import *  # noqa: F403
from .run import __all__  # noqa: F401
