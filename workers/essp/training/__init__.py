"""Training one stream: the architecture registry, the models, the trainer (step, epoch, checkpoints,
DDP), the resident trainer of a run's stream, and a run's artifacts in S3 (checkpoints, scores).
Imports ``deploy`` and below (it never starts processes; the layer order only allows it)."""
