"""The speed layer: a kafka-python consumer that keeps exact, checkpointed incremental views of recent events.

Modules, one concern each (the folder mirrors the architecture):

- :mod:`speed.state`      incremental aggregates per view, split by ``(partition, block_start)`` (the handoff rule)
- :mod:`speed.snapshot`   the speed snapshot the serving layer reads (``views/speed/<snapshot>/``)
- :mod:`speed.checkpoint` the durable checkpoint (snapshot + positions + dedup windows) and its commit protocol
- :mod:`speed.batch_watch` watching published batch versions (the speed side of the handoff)
- :mod:`speed.hand_off`    the batch DAG's handoff step: hand off now (wait for, or run once, the speed layer)
- :mod:`speed.rebuild`    replaying the log for views whose definition changed
- :mod:`speed.consumer`   the run loop (``lambdalake speed``)
- :mod:`speed.partitions` the partitions a speed worker owns: owner locks and ownership epochs
- :mod:`speed.recovery`   where the speed layer starts: the last checkpoint, or just below the batch watermark
- :mod:`speed.capture`    what a checkpoint captures of the running layer (commit step 1)
- :mod:`speed.prune`      handing off: dropping what a newly published batch version covers
- :mod:`speed.changed_views` views not of their declared definition: kept rows, rebuild, swap
- :mod:`speed.live`       the pipeline changing while running (file edits, forgotten subjects)
- :mod:`speed.broker_watch` telling the user when the Kafka connection is lost and back
- :mod:`speed.workers`    N speed worker processes (``lambdalake speed --workers N``)
- :mod:`speed.replay`     Kappa recompute of views from the log alone (``lambdalake replay``)
- :mod:`speed.cli`        command registration
"""
