"""`noisy-student serve-model`: a registered model over REST that follows its alias."""

from __future__ import annotations

import argparse
from typing import Any


def add_parser(sub: Any) -> None:
    srv = sub.add_parser(
        "serve-model",
        help="serve models:/NAME@ALIAS over REST (the API of `mlflow models serve`) and "
        "switch to the alias's new version when it moves, without a restart",
    )
    srv.add_argument("name", help="the registered model, e.g. noisy-student-fashion-mnist")
    srv.add_argument("--alias", default="champion", help="the alias to follow (default champion)")
    srv.add_argument(
        "--host", default="127.0.0.1", help="listen on this address (default 127.0.0.1)"
    )
    srv.add_argument("--port", type=int, default=5001, help="and this port (default 5001)")
    srv.add_argument(
        "--poll",
        type=float,
        default=30,
        metavar="SECONDS",
        help="ask the registry where the alias points this often (default 30)",
    )
    srv.set_defaults(func=_serve_model)


def _serve_model(args: argparse.Namespace) -> None:
    import logging

    from noisy_student.errors import UserError
    from noisy_student.registry import model_server

    if args.poll <= 0:
        raise UserError(f"--poll {args.poll}: must be more than 0 seconds")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    model_server.serve(args.name, args.alias, args.host, args.port, args.poll)
