"""Evaluating a run: video-level scoring through the workers, metrics, the fusion strategies (a
registry), and the run report (JSON and plots in S3). Imports ``training`` and below."""
