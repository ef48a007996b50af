"""The ``essp`` command line (``essp.cli.main``) and ``essp demo``. The top layer: imports any of the
library, and nothing imports it."""
