"""State shared by gateway replicas through Redis: limits, usage counters and backend slot leases.

Off by default: without ``STATE_URL`` every replica keeps its state in process (and in SQLite).
Nothing here is imported on that path except :mod:`llamaproxy.state.url` (option parsing).
"""
