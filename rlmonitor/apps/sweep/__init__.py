"""``rlmonitor sweep``: validated W&B sweep configs and a local runner. See :mod:`.spec`."""

from .spec import *  # noqa: F403
from .spec import __all__  # noqa: F401
