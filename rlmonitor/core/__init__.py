"""Framework-free core of rlmonitor (torch, numpy, the standard library; never
transformers, trl or a hard dependency on wandb): naming, configuration, the key
registry, the analysis engine, snapshots, the worker, sinks and collapse detection.

Nothing is imported here, so ``rlmonitor.core.bf16bits`` stays free of torch."""
