"""Command line for the search client: rank, embed, health."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from search_rank_client import DEFAULT_URL, SearchClient, SearchError
from search_rank_client.channel import ClientTls


def _ids(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m search_rank_client", description="Call the search_rank / text_embed ensembles.")
    p.add_argument("--url", default=DEFAULT_URL, help=f"Triton gRPC address (default {DEFAULT_URL})")
    p.add_argument("--timeout", type=float, default=2.0, help="deadline per call in seconds")
    p.add_argument("--tls-ca", type=Path, help="TLS: PEM CA the server's certificate must chain to")
    p.add_argument("--tls-cert", type=Path, help="mutual TLS: this client's PEM certificate chain")
    p.add_argument("--tls-key", type=Path, help="mutual TLS: this client's PEM private key")
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("rank", help="rank candidates for a query")
    r.add_argument("query")
    r.add_argument("--user", type=int, required=True, help="user id (unknown ids use the default user)")
    r.add_argument("--candidates", type=_ids, required=True, help="comma-separated item ids")
    r.add_argument("--top-k", type=int)
    e = sub.add_parser("embed", help="embed a text")
    e.add_argument("text")
    sub.add_parser("health", help="exit 0 if the server and both ensembles are ready")
    args = p.parse_args(argv)
    tls = None
    if args.tls_ca or args.tls_cert or args.tls_key:
        if args.tls_ca is None:
            p.error("--tls-cert/--tls-key need --tls-ca")
        try:
            tls = ClientTls(args.tls_ca, args.tls_cert, args.tls_key)
        except ValueError as err:
            p.error(str(err))
    try:
        with SearchClient(args.url, timeout_s=args.timeout, tls=tls) as client:
            if args.command == "rank":
                for item in client.rank(args.query, args.user, args.candidates, top_k=args.top_k):
                    print(f"{item.item_id}\t{item.score:.6f}")
            elif args.command == "embed":
                print(json.dumps([round(float(x), 6) for x in client.embed(args.text)]))
            else:
                ready = client.is_ready()
                print("ready" if ready else "not ready")
                return 0 if ready else 1
    except SearchError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
