"""A run from params to a registered model: the run's params (one schema), the master's side of each
epoch, the pipeline's steps, the model registry, nightly fine-tuning and prediction. Imports
``evaluation`` and below."""
