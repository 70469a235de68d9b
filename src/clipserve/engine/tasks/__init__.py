"""The engine's tasks, one module each, over :class:`~clipserve.engine.core.EngineCore`: each takes
parsed inputs and returns results (evaluate, embed, rank and classify)."""
