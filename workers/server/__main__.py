"""`python -m workers.server` / `ckpt-engine-server`: start the rank processes, then serve HTTP.

The launcher is the front process: it parses `ServerArgs`, checks the model's config.json,
starts one process per tensor-parallel rank and waits until every rank has loaded its weights
(a rank that fails makes the server exit 1 with the cause), then runs uvicorn on --host/--port.
On exit, SIGTERM or SIGINT it stops every rank process (ranks also die with it by themselves).
"""

from __future__ import annotations

import dataclasses
import logging
import signal
import sys

from workers.config import ServerArgs
from workers.errors import ConfigError, StartupError

logger = logging.getLogger("workers.server")


def main(argv: list[str] | None = None) -> int:
    args = ServerArgs.from_cli(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s [front] %(levelname)s %(name)s: %(message)s",
    )
    # SIGTERM becomes SystemExit, so the `finally` below runs and stops the ranks.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))

    import uvicorn

    from workers.models import ModelConfig
    from workers.remote_instance.coordination import start_publisher
    from workers.server.frontend import Frontend
    from workers.server.http import create_app
    from workers.server.ranks import RankGroup
    from workers.server.tokenizer import TextCodec

    try:
        model = ModelConfig.from_pretrained(args.model_path)
        codec = TextCodec.load(args.model_path)
    except ConfigError as e:
        print(f"ckpt-engine-server: {e}", file=sys.stderr)
        return 1
    logger.info("starting %d rank process(es) for %s", args.tp, args.model_path)
    try:
        ranks = RankGroup.launch(args)
    except StartupError as e:
        print(f"ckpt-engine-server: {e}", file=sys.stderr)
        return 1
    try:
        if args.load_format == "remote_instance":  # a fork serves the seed's weight version
            (version, *_) = ranks.call(
                "remote_instance_weight_version", [], {}, timeout=args.rank_timeout
            )
            if version is not None:
                args = dataclasses.replace(args, weight_version=version)
        front = Frontend(ranks=ranks, args=args, model=model, codec=codec)
        app = create_app(front, api_key=args.api_key, max_request_bytes=args.max_request_bytes)
        config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level)
        server = uvicorn.Server(config)
        publisher = start_publisher(args, front, ranks, started=lambda: server.started)
        try:
            server.run()
        finally:
            if publisher is not None:  # withdraw this seed from the registry
                publisher.stop()
    finally:
        ranks.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
