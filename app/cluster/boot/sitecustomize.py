"""Run by Python at start-up in every process of a Ray node edgegen started (this folder is on PYTHONPATH).

It installs edgegen's offline guard before Ray's own code runs, so Ray's Python processes (API server,
agents, workers) on every node refuse non-loopback connections and name lookups the way the CLI does. If the
guard cannot be installed the process stops: a node never runs unguarded.
"""

import os

if os.environ.get("EDGEGEN_CLUSTER_GUARD") == "1":
    from app.cluster.guard import install

    install()
