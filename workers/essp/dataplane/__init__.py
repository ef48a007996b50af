"""The streaming data plane: seeded epoch plans published as decode jobs, the resident worker base
(shared by the trainers), decode and extractor workers, the extractor registry, payloads and sample
states in Redis, and the trainers' prefetching consumer. Imports ``datasets`` and below."""
