"""Answer a prompt about one or more images and print the answer and its timings.

Examples:
  fastvlm generate --image examples/shapes.png --prompt "How many circles are there?"
  fastvlm generate --model apple-fastvlm-0.5b --image a.jpg --image b.jpg --prompt "Compare the two images." --stream
Each --image becomes one <image> placeholder before the prompt, in order (as the reference does).
"""

from __future__ import annotations

import json
import sys

from .common import add_model_args, add_sampling_args, load_model, sampling_kwargs

DEFAULT_PROMPT = "Describe the image."


def add_arguments(p):
    add_model_args(p)
    p.add_argument("--image", "-i", action="append", default=[], help="image file (repeat for several images)")
    p.add_argument("--prompt", "-p", default=None, metavar="TEXT",
                   help=f"the question or instruction (default: {DEFAULT_PROMPT!r})")
    p.add_argument("--system", default=None, help="system prompt (default: the reference's 'You are a helpful assistant.')")
    p.add_argument("--stream", action="store_true", help="print the answer as it is generated")
    p.add_argument("--json", action="store_true", help="print one JSON object with the answer and timings")
    p.add_argument("--no-timings", action="store_true", help="do not print timings")
    add_sampling_args(p)


def run(args) -> int:
    from ..errors import PromptError
    from ..processing import count_placeholders, load_image

    default_prompt = args.prompt is None
    if default_prompt:
        args.prompt = DEFAULT_PROMPT
    # fail on a bad image or a placeholder miscount before loading the model
    n_ph = count_placeholders([args.prompt])
    if n_ph and n_ph != len(args.image):
        raise PromptError(f"the prompt has {n_ph} <image> placeholder{'s' if n_ph != 1 else ''} but "
                          f"{len(args.image)} --image {'was' if len(args.image) == 1 else 'were'} given (without "
                          "placeholders, each --image goes before the prompt)")
    images = [load_image(path) for path in args.image]
    if default_prompt and not args.model:
        print("note: no --prompt given, so the question is 'Describe the image.'; the bundled model answers only "
              "the short questions of its synthetic training scenes (like examples/), e.g. --prompt 'How many "
              "shapes are there?'", file=sys.stderr)
    model = load_model(args)
    kwargs = sampling_kwargs(args)
    if args.stream and not args.json:
        for piece in model.chat(images, args.prompt, stream=True, system_prompt=args.system, **kwargs):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        answer = None
    else:
        answer = model.chat(images, args.prompt, system_prompt=args.system, **kwargs)
    timings = model.last_timings
    if args.json:
        print(json.dumps({"answer": answer, "timings": timings.to_dict() if timings else None}))
        return 0
    if answer is not None:
        print(answer)
    if timings is not None and not args.no_timings:
        print(f"[{timings.summary()}]", file=sys.stderr)
    return 0
