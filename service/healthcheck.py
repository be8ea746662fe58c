"""`eagle-health`: exit 0 when a server reports SERVING (a container HEALTHCHECK, a script).

Checks `grpc.health.v1` at `--server` (default: this host's EAGLE_HEALTH_PORT when set,
else EAGLE_PORT) for `--service` (default `liveness`: the process is not wedged; use
`eagle.v1.ChatService` for "takes new calls"). Plaintext only, like Kubernetes' probes.
"""
from __future__ import annotations

import argparse
import os
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def main(argv: list[str] | None = None) -> int:
    port = os.environ.get("EAGLE_HEALTH_PORT") or os.environ.get("EAGLE_PORT") or "50051"
    p = argparse.ArgumentParser(prog="eagle-health", description=__doc__.splitlines()[0])
    p.add_argument("--server", default=f"127.0.0.1:{port}")
    p.add_argument("--service", default="liveness")
    p.add_argument("--timeout", type=float, default=4.0)
    args = p.parse_args(argv)
    try:
        with grpc.insecure_channel(args.server) as channel:
            status = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout).status
    except grpc.RpcError as err:
        print(f"eagle-health: {args.server}: {err.code().name}: {err.details()}", file=sys.stderr)
        return 1
    name = health_pb2.HealthCheckResponse.ServingStatus.Name(status)
    print(f"eagle-health: {args.server} {args.service or '(server)'}: {name}")
    return 0 if status == health_pb2.HealthCheckResponse.SERVING else 1


if __name__ == "__main__":
    sys.exit(main())
