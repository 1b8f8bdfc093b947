"""The [tls] flags, shared by `joulegate serve` and `joulegate meter` (README: TLS)."""

from __future__ import annotations

import argparse
from typing import Any


def add_tls_arguments(parser: argparse.ArgumentParser) -> None:
    """The [tls] flags, shared by `serve` and `meter` (README: TLS)."""
    parser.add_argument(
        "--tls-cert-path", metavar="PEM", help="certificate chain: serve over TLS (with --tls-key-path)"
    )
    parser.add_argument("--tls-key-path", metavar="PEM", help="the certificate's private key")
    parser.add_argument(
        "--tls-client-ca-cert-path",
        metavar="PEM",
        help="mutual TLS: refuse clients without a certificate this CA signed",
    )


def tls_overrides(args: argparse.Namespace) -> dict[str, Any]:
    tls = {
        key: value
        for key, value in (
            ("cert_path", args.tls_cert_path),
            ("key_path", args.tls_key_path),
            ("client_ca_cert_path", args.tls_client_ca_cert_path),
        )
        if value
    }
    return {"tls": tls} if tls else {}
