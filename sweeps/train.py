"""The program W&B sweeps launch: ``python sweeps/train.py --key=value ...``.

A thin wrapper over :func:`rlmonitor.train.main` (arguments:
:class:`rlmonitor.train.TrainArguments`).
"""

import sys

from rlmonitor.train import main

if __name__ == "__main__":
    sys.exit(main())
