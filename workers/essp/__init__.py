"""ESSP: elastic streaming sequential data processing for two-stream video classification.

The package is layered; a module imports only from its own subpackage and from the layers below it
(``tests/test_layout.py`` reads the import graph from the source and keeps it so):

==================  ==========================================================================
``cli``             the ``essp`` command line and ``essp demo``
``bench``           ``essp bench``: the data plane and the trainers measured
``orchestration``   what the DAGs run: the stage registry, the stages of each DAG, the UI's pages
``lifecycle``       a run from params to registered model: the pipeline, the registry, predict
``evaluation``      video-level scoring, metrics, fusion strategies, the run report
``training``        architectures, models, the trainer, the resident trainer, a run's artifacts
``deploy``          the resident workers kept running: local processes or Kubernetes
``dataplane``       epoch plans, decode and extractor workers, payloads in Redis, the consumer
``datasets``        videos (probe, decode), manifests, ingest, refresh, the synthetic set
``stack``           the local services, Airflow's processes, background processes, a browser
``clients``         Kafka, Redis and S3 clients
(root)              ``settings``, ``errors``, ``contract`` (topics, keys, messages), ``registry``
                    (the one name -> thing table type), ``connections``, ``compat``
==================  ==========================================================================

``essp.operators`` (the folder ``operators/``) is Airflow's side and sits above all of them.
"""

__version__ = "0.1.0"
