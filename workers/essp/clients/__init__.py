"""Clients of the three services: Kafka (topics, a producer, a consumer-group member with manual commits
and dead-lettering), Redis (a pooled client) and S3 (a typed object store). Errors name the service
and address. Imports only the package root (settings, errors, contract)."""
