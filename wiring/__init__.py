"""The wiring above the layers: the root ``lambdalake`` command, the demo, the producer and the Airflow glue.

The core (``lambdalake/``) is the ground floor every layer imports; ``batch/``, ``speed/`` and ``serving/`` stand side
by side on it; ``audit/`` checks them all. This package is the only one that puts layers together.
"""
