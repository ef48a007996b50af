"""``essp bench``: the data plane against DataLoader baselines, and the trainers' step and data wait.
Imports ``orchestration`` and below."""
