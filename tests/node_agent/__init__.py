"""The test node agent: runs the pods bound to its node as Docker containers (see agent.py)."""
