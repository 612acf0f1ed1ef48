"""The `serve` and `batch` subcommands: their flags and what they run (app/cli.py only wires them in)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from app.argtypes import whole
from app.errors import UsageError


PREVIEW_METHODS = ("none", "auto", "latent2rgb")  # ComfyUI's --preview-method names that edgegen serves


def add_parsers(sub) -> None:
    """Add `serve` and `batch` to the CLI's subparsers (argparse's `add_subparsers()` result)."""
    s = sub.add_parser("serve", help="local HTTP API in ComfyUI's shapes (/prompt, /history, /view, /ws)")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default loopback only; any other "
                                                         "needs --token-file)")
    s.add_argument("--port", type=_port, default=8188)
    s.add_argument("--token-file", type=Path, help="file holding the token every request must carry")
    s.add_argument("--bundle", type=Path, action="append", default=[],
                   help="a bundle, or a folder of bundles, to serve (repeatable; engines/ is always searched)")
    s.add_argument("--output", type=Path, help="folder for generated images (default: per-user data folder)")
    s.add_argument("--alias", action="append", default=[], type=_alias, metavar="NAME=BUNDLE",
                   help="let loaders name BUNDLE as NAME, e.g. flux-2-klein-4b.safetensors=klein4b, so ComfyUI's "
                        "templates run unchanged (repeatable)")
    s.add_argument("--preview-method", choices=PREVIEW_METHODS, default="none",
                   help="step previews over /ws as ComfyUI's binary preview frames: none (ComfyUI's default) or "
                        "latent2rgb (auto: the same)")
    s.add_argument("--cluster", metavar="ADDRESS", help="spread jobs over a Ray cluster's GPUs: the head's IP:PORT, "
                                                         "or 'local' for this machine's GPUs (docs/CLUSTER.md)")
    s.add_argument("--cluster-token-file", type=Path, metavar="FILE",
                   help="Ray token authentication (needed when the cluster spans machines)")
    s.add_argument("--cluster-node-ip", metavar="IP", help="this machine's address in the cluster (default: the "
                                                            "head's, i.e. serve runs on the head)")
    s.add_argument("--replicas", type=_positive, help="at most this many replicas (default: one per GPU; one per "
                                                      "node on a cluster without GPUs)")
    s.add_argument("--cluster-retries", type=int, default=2, metavar="N",
                   help="a job whose replica dies runs again at most N times, then fails (default 2)")
    s.add_argument("--redact-prompts", action="store_true", help="audit log keeps prompt hashes, not prompt text")
    s.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN",
                   help="a web page origin allowed to call the API (none by default)")

    b = sub.add_parser("batch", help="run a CSV catalogue through a workflow, resumable")
    b.add_argument("rows", type=Path, metavar="ROWS.csv")
    b.add_argument("--workflow", type=Path, required=True, help="ComfyUI API-format workflow with {column} fields")
    b.add_argument("--server", help="URL of a running edgegen serve (default: run in this process)")
    b.add_argument("--concurrency", type=_positive, default=2, help="jobs in flight at once (default 2)")
    b.add_argument("--resume", action="store_true", help="skip rows the results CSV records as done")
    b.add_argument("--results", type=Path, help="results CSV (default: ROWS.results.csv)")
    b.add_argument("--token-file", type=Path)
    b.add_argument("--bundle", type=Path, action="append", default=[], help="in-process only: bundles to serve")
    b.add_argument("--output", type=Path, help="in-process only: folder for generated images")
    b.add_argument("--alias", action="append", default=[], type=_alias, metavar="NAME=BUNDLE",
                   help="in-process only: loaders may name BUNDLE as NAME (as serve --alias)")


_port = whole(0, 65535, "port number", " (0 picks a free one)")
_positive = whole(1)


def _alias(text: str) -> tuple[str, str]:
    import argparse

    name, sep, bundle = text.partition("=")
    if not sep or not name.strip() or not bundle.strip() or "/" in name or "\\" in name:
        raise argparse.ArgumentTypeError(f"{text!r} is not NAME=BUNDLE (a file name a workflow's loader uses, and "
                                         "a served bundle's name), e.g. flux-2-klein-4b.safetensors=klein4b")
    return name.strip(), bundle.strip()


def _server_deps() -> None:
    if importlib.util.find_spec("aiohttp") is None:
        raise UsageError("edgegen serve needs aiohttp; install it with: pip install 'edgegen[server]'")


def cmd_serve(args, cluster=None) -> int:
    """`cluster`: the cluster's `serve(config, address, say)`, passed in by the CLI (the server never imports it)."""
    from app.progress import say
    from app.server.config import ServerConfig, is_loopback
    from app.server.security import read_token_file

    _server_deps()
    if not is_loopback(args.host) and args.token_file is None:
        raise UsageError(f"--host {args.host} is reachable from other machines and needs --token-file FILE "
                         "(a long random secret every request must carry); or keep the default 127.0.0.1")
    token = read_token_file(args.token_file) if args.token_file else None
    config = ServerConfig(host=args.host, port=args.port, token=token, bundles=tuple(args.bundle),
                          output_dir=args.output, redact_prompts=args.redact_prompts,
                          cors_origins=tuple(args.cors_origin), aliases=tuple(args.alias),
                          preview_method="none" if args.preview_method == "none" else "latent2rgb")
    if args.cluster and config.preview_method != "none":
        raise UsageError("--preview-method applies to a server that generates itself; cluster replicas send no "
                         "previews yet: drop --preview-method or --cluster")
    if args.cluster:
        if cluster is None:
            raise UsageError("--cluster is not available in this edgegen; run one edgegen serve per GPU")
        return cluster(config, args.cluster, say, node_ip=args.cluster_node_ip, replicas=args.replicas,
                       retries=args.cluster_retries, token_file=args.cluster_token_file)
    from app.server.run import serve

    return serve(config, say)


def cmd_batch(args) -> int:
    from app.progress import say
    from app.server.batch import run_batch
    from app.server.config import ServerConfig
    from app.server.security import read_token_file

    _server_deps()
    if args.server and (args.bundle or args.output or args.alias):
        raise UsageError("--bundle, --output and --alias apply to in-process runs; with --server the server "
                         "decides them")
    token = read_token_file(args.token_file) if args.token_file else None
    from app.server.config import default_data_dir

    # Its own queue database: one a running `edgegen serve` holds stays untouched.
    db = (args.output.absolute().parent / f"{args.output.name}-batch-queue.sqlite3" if args.output
          else default_data_dir() / "batch-queue.sqlite3")
    local = ServerConfig(port=0, bundles=tuple(args.bundle), output_dir=args.output, db_path=db,
                         aliases=tuple(args.alias))
    res = run_batch(args.rows, args.workflow, server=args.server, concurrency=args.concurrency, resume=args.resume,
                    results=args.results, token=token, local_config=local, say=say)
    say(f"{res.done} rows done, {res.failed} failed, {res.skipped} skipped as already done; "
        f"results: {res.results_csv}")
    print(res.results_csv)
    if res.failed:
        say(f"edgegen: error: {res.failed} rows failed; their errors are in {res.results_csv}; fix them and "
            "re-run with --resume")
        return 1
    return 0
