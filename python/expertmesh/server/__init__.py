"""The HTTP server behind `expertmesh serve` (see serve.py, app.py and engine_process.py)."""
