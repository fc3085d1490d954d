"""Builders and references the tests share: tiny models and adapters (fixtures), tiny diffusers pipelines
(pipeline_fixtures), the independent float64 IterIS (reference), the import-graph checker (architecture) and a
float64 merge config (merging). Import them as ``from tests.helpers import fixtures``."""
