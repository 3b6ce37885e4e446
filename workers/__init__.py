"""workers: the worker process, the agent host and the plugin API (Agent, @action).

Depends on :mod:`phoenix_node.state` and :mod:`ipc` only.
"""

__all__: list[str] = []
