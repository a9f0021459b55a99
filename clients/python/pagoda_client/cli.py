"""``pagoda``: talk to a Pagoda tokenizer service from the terminal or a script.

    pagoda generate "Once upon a time" --max-tokens 50     # streams the completion
    pagoda chat                                            # interactive; one user message per line
    pagoda chat --once "What is the capital of France?" --json
    pagoda generate "The sky is" --max-tokens 5 --logprobs 3 --prompt-logprobs 0   # logprobs table on stderr
    pagoda tokenize "Hello world" --json
    pagoda health --wait 60                                # exit 0 once serving
    pagoda info

Exit status: 0 on success, 1 when the service answered with an error (printed as
``pagoda: error: CODE: details``) or is not serving, 130 when interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import json_format

from pagoda_client.client import DEFAULT_TARGET, Client, GenerateOptions, TextStream, logprob_dicts
from pagoda_client.errors import PagodaError


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if (args.client_cert is None) != (args.client_key is None):
        parser.error("--client-cert and --client-key go together")
    try:
        with _client(args) as client:
            return args.run(client, args)
    except (PagodaError, OSError) as error:  # OSError: a certificate file that cannot be read
        print(f"pagoda: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pagoda", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default=os.environ.get("PAGODA_TARGET", DEFAULT_TARGET),
                        help="the tokenizer service, host:port (env PAGODA_TARGET; default %(default)s)")
    parser.add_argument("--token", default=os.environ.get("PAGODA_TOKEN"),
                        help="sent as 'authorization: Bearer TOKEN' (env PAGODA_TOKEN)")
    parser.add_argument("--tls", action="store_true", help="connect with TLS (system root certificates)")
    parser.add_argument("--ca-cert", type=Path, help="connect with TLS, trusting this PEM file")
    parser.add_argument("--client-cert", type=Path,
                        help="connect with TLS, presenting this PEM certificate (mutual TLS; with --client-key)")
    parser.add_argument("--client-key", type=Path, help="the private key of --client-cert (PEM)")
    parser.add_argument("--timeout", type=float, default=30.0, help="deadline of non-streaming calls, seconds")
    commands = parser.add_subparsers(title="commands", required=True, metavar="COMMAND")

    generate = _command(commands, "generate", _generate, "complete a prompt, streaming the text")
    generate.add_argument("prompt", nargs="?", help="the prompt (default: read stdin)")
    _add_sampling_flags(generate)

    chat = _command(commands, "chat", _chat, "chat; each stdin line is a user message, the conversation is kept")
    chat.add_argument("--system", help="a system message to start the conversation with")
    chat.add_argument("--once", metavar="QUESTION", help="ask one question, print the answer and exit")
    _add_sampling_flags(chat)

    tokenize = _command(commands, "tokenize", _tokenize, "show a text's token ids")
    tokenize.add_argument("text")
    tokenize.add_argument("--chat", action="store_true", help="as one user message rendered with the chat template")
    tokenize.add_argument("--json", action="store_true", help="print the response as JSON")

    detokenize = _command(commands, "detokenize", _detokenize, "turn token ids into text")
    detokenize.add_argument("token_ids", nargs="+", type=_ranged(0, 2**32 - 1), metavar="ID")

    health = _command(commands, "health", _health, "print the service's health; exit 0 when SERVING")
    health.add_argument("--wait", type=float, default=0.0, metavar="SECONDS", help="wait up to this long for SERVING")

    info = _command(commands, "info", _info, "show the served model and the engines behind the service")
    info.add_argument("--json", action="store_true", help="print the response as JSON")
    return parser


def _command(commands: Any, name: str, run: Callable[[Client, argparse.Namespace], int],
             help: str) -> argparse.ArgumentParser:
    parser = commands.add_parser(name, help=help, description=help)
    parser.set_defaults(run=run)
    return parser


def _add_sampling_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-tokens", type=_ranged(1, 2**32 - 1),
                        help="most tokens to generate (default: up to the max model length)")
    parser.add_argument("--temperature", type=float, help="0 is greedy (default: 1)")
    parser.add_argument("--top-p", type=float)
    parser.add_argument("--top-k", type=_ranged(-1, 2**31 - 1), help="-1 or 0: no top-k")
    parser.add_argument("--seed", type=_ranged(0, 2**63 - 1), help="same seed, same answer")
    parser.add_argument("--logit-bias", action="append", type=_bias_entry, metavar="ID=BIAS",
                        help="add BIAS (-100 to 100) to token ID's logit (repeatable)")
    parser.add_argument("--allowed-token-id", action="append", dest="allowed_token_ids",
                        type=_ranged(0, 2**32 - 1), metavar="ID",
                        help="draw only from these tokens (repeatable; EOS is not implied)")
    # As the engine checks them: K >= 0 here, and at most its --max-logprobs (20 by default; `pagoda info`
    # shows it) there, which answers INVALID_ARGUMENT past it.
    parser.add_argument("--logprobs", type=_ranged(0, 2**32 - 1), metavar="K",
                        help="each generated token's logprob and its K most likely alternatives (0: the token's "
                             "only; at most the engine's --max-logprobs, 20 by default, which `pagoda info` "
                             "shows): a table on stderr after the answer, or a \"logprobs\" list with --json")
    parser.add_argument("--prompt-logprobs", type=_ranged(0, 2**32 - 1), metavar="K",
                        help="the same for every prompt token from the second on (for chat, of the rendered "
                             "conversation; the prompt then skips the prefix cache): a table on stderr, or a "
                             "\"prompt_logprobs\" list with --json")
    structured = parser.add_mutually_exclusive_group()
    structured.add_argument("--regex", help="the answer fully matches this regular expression (structured output)")
    structured.add_argument("--json-schema", metavar="SCHEMA", type=_schema_text,
                            help="the answer is a JSON instance of this JSON Schema: its JSON text, or @FILE")
    structured.add_argument("--choice", action="append", metavar="TEXT",
                            help="the answer is exactly one of these strings (repeatable)")
    structured.add_argument("--json-object", action="store_true", help="the answer is a JSON object")
    parser.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop string (repeatable)")
    parser.add_argument("--json", action="store_true",
                        help="no streaming: print each answer as one JSON line (text, finish_reason, usage; "
                             "logprobs and prompt_logprobs when asked for: per position token_id, token, "
                             "logprob, rank (1: most likely; null: not among the top K), top)")


def _ranged(low: int, high: int) -> Callable[[str], int]:
    """An int flag's type, refused by argparse outside [low, high] (the proto field's range)."""
    def parse(text: str) -> int:
        value = int(text)
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{value} is not in [{low}, {high}]")
        return value

    parse.__name__ = "integer"  # how argparse names the type in its errors
    return parse


def _bias_entry(text: str) -> tuple[int, float]:
    """A --logit-bias value, ID=BIAS."""
    token, sep, bias = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"{text!r} is not ID=BIAS")
    return _ranged(0, 2**32 - 1)(token), float(bias)


_bias_entry.__name__ = "ID=BIAS"  # how argparse names the type in its errors


def _schema_text(text: str) -> str:
    """A --json-schema value: the schema's JSON text, or @FILE for a file holding it."""
    if not text.startswith("@"):
        return text
    try:
        return Path(text[1:]).read_text(encoding="utf-8")
    except OSError as error:
        raise argparse.ArgumentTypeError(f"cannot read {text[1:]}: {error.strerror}") from None


_schema_text.__name__ = "JSON schema"


def _client(args: argparse.Namespace) -> Client:
    return Client(args.target, token=args.token, credentials=_credentials(args), timeout=args.timeout)


def _credentials(args: argparse.Namespace) -> grpc.ChannelCredentials | None:
    """TLS when any TLS flag is given (system roots unless --ca-cert), else None: plaintext."""
    if not (args.tls or args.ca_cert or args.client_cert):
        return None
    return grpc.ssl_channel_credentials(root_certificates=_read(args.ca_cert), private_key=_read(args.client_key),
                                        certificate_chain=_read(args.client_cert))


def _read(path: Path | None) -> bytes | None:
    return path.read_bytes() if path is not None else None


def _options(args: argparse.Namespace) -> GenerateOptions:
    options = GenerateOptions(stop=args.stop)
    for name in ("max_tokens", "temperature", "top_p", "top_k", "seed", "allowed_token_ids", "logprobs",
                 "prompt_logprobs"):
        if getattr(args, name) is not None:
            options[name] = getattr(args, name)  # type: ignore[literal-required]
    if args.logit_bias is not None:
        options["logit_bias"] = dict(args.logit_bias)
    for name in ("regex", "choice", "json_object"):
        if getattr(args, name):
            options[name] = getattr(args, name)  # type: ignore[literal-required]
    if args.json_schema is not None:
        options["json_schema"] = args.json_schema
    return options


def _generate(client: Client, args: argparse.Namespace) -> int:
    prompt = args.prompt if args.prompt is not None else sys.stdin.read()
    _show(client.generate(prompt, **_options(args)), args)
    return 0


def _chat(client: Client, args: argparse.Namespace) -> int:
    messages = [{"role": "system", "content": args.system}] if args.system else []
    questions = [args.once] if args.once is not None else _user_lines()
    for question in questions:
        messages.append({"role": "user", "content": question})
        answer = _show(client.chat(messages, **_options(args)), args)
        messages.append({"role": "assistant", "content": answer})
    return 0


def _user_lines() -> Iterator[str]:
    """Non-empty stdin lines, with a prompt when a person is typing."""
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            print("> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line:
            return
        if line.strip():
            yield line.rstrip("\n")


def _show(stream: TextStream, args: argparse.Namespace) -> str:
    """Stream an answer to stdout (or print it as one JSON line); returns its text. Asked-for logprobs go
    in the JSON line, or as tables on stderr after the streamed text (stdout keeps the text alone)."""
    with stream:
        if args.json:
            stream.read()
            print(json.dumps(stream.summary(), ensure_ascii=False), flush=True)
        else:
            for delta in stream:
                print(delta, end="", flush=True)
            print(flush=True)
            if args.prompt_logprobs is not None:
                _print_logprobs("prompt logprobs (position in the prompt)", stream.prompt_logprobs, first=1)
            if args.logprobs is not None:
                _print_logprobs("logprobs (position in the answer)", stream.logprobs, first=0)
    return stream.text


def _print_logprobs(title: str, entries: Sequence[Any], first: int) -> None:
    """One row per position to stderr: position, token id, token text (as a JSON string), logprob, rank
    ("-": not among the top alternatives) and the top alternatives."""
    print(f"{title}: {len(entries)} tokens", file=sys.stderr)
    rows = logprob_dicts(entries)
    width = max((len(_quoted(row["token"])) for row in rows), default=5)
    width = min(max(width, 5), 24)
    print(f"{'pos':>5} {'id':>7}  {'token':<{width}} {'logprob':>9} {'rank':>4}  top", file=sys.stderr)
    for position, row in enumerate(rows, start=first):
        top = ", ".join(f"{_quoted(alt['token'])} {alt['logprob']:.4f}" for alt in row["top"])
        rank = "-" if row["rank"] is None else row["rank"]
        print(f"{position:>5} {row['token_id']:>7}  {_quoted(row['token']):<{width}} {row['logprob']:>9.4f} "
              f"{rank:>4}  {top}".rstrip(), file=sys.stderr)
    sys.stderr.flush()


def _quoted(token: str) -> str:
    """A token's text with its spaces and newlines visible."""
    return json.dumps(token, ensure_ascii=False)


def _tokenize(client: Client, args: argparse.Namespace) -> int:
    response = client.tokenize([{"role": "user", "content": args.text}] if args.chat else args.text)
    if args.json:
        _print_json(response)
    else:
        print(" ".join(map(str, response.token_ids)))
    return 0


def _detokenize(client: Client, args: argparse.Namespace) -> int:
    print(client.detokenize(args.token_ids))
    return 0


def _health(client: Client, args: argparse.Namespace) -> int:
    if args.wait > 0:
        # Not serving in time is reported below, as the status found last.
        with contextlib.suppress(PagodaError):
            client.wait_until_serving(timeout=args.wait)
    status = client.health()
    print(status)
    return 0 if status == "SERVING" else 1


def _info(client: Client, args: argparse.Namespace) -> int:
    info = client.model_info()
    if args.json:
        _print_json(info)
        return 0
    model = info.model
    print(f"model:        {model.model_name or '(no engine has answered yet)'} ({model.architecture})")
    print(f"engines:      {info.num_healthy_engines} of {info.num_engines} healthy")
    print(f"device:       {model.device}, {model.dtype}, tensor parallel {model.tensor_parallel_size}")
    print(f"max length:   {model.max_model_len} tokens; KV cache {model.kv_capacity_tokens} tokens")
    print(f"logprobs:     at most {model.max_logprobs} alternatives per token")
    print(f"chat:         {'yes' if info.has_chat_template else 'no template'}")
    print(f"version:      {model.version}")
    return 0


def _print_json(message: Any) -> None:
    print(json.dumps(json_format.MessageToDict(message, preserving_proto_field_name=True), ensure_ascii=False))


if __name__ == "__main__":
    sys.exit(main())
