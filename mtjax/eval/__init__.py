"""Evaluation: teacher-forced per-task metrics, KV-cache generation, scorers, `mtjax eval`."""
