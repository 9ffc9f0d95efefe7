"""The batch layer: the exactly-once master dataset archiver (Kafka -> Parquet) and the Spark job that recomputes
and publishes versioned batch views.

Modules:

- :mod:`batch.master` — the master file schema and atomic Parquet writes (the layout contract, in Arrow terms).
- :mod:`batch.archiver` — ``lambdalake ingest``: Kafka -> master files + dead-letter topic, exactly once (the roll
  protocol); :mod:`batch.partition_buffer` (one partition's buffer and when it rolls), :mod:`batch.dead_letters`
  (the DLQ writer), :mod:`batch.ingest_workers` (``--workers N``).
- :mod:`batch.rewrite` — the journaled rewrite of master files (locks, intent record, swap, recovery), used by
  :mod:`batch.compact` (``lambdalake compact``: small adjacent master files into one) and :mod:`batch.erase`
  (``lambdalake forget``: master and rejected files without a forgotten subject).
- :mod:`batch.job` — ``lambdalake batch``: the run protocol of the Spark job (also ``spark-submit``), its steps in
  :mod:`batch.inputs` (input files and checksums), :mod:`batch.compute` (steps 2-4 per source, full or incremental),
  :mod:`batch.spark_dedup` (valid rows below W, dedup), :mod:`batch.spark_views` (the Spark interpreter of the view
  declarations), :mod:`batch.staged_checks` (checks before publishing), :mod:`batch.incremental` (incremental or
  full), :mod:`batch.carry_over` (published files linked into a new version); :mod:`batch.spark_session`,
  :mod:`batch.spark_types` and :mod:`batch.spark_rules` (the field rules compiled to Spark) are its Spark ground.
- :mod:`lambdalake.versions` — version directories, the ``CURRENT`` pointer switch, rollback and pruning.
- :mod:`batch.plan` — is the master dataset caught up, and does the published version need a recompute (new data,
  a changed or missing view definition)? Used by the Airflow DAG.
- :mod:`batch.verify` — the independent re-check of a published version against the declaration and the master
  dataset (DuckDB; the seed of ``lambdalake audit``).
"""
