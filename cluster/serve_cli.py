"""`genius serve shard|replica|local` and `genius query`: the gRPC servers and a command-line client."""
from __future__ import annotations

import argparse
import logging

log = logging.getLogger("genius.serve")

DECODE_PRECISIONS = ("fp32", "bf16", "int8")  # genius.decoder_precision.PRECISIONS (not imported: torch)
DECODE_PRECISION_HELP = ("the decoder's precision in search: fp32, bf16 or int8 (dynamic quantization); a "
                         "converted copy, the stored weights stay fp32. bench/decode.py measured bf16 1.8x and "
                         "int8 2.2x fp32's speed on a CPU with avx512_bf16, with 0.99 and 0.96 of its top-10 IDs "
                         "(default: fp32)")


def _options(args: argparse.Namespace):
    """ServerOptions from the flags, with Prometheus metrics served when --metrics-port is given."""
    from cluster.serve import ServerOptions

    metrics = None
    if args.metrics_port is not None:
        from workers.metrics import ServerMetrics

        metrics = ServerMetrics()
        port = metrics.serve(args.metrics_port)
        log.info("Prometheus metrics on http://0.0.0.0:%d/metrics", port)
    return ServerOptions.from_args(args, metrics)


def _replica_config(args: argparse.Namespace):
    from cluster.serve import read_tokens
    from workers.replica import Limits, ReplicaConfig

    token = read_tokens(args.shard_token_file)[0] if args.shard_token_file else None
    return ReplicaConfig(Limits(shard_timeout_s=args.shard_timeout), reload_interval_s=args.reload_interval,
                         max_batch=args.max_batch, shard_tls_ca=args.shard_tls_ca, shard_token=token,
                         decode_precision=args.decode_precision)


def _stop_on_signal(args: argparse.Namespace, servers) -> int:
    from cluster.serve import wait_for_termination

    wait_for_termination(servers, args.drain_seconds, args.grace_seconds)
    return 0


def _shard(args: argparse.Namespace) -> int:
    from cluster.serve import serve_shard

    server, port = serve_shard(args.index, args.range, args.listen, _options(args))
    print(f"shard {args.range} of {args.index} serving on port {port}", flush=True)
    return _stop_on_signal(args, [server])


def _replica(args: argparse.Namespace) -> int:
    from cluster.serve import read_shard_map, serve_replica

    server, port = serve_replica(args.index, read_shard_map(args.shards), args.listen, _options(args),
                                 _replica_config(args))
    print(f"search replica of {args.index} serving on port {port}", flush=True)
    return _stop_on_signal(args, [server])


def _local(args: argparse.Namespace) -> int:
    from cluster.serve import serve_local

    cluster = serve_local(args.index, args.listen, _options(args), _replica_config(args))
    print(f"search replica on {cluster.address} with {len(cluster.shards)} shard servers "
          f"({', '.join(f'{k}: {v[0]}' for k, v in cluster.shard_map.items())})", flush=True)
    ui = _start_ui(args, cluster.address) if args.ui else None
    try:
        return _stop_on_signal(args, cluster.servers)
    finally:
        if ui is not None:
            ui.stop()


def _start_ui(args: argparse.Namespace, address: str):
    """The search page (cluster.ui) for the local replica; its pictures come from --ui-shards, else
    from the shards the index build recorded (INDEX/.build), else hits show key and metadata."""
    from cluster.serve import read_tokens
    from cluster.ui import start_ui
    from cluster.ui.shard_media import build_shards

    shards = args.ui_shards or build_shards(args.index)
    token = read_tokens(args.token_file)[0] if args.token_file else None
    try:
        # With --tls-cert the replica serves TLS: the page trusts that certificate (self-signed).
        ui = start_ui(address, shards, "127.0.0.1", args.ui_port, tls_ca=args.tls_cert, token=token)
    except (OSError, ValueError) as err:  # e.g. the port is taken: the servers stay up
        log.error("search page not started: %s", err)
        return None
    print(f"search page on {ui.url}", flush=True)
    return ui


def _query(args: argparse.Namespace) -> int:
    import grpc

    from genius.client import SearchClient

    image = open(args.image, "rb").read() if args.image else None
    tls_ca = open(args.tls_ca, "rb").read() if args.tls_ca else None
    with SearchClient(args.address, tls_ca=tls_ca, token=args.token, timeout=args.timeout) as client:
        try:
            result = client.search(text=args.text, image=image, k=args.k, beam_size=args.beam,
                                   rerank=not args.no_rerank, target_modalities=args.modality)
        except grpc.RpcError as err:
            log.error("%s: %s", err.code().name, err.details())
            return 2
    flag = f"  PARTIAL: shards {', '.join(result.missing_shards)} did not answer" if result.partial else ""
    print(f"index {result.version}{flag}")
    for rank, (key, modality, score) in enumerate(zip(result.keys[0], result.modalities[0], result.scores[0]), 1):
        print(f"  {rank:3d}. {key}  [{modality.name.lower()}]  {score:.4f}")
    return 0


def add_serve_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="run gRPC search replicas and shard servers",
                       description="gRPC servers (genius.v1 SearchService / ShardService, grpc.health.v1, "
                                   "server reflection). Stop with SIGTERM or Ctrl-C.")
    cmds = p.add_subparsers(dest="serve_command", required=True, metavar="ROLE")
    c = cmds.add_parser("shard", help="serve one vector shard (an item-number range) for re-ranking")
    c.add_argument("--index", required=True, help="index folder (its CURRENT version) or a version folder")
    c.add_argument("--range", type=int, required=True, help="vector shard number (genius info lists them)")
    c.add_argument("--listen", default="0.0.0.0:50052", help="address to listen on (default: 0.0.0.0:50052)")
    c.set_defaults(run=_shard)
    c = cmds.add_parser("replica", help="serve search: encode, beam search, scatter to shard servers, gather")
    c.add_argument("--index", required=True, help="index folder (its CURRENT version) or a version folder")
    c.add_argument("--shards", required=True,
                   help='shard map JSON file: {"<vector shard number>": ["host:port", ...]} (several addresses '
                        'of one shard: fail over in order)')
    c.add_argument("--listen", default="0.0.0.0:50051", help="address to listen on (default: 0.0.0.0:50051)")
    c.set_defaults(run=_replica)
    c = cmds.add_parser("local", help="a replica plus every shard server on this machine (development, demo)")
    c.add_argument("--index", required=True, help="index folder")
    c.add_argument("--listen", default="127.0.0.1:50051", help="replica address (default: 127.0.0.1:50051)")
    c.add_argument("--ui", action="store_true", help="also serve the search web page (genius ui) on 127.0.0.1")
    c.add_argument("--ui-port", type=int, default=8080, help="HTTP port of the search page (default: 8080)")
    c.add_argument("--ui-shards", help="shards to read pictures and texts of hits from (as genius ui --shards; "
                                       "default: those the index build recorded in INDEX/.build, when there)")
    c.set_defaults(run=_local)
    for name in ("replica", "local"):
        role = cmds.choices[name]
        role.add_argument("--reload-interval", type=float, default=2.0,
                          help="seconds between reads of the index's CURRENT: a newly published version is "
                               "picked up without dropping requests (default: 2; 0: never)")
        role.add_argument("--max-batch", type=int, default=32,
                          help="concurrent queries decoded in one beam search (default: 32; 1: no batching)")
        role.add_argument("--shard-timeout", type=float, default=2.0,
                          help="seconds per shard call, within the request's deadline (default: 2)")
        role.add_argument("--shard-tls-ca", help="PEM CA file: reach the shard servers over TLS")
        role.add_argument("--shard-token-file", help="bearer token for the shard servers (first line of the file)")
        role.add_argument("--decode-precision", choices=DECODE_PRECISIONS, default="fp32", help=DECODE_PRECISION_HELP)
    for role in cmds.choices.values():
        role.add_argument("--metrics-port", type=int,
                          help="serve Prometheus metrics at http://0.0.0.0:PORT/metrics (default: off)")
        role.add_argument("--drain-seconds", type=float, default=2.0,
                          help="on SIGTERM, seconds health reports NOT_SERVING while requests are still "
                               "answered, so load balancers stop sending first (default: 2)")
        role.add_argument("--grace-seconds", type=float, default=10.0,
                          help="then, seconds requests in flight get to finish (default: 10)")
        role.add_argument("--tls-cert", help="PEM certificate (chain) file: serve TLS (with --tls-key)")
        role.add_argument("--tls-key", help="PEM private key file")
        role.add_argument("--token-file", help="accepted bearer tokens, one per line; requests without one get "
                                               "UNAUTHENTICATED (health and reflection stay open)")
        role.add_argument("--max-concurrent", type=int, default=64,
                          help="in-flight requests before RESOURCE_EXHAUSTED (default: 64)")

    q = sub.add_parser("query", help="send one query to a search replica and print the hits")
    q.add_argument("--address", default="127.0.0.1:50051", help="replica address (default: 127.0.0.1:50051)")
    q.add_argument("--text", help="query text")
    q.add_argument("--image", help="query image file (with --text: an image-text query)")
    q.add_argument("-k", "--k", type=int, default=10, help="results (default: 10)")
    q.add_argument("--beam", type=int, help="beam size (default: the index's)")
    q.add_argument("--modality", action="append", choices=["image", "text", "image_text"],
                   help="only items of this modality (repeatable)")
    q.add_argument("--no-rerank", action="store_true", help="rank by beam score only")
    q.add_argument("--timeout", type=float, default=30.0, help="deadline in seconds (default: 30)")
    q.add_argument("--tls-ca", help="PEM file of the CA (or self-signed certificate) to trust: use TLS")
    q.add_argument("--token", help="bearer token")
    q.set_defaults(run=_query)
