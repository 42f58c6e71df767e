"""The pipeline: the pass manager, per-unit sensitivity, allocation toward cost targets, executors
and the report."""
