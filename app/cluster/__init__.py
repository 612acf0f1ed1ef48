"""`edgegen serve --cluster`: the server's queue and API in front of generation replicas on a Ray cluster.

Ray (the optional `cluster` extra) is imported only inside this package's functions, so `app.cluster` imports
without it and the CLI can say how to install it.
"""

from __future__ import annotations

from collections.abc import Callable


def serve(config, address: str, say: Callable[[str], None] = print, **settings) -> int:
    """Run `edgegen serve` with its jobs dispatched to replicas on the Ray cluster at `address` ("local" starts one)."""
    from app.cluster.run import serve as run

    return run(config, address, say, **settings)
