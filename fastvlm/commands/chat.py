"""Interactive multi-turn chat in the terminal.

Type a message and press Enter. Commands:
  /image PATH   attach an image to your next message (repeatable)
  /reset        forget the conversation
  /quit         leave (Ctrl-D works too; /exit also)
Any other line that starts with "/" and a letter is refused as an unknown command and not sent;
start a message with "//" to send it with one leading "/".
The answer streams as it is generated; timings follow each answer.
"""

from __future__ import annotations

import re
import sys

from .common import add_model_args, add_sampling_args, load_model, sampling_kwargs


COMMANDS_HELP = "/image PATH, /reset, /quit"
_COMMAND = re.compile(r"/[A-Za-z]")


def add_arguments(p):
    add_model_args(p)
    p.add_argument("--image", "-i", action="append", default=[], help="image(s) for the first message")
    p.add_argument("--system", default=None, help="system prompt")
    add_sampling_args(p)


def run(args) -> int:
    from ..errors import FastVLMError
    from ..processing import load_image

    pending = [load_image(p) for p in args.image]
    model = load_model(args)
    kwargs = sampling_kwargs(args)
    messages: list[dict] = []
    images: list = []
    if args.system:
        messages.append({"role": "system", "content": args.system})
    print(f"fastvlm chat: commands {COMMANDS_HELP}", file=sys.stderr)
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            print()
            return 0
        if not line:
            continue
        if line.startswith("//"):
            line = line[1:]  # an escaped message, sent with one leading "/"
        elif _COMMAND.match(line):
            command, rest = (line.split(None, 1) + [""])[:2]
            if command in ("/quit", "/exit"):
                return 0
            if command == "/reset":
                messages = messages[:1] if args.system else []
                images, pending = [], []
                print("(conversation cleared)", file=sys.stderr)
            elif command == "/image":
                if not rest:
                    print("usage: /image PATH", file=sys.stderr)
                    continue
                try:
                    pending.append(load_image(rest))
                    print(f"(attached {rest})", file=sys.stderr)
                except FastVLMError as e:
                    print(f"error: {e}", file=sys.stderr)
            else:
                print(f"unknown command {command}; commands: {COMMANDS_HELP} "
                      "(start a message with // to send a leading /)", file=sys.stderr)
            continue
        content = [{"type": "image"} for _ in pending] + [{"type": "text", "text": line}]
        turn_images = images + pending
        try:
            sys.stdout.write("fastvlm> ")
            answer = ""
            for piece in model.chat(turn_images, messages + [{"role": "user", "content": content}],
                                    stream=True, **kwargs):
                answer += piece
                sys.stdout.write(piece)
                sys.stdout.flush()
            sys.stdout.write("\n")
        except FastVLMError as e:
            print(f"\nerror: {e}", file=sys.stderr)
            continue
        messages += [{"role": "user", "content": content}, {"role": "assistant", "content": answer.strip()}]
        images, pending = turn_images, []
        if model.last_timings is not None:
            print(f"[{model.last_timings.summary()}]", file=sys.stderr)
