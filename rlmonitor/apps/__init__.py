"""Front-ends of rlmonitor: the ``rlmonitor`` sub-commands (compare, sweep, demo, train)."""
