"""The embedded local stack: the services (PostgreSQL, Redis, S3, the Kafka-protocol broker) probed,
installed, started and stopped; Airflow's four processes and its REST API; background processes
with PID files; headless Chromium. Imports the root and ``clients``."""
