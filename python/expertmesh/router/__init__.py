"""`expertmesh router`: replicas behind one OpenAI front (ring.py, policies.py, backends.py,
proxy.py, app.py, main.py)."""
