"""Benchmarks: `expertmesh bench serve` (a load generator for any OpenAI-compatible server)
and `expertmesh bench offline` (the engine in-process vs transformers generate()).

datasets.py: workloads; load_generator.py: the async client and its timings; metrics.py: the
metric definitions (vLLM's); report.py: table, JSON, plots; offline.py: the offline run;
cli.py: the arguments. Recorded results and how to reproduce them: bench/README.md.
"""
