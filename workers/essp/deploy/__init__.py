"""Keeping resident workers running: the one way to start a local resident process (detached, with a
PID file, ready when the worker says so), the fleet a run needs (local processes or Kubernetes
Deployments) and its scaling. Imports ``dataplane`` (the registered extractor kinds) and below."""
