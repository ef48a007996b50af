"""What the DAGs run, Airflow-free: the stage registry and the stages of each DAG (named after their
tasks), the DAGs' params as Airflow takes them, the DAG-run <-> run links, and the pages of the UI
plugin. Imports ``lifecycle`` and below."""
