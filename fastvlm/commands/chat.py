"""Interactive multi-turn chat in the terminal.

Type a message and press Enter. Commands:
  /image PATH   attach an image to your next message (repeatable)
  /reset        forget the conversation
  /quit         leave (Ctrl-D works too; /exit also)
Any other line that starts with "/" and a letter is refused as an unknown command and not sent;
start a message with "//" to send it with one leading "/".
The answer streams as it is generated; timings follow each answer. Ctrl-C stops an answer (what came
is kept in the conversation) and returns to the prompt; at the prompt it clears the line. The text
"<image>" in a message is a placeholder for an attached image, as in the reference's prompts.
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
        except KeyboardInterrupt:
            print("\n(Ctrl-D or /quit leaves)", file=sys.stderr)
            continue
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
        answer, started, stopped = "", False, False
        stream = None
        try:
            stream = model.chat(turn_images, messages + [{"role": "user", "content": content}], stream=True, **kwargs)
            for piece in stream:
                if not started:  # the prefix only once there is an answer: a refused prompt prints no stray one
                    sys.stdout.write("fastvlm> ")
                    started = True
                answer += piece
                sys.stdout.write(piece)
                sys.stdout.flush()
            sys.stdout.write("\n" if started else "fastvlm> \n")
        except FastVLMError as e:
            print(("\n" if started else "") + f"error: {e}", file=sys.stderr)
            continue
        except KeyboardInterrupt:
            stopped = True
            sys.stdout.write("\n")
            if not answer.strip():
                print("(stopped; nothing was said, so this message is not kept)", file=sys.stderr)
                continue
            print("(stopped; the answer so far is kept)", file=sys.stderr)
        finally:
            if stream is not None and hasattr(stream, "close"):
                stream.close()  # ends the generation at once, also when Ctrl-C stopped it
        messages += [{"role": "user", "content": content}, {"role": "assistant", "content": answer.strip()}]
        images, pending = turn_images, []
        if model.last_timings is not None and not stopped:
            print(f"[{model.last_timings.summary()}]", file=sys.stderr)
