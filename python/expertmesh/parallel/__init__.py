"""Parallelism lives here, never in layers/: process groups (groups.py), the expert-parallel
all-to-all (all_to_all.py) over interchangeable transports (transport.py: torch.distributed;
shm.py: shared memory between CPU processes on one host), and launching rank processes
(launch.py, worker.py)."""
