"""``xnatfs testserver``: run the XNAT-compatible server from the command line."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .knobs import Knobs




def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", type=Path, required=True,
                        help="directory holding the server's database and files")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--dataset", choices=("demo", "bench", "none"), default="demo",
                        help="data set to build when DIR is empty (default: demo)")
    parser.add_argument("--user", action="append", default=[], metavar="NAME:PASSWORD[:admin]",
                        help="add an account (repeatable); ':admin' makes it a site admin")
    parser.add_argument("--site-id", default="XNAT", help="prefix of accession IDs")
    parser.add_argument("--tls-cert", type=Path, metavar="PEM",
                        help="serve HTTPS with this certificate (chain) file")
    parser.add_argument("--tls-key", type=Path, metavar="PEM",
                        help="the certificate's private key (default: in --tls-cert)")
    shaping = parser.add_argument_group("shaping and faults (for tests and benchmarks)")
    shaping.add_argument("--latency-ms", type=float, default=0.0,
                         help="added to every request")
    shaping.add_argument("--bandwidth-mb-s", type=float, default=0.0,
                         help="cap per connection for large bodies, MB/s (0: none)")
    shaping.add_argument("--range", action="store_true",
                         help="honour HTTP Range requests (real XNAT 1.8 does not)")
    shaping.add_argument("--fail-rate", type=float, default=0.0,
                         help="fraction of requests answered with 503")
    shaping.add_argument("--drop-rate", type=float, default=0.0,
                         help="fraction of file downloads aborted halfway")
    shaping.add_argument("--truncate-rate", type=float, default=0.0,
                         help="fraction of file downloads closed cleanly halfway")
    shaping.add_argument("--hang", action="store_true",
                         help="accept requests but never answer them")
    shaping.add_argument("--fault-path", default="",
                         help="regex: faults apply only to matching paths")
    shaping.add_argument("--session-timeout", type=float, default=900.0,
                         help="JSESSION inactivity timeout in seconds (default 900)")
    shaping.add_argument("--prearchive-settle", type=float, default=5.0,
                         help="seconds without new gradual-DICOM files before a session is READY")
    parser.add_argument("--request-log", type=Path, default=None,
                        help="JSON-lines request log (default: DIR/requests.log)")
    parser.add_argument("--log-level", default="INFO")


def knobs_from_args(args: argparse.Namespace) -> "Knobs":
    from .knobs import Knobs

    return Knobs(latency_ms=args.latency_ms, bandwidth_mb_s=args.bandwidth_mb_s,
                 range=args.range, fail_rate=args.fail_rate, drop_rate=args.drop_rate,
                 truncate_rate=args.truncate_rate, hang=args.hang, fault_path=args.fault_path,
                 session_timeout_s=args.session_timeout,
                 prearchive_settle_s=args.prearchive_settle)


def run(args: argparse.Namespace) -> int:
    from .server import make_context, serve

    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    args.data.mkdir(parents=True, exist_ok=True)
    ctx = make_context(args.data, knobs_from_args(args), request_log=args.request_log)
    store = ctx.store
    if store.get_setting("dataset") is None:
        from .datasets import build_dataset

        logging.getLogger("xnatfs.testserver").info("building the %r data set in %s",
                                                     args.dataset, args.data)
        build_dataset(store, args.dataset)
        store.set_setting("dataset", args.dataset)
    for spec in args.user:
        name, sep, rest = spec.partition(":")
        if not sep or not name:
            print(f"--user wants NAME:PASSWORD, got {spec!r}", file=sys.stderr)
            return 2
        password, _, flag = rest.partition(":")
        store.add_user(name, password, admin=(flag == "admin"))
    tls = None
    if args.tls_cert is not None:
        import ssl

        tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        tls.load_cert_chain(args.tls_cert, args.tls_key)
    try:
        asyncio.run(serve(ctx, args.host, args.port, tls=tls))
    except KeyboardInterrupt:
        pass
    return 0
