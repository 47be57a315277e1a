"""The program W&B sweeps launch: ``python sweeps/train.py --key=value ...``.

A thin wrapper over :func:`rlmonitor.apps.train.main`, the same program as
``rlmonitor train`` (arguments: :class:`rlmonitor.apps.train.TrainArguments`;
``python sweeps/train.py --help`` lists them).
"""

import sys

from rlmonitor.apps.train import main

if __name__ == "__main__":
    sys.exit(main())
