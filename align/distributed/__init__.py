"""Training across processes: the rank context every phase asks for counts and reductions (docs/distributed.md)."""
from align.distributed.context import DistContext, DistributedError, get_context, init_from_env

__all__ = ["DistContext", "DistributedError", "get_context", "init_from_env"]
