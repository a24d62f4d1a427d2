"""``kemari pki create DIR --name VM``: a CA and one VM pair's TLS credentials.

The files and their roles: kemari/transaction/pki.py.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from kemari.config import TLS_FILES, tls_name_for
from kemari.transaction.pki import DEFAULT_DAYS, make_credentials


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``kemari pki``."""
    parser = subparsers.add_parser(
        "pki",
        help="make TLS credentials for the replication channel",
        description="Make a CA and a VM pair's certificates in QEMU's x509 directory layout.",
    )
    commands = parser.add_subparsers(dest="pki_command", required=True, metavar="SUBCOMMAND")
    create = commands.add_parser("create", help="make a credentials directory for one VM pair")
    create.add_argument("directory", type=Path, help="directory to write (tls_creds)")
    create.add_argument("--name", required=True, help="the VM name")
    create.add_argument("--tls-name", help="name in both certificates (default kemari-<vm>)")
    create.add_argument("--ca", type=Path, help="sign with the CA in this directory")
    create.add_argument("--days", type=int, default=DEFAULT_DAYS, help="validity in days")
    create.add_argument("--force", action="store_true", help="overwrite existing files")
    create.set_defaults(func=_create)


def _create(args: argparse.Namespace) -> int:
    name = args.tls_name or tls_name_for(args.name)
    make_credentials(args.directory, name, ca=args.ca, days=args.days, force=args.force)
    print(f"TLS credentials for {name} in {args.directory}: {', '.join(TLS_FILES)}")
    return 0
