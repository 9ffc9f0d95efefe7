"""Pipelines shipped with lambdalake. ``clickstream`` is the demo; users bring their own with --pipeline."""
