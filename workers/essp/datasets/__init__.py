"""Videos and datasets: probing and exact segment decode of in-memory video bytes, versioned manifests
with quarantine, ingest of a UCF-101-style folder, refresh from the videos bucket, the synthetic
motion dataset. Imports the root, ``clients`` and ``stack``."""
