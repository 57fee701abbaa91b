"""`genius ui`: the search web page (cluster.ui) for search replicas that are already running."""
from __future__ import annotations

import argparse
import logging
import signal
import threading

log = logging.getLogger("genius.ui")


def wait_for_signal() -> None:
    """Block until SIGTERM or SIGINT (Ctrl-C)."""
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()


def _ui(args: argparse.Namespace) -> int:
    from cluster.serve import read_tokens
    from cluster.ui import start_ui

    token = read_tokens(args.token_file)[0] if args.token_file else None
    ui = start_ui(args.address, args.shards, args.host, args.port, tls_ca=args.tls_ca, token=token,
                  timeout=args.timeout)
    print(f"search page on {ui.url} (search replicas at {args.address}); Ctrl-C stops it", flush=True)
    try:
        wait_for_signal()
    finally:
        ui.stop()
    return 0


def add_ui_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ui", help="a search web page for running search replicas",
                       description="Serve a search page (text, image or both; thumbnails of image hits, "
                                   "snippets of text hits) that calls the search replicas at --address. "
                                   "Stop with SIGTERM or Ctrl-C.")
    p.add_argument("--address", default="127.0.0.1:50051",
                   help="search replicas: host:port or a gRPC target such as dns:///search:50051 "
                        "(default: 127.0.0.1:50051)")
    p.add_argument("--port", type=int, default=8080, help="HTTP port of the page (default: 8080; 0: any free port)")
    p.add_argument("--host", default="127.0.0.1",
                   help="interface to listen on (default: 127.0.0.1, this machine only; 0.0.0.0: every interface)")
    p.add_argument("--shards", help="the shards the index was built from (folder, glob, brace pattern or URL, as "
                                    "for `genius index build`): pictures and texts of hits are read from them "
                                    "(default: none, hits show key and metadata)")
    p.add_argument("--tls-ca", help="PEM file of the CA (or self-signed certificate) to trust: reach the replicas "
                                    "over TLS")
    p.add_argument("--token-file", help="bearer token for the replicas (first line of the file)")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds per search (default: 30)")
    p.set_defaults(run=_ui)
