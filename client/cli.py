"""eagle-chat: ask an eagle-grpc server from the terminal; the answer streams as it arrives."""
from __future__ import annotations

import argparse
import json
import os
import sys

from client import EagleClient, EagleError, Video


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="eagle-chat", description=__doc__)
    p.add_argument("prompt", nargs="*", help="the question (words are joined with spaces)")
    p.add_argument("--image", action="append", default=[], help="image file to send (repeatable)")
    p.add_argument("--video", action="append", default=[],
                   help="video reference: a path under the server's media roots, or a URL")
    p.add_argument("--video-file", action="append", default=[],
                   help="local video file to upload as bytes (repeatable)")
    p.add_argument("--frames", type=int, default=None, help="frames to sample per video")
    p.add_argument("--system", default=None, help="system message")
    p.add_argument("--max-tokens", type=int, default=None, help="most tokens to generate")
    p.add_argument("--temperature", type=float, default=None, help="0 for greedy decoding")
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--json-schema", metavar="FILE",
                     help="constrain the reply to this JSON Schema (a .json file)")
    fmt.add_argument("--json-object", action="store_true", help="constrain the reply to a JSON "
                                                               "object")
    fmt.add_argument("--choice", metavar="A,B,...", help="the reply is exactly one of these")
    fmt.add_argument("--regex", help="the reply matches this regular expression in full")
    fmt.add_argument("--lark", metavar="FILE", help="constrain the reply to a Lark grammar")
    fmt.add_argument("--gbnf", metavar="FILE", help="constrain the reply to a GBNF grammar")
    p.add_argument("--logprobs", type=int, default=None, metavar="N",
                   help="return each token's log probability and the N most likely "
                        "alternatives (0-20); shown with --json")
    p.add_argument("--server", default=os.environ.get("EAGLE_SERVER", "127.0.0.1:50051"),
                   help="any gRPC target: host:port, dns:///name:port, ipv4:a:p,b:p (or "
                        "EAGLE_SERVER)")
    p.add_argument("--load-balancing", choices=["round_robin", "pick_first", "ring_hash"],
                   default="round_robin", help="spread calls over the target's replicas "
                                               "(health-checked), keep one connection, or "
                                               "hash every call's affinity key")
    p.add_argument("--affinity-key", default=None,
                   help="e.g. a conversation id: calls with the same key go to the same "
                        "healthy replica, where their images' features are cached")
    p.add_argument("--priority", choices=["interactive", "batch"], default=None,
                   help="within your tenant, batch requests are admitted after interactive "
                        "ones (the server's default: interactive)")
    p.add_argument("--cache-salt", default="", help="keep this request's cached prompt and "
                                                   "media apart from other salts'")
    p.add_argument("--token", default=os.environ.get("EAGLE_TOKEN"),
                   help="bearer token (or EAGLE_TOKEN)")
    p.add_argument("--tls", action="store_true", help="use TLS (system roots unless --ca)")
    p.add_argument("--ca", default=None, help="CA certificate file for TLS")
    p.add_argument("--cert", default=None, help="client certificate for mutual TLS")
    p.add_argument("--key", default=None, help="client key for mutual TLS")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds for the whole call")
    p.add_argument("--json", action="store_true", help="print the final response as JSON")
    p.add_argument("--usage", action="store_true", help="print tokens and timings afterwards")
    p.add_argument("--no-stream", action="store_true", help="use the unary Chat call")
    p.add_argument("--info", action="store_true", help="print the server's model info and exit")
    return p


def _format(args: argparse.Namespace) -> dict[str, object]:
    """The response format and logprobs arguments of the request."""
    out: dict[str, object] = {}
    for kind in ("json_schema", "lark", "gbnf"):  # given as files (the group allows one)
        if getattr(args, kind):
            with open(getattr(args, kind), encoding="utf-8") as f:
                out[kind] = f.read()
    if args.json_object:
        out["json_object"] = True
    elif args.choice:
        out["choice"] = [c for c in args.choice.split(",") if c]
    elif args.regex:
        out["regex"] = args.regex
    if args.logprobs is not None:
        out.update(logprobs=True, top_logprobs=args.logprobs)
    return out


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    videos = [Video(uri=v, num_frames=args.frames or 0) for v in args.video]
    for path in args.video_file:
        with open(path, "rb") as f:
            videos.append(Video(data=f.read(), num_frames=args.frames or 0))
    request = dict(images=args.image, videos=videos, system=args.system,
                   max_new_tokens=args.max_tokens, temperature=args.temperature,
                   top_p=args.top_p, seed=args.seed, stop=args.stop,
                   affinity_key=args.affinity_key, priority=args.priority,
                   cache_salt=args.cache_salt)
    try:
        request.update(_format(args))
        with EagleClient(args.server, token=args.token, tls=args.tls, root_certificates=args.ca,
                         client_cert=args.cert, client_key=args.key, timeout=args.timeout,
                         load_balancing=args.load_balancing) as client:
            if args.info:
                from google.protobuf.json_format import MessageToJson

                print(MessageToJson(client.model_info(), preserving_proto_field_name=True))
                return 0
            text = " ".join(args.prompt)
            if args.no_stream or args.json:
                result = client.chat(text, **request)
                if not args.json:
                    print(result.text)
            else:
                stream = client.stream_chat(text, **request)
                for delta in stream:
                    sys.stdout.write(delta)
                    sys.stdout.flush()
                sys.stdout.write("\n")
                result = stream.result
    except EagleError as err:
        where = f" (field {err.field})" if err.field else ""
        print(f"eagle-chat: {err.code.name}: {err.details}{where}", file=sys.stderr)
        return 1
    except OSError as err:
        print(f"eagle-chat: {err}", file=sys.stderr)
        return 2
    if args.json and result is not None:
        print(json.dumps(result.to_dict(), ensure_ascii=False, indent=2))
    elif args.usage and result is not None:
        u, t = result.usage, result.timing
        print(f"[{result.finish_reason}] prompt {u.prompt_tokens} tokens ({u.vision_tokens} "
              f"vision: {u.image_tiles} tiles, {u.video_frames} frames), completion "
              f"{u.completion_tokens}; queue {t.queue_ms:.0f} ms, preprocess "
              f"{t.preprocess_ms:.0f} ms, prefill {t.prefill_ms:.0f} ms, decode "
              f"{t.decode_ms:.0f} ms", file=sys.stderr)
        for note in result.adjustments:
            print(f"adjusted: {note}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
