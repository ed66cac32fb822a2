"""Pipelines: the main jobs (the language-model reproduction) and their reports."""
