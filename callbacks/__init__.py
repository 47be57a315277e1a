"""Trainer integration (transformers / TRL / PEFT aware), installed as ``rlmonitor.callbacks``."""
