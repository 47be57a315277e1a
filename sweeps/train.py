"""The program W&B sweeps launch: ``python sweeps/train.py --key=value ...``.

A thin wrapper over :func:`rlmonitor.apps.train.main` (arguments:
:class:`rlmonitor.apps.train.TrainArguments`).
"""

import sys

from rlmonitor.apps.train import main

if __name__ == "__main__":
    sys.exit(main())
