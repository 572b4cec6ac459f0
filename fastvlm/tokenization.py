"""Training small byte-level BPE tokenizers shaped like Qwen2's.

The released FastVLM models use the Qwen2 tokenizer (151,643 BPE tokens followed by
the specials ``<|endoftext|>``=151643, ``<|im_start|>``=151644, ``<|im_end|>``=151645).
It cannot be downloaded in every environment this package is tested in, so this module
trains stand-ins: the same pipeline (NFC, Qwen2's split regex, byte-level BPE, byte-level
decoder), a much smaller learnt vocabulary, and optionally unreachable filler entries so
that the special tokens land on Qwen2's ids. A random-weight model of a released size can
then be driven end to end with ids that mean the same thing as in the real checkpoints.
"""

from __future__ import annotations

from typing import Iterable, Optional, Sequence

from tokenizers import (
    AddedToken,
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)
from transformers import PreTrainedTokenizerFast

from .errors import ConfigError

# Qwen2's pre-tokenisation regex: contractions, letter runs with one optional leading
# non-letter, single digits (so numbers are spelt digit by digit), punctuation runs,
# newlines, and whitespace that is not followed by a word.
QWEN2_SPLIT_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

QWEN2_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
# Size of Qwen2's learnt BPE vocabulary: the first special token's id.
QWEN2_BPE_VOCAB_SIZE = 151643


def _new_tokenizer(model: models.Model) -> Tokenizer:
    tok = Tokenizer(model)
    # NFC as in Qwen2; text that is already NFC (nearly all real text, emoji included)
    # round-trips exactly through encode/decode.
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT_REGEX), behavior="isolated", invert=False),
            # use_regex=False: the split above already did GPT-2-style word splitting.
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    # As in Qwen2's tokenizer.json: adds no BOS/EOS; trim_offsets=False keeps offsets over the raw text.
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    return tok


def train_bpe_tokenizer(
    texts: Iterable[str],
    vocab_size: int,
    *,
    special_tokens: Sequence[str] = QWEN2_SPECIAL_TOKENS,
    pad_vocab_to: Optional[int] = None,
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer with Qwen2's pre-tokenizer on ``texts``.

    ``vocab_size`` bounds the learnt vocabulary (the 256 byte symbols plus merges; a small
    corpus may run out of pairs first). The special tokens are registered as special added
    tokens, so they are never split and are dropped by ``skip_special_tokens``; the pad
    token is ``special_tokens[0]`` (``<|endoftext|>``) and the eos token is ``<|im_end|>``
    when present (else the last special token).

    With ``pad_vocab_to=N`` the learnt vocabulary is topped up with filler entries
    ``<|reserved_k|>`` up to size N, so the special tokens get ids N, N+1, ... . The fillers
    are plain vocabulary entries with no merge that builds them, so BPE never produces them.
    ``pad_vocab_to=151643`` reproduces Qwen2's special-token ids.
    """
    if vocab_size < 257:
        raise ConfigError(f"vocab_size={vocab_size} is too small: byte-level BPE needs the 256 byte symbols first")
    special_tokens = list(special_tokens)
    if not special_tokens:
        raise ConfigError("train_bpe_tokenizer needs at least one special token (it is also the pad token)")

    tok = _new_tokenizer(models.BPE())
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=0,
        show_progress=False,
        # Every byte is in the base vocabulary, so any text can be encoded (no unk).
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        # Specials are added afterwards (as added tokens) so they can be placed after the fillers.
        special_tokens=[],
    )
    tok.train_from_iterator(texts, trainer=trainer)

    # Rebuild the model from its learnt vocab/merges so the vocabulary can be extended.
    vocab = dict(tok.get_vocab(with_added_tokens=False))
    merges = _model_merges(tok)
    if pad_vocab_to is not None:
        if pad_vocab_to < len(vocab):
            raise ConfigError(
                f"pad_vocab_to={pad_vocab_to} is smaller than the learnt vocabulary ({len(vocab)} tokens)"
            )
        k = 0
        while len(vocab) < pad_vocab_to:
            name = f"<|reserved_{k}|>"
            k += 1
            if name not in vocab:
                vocab[name] = len(vocab)
    tok = _new_tokenizer(models.BPE(vocab=vocab, merges=merges, dropout=None, fuse_unk=False, byte_fallback=False))
    # Special added tokens are matched in the raw text before BPE and get the next ids in order.
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special_tokens])

    eos = "<|im_end|>" if "<|im_end|>" in special_tokens else special_tokens[-1]
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=special_tokens[0],
        eos_token=eos,
        bos_token=None,
        unk_token=None,
        # Qwen2 adds no BOS/EOS and the default space clean-up would corrupt byte-level text
        # (" ." would decode as "."), so decode(encode(s)) == s only with it off.
        clean_up_tokenization_spaces=False,
        model_max_length=32768,
    )


def _model_merges(tok: Tokenizer) -> list[tuple[str, str]]:
    # The tokenizers Python API exposes merges only through the JSON serialisation;
    # they are either "a b" strings (older files) or [a, b] pairs.
    import json

    data = json.loads(tok.to_str())
    out = []
    for m in data["model"]["merges"]:
        if isinstance(m, str):
            a, b = m.split(" ", 1)
        else:
            a, b = m
        out.append((a, b))
    return out


# A small built-in English corpus for the stand-in tokenizer: ordinary prose about images,
# conversations and everyday things (the kind of text a VLM sees), plus the chat markup,
# digits and punctuation so those have sensible merges too.
_STANDIN_CORPUS = """\
The quick brown fox jumps over the lazy dog. A picture is worth a thousand words.
Describe the image in detail. What is shown in this photo? How many people are there?
The image shows a red bus parked on a city street next to a tall building with many windows.
A small white dog is sitting on a green lawn in front of a wooden house. The sky is blue and clear.
Two children are playing with a yellow ball on the beach while their parents watch from the shade.
There is a bowl of fresh fruit on the kitchen table: apples, oranges, bananas and a bunch of grapes.
The chart compares the sales of three products over the last twelve months; the blue line rises steadily.
A man wearing a black jacket is riding a bicycle across a bridge over a river at sunset.
The street sign reads "Main Street" and the shop window has a poster advertising a summer sale.
In the top left corner of the screenshot there is a menu with the options File, Edit, View and Help.
The document is a receipt from a coffee shop. It lists two lattes, one croissant and the total price.
A cat is sleeping on a soft blue blanket near the window, and sunlight falls across the floor.
The mountains in the background are covered with snow, and a lake reflects the trees along the shore.
You are a helpful assistant. Answer the question using a single word or phrase.
Please answer yes or no. Is there a person in the picture? Yes, there is one person standing near the door.
What color is the car? The car is red. What time does the clock show? The clock shows half past three.
Read the text in the image. The title says "Annual Report" and the subtitle says "Results and Outlook".
Count the objects: there are four chairs, one table, two lamps and a large painting on the wall.
The graph has an x-axis labelled "time (s)" and a y-axis labelled "speed (m/s)"; the curve peaks at 12.5.
She opened the door, looked outside, and said: "It's going to rain today, isn't it?" He didn't answer.
We'll need more data before we can draw any conclusion; they're still collecting measurements.
I'm not sure what the object on the left is, but it looks like a vase or perhaps a small lamp.
The train leaves the station at 08:45 and arrives in the city at 10:30, about an hour and forty-five minutes later.
Step 1: open the box. Step 2: remove the cover. Step 3: connect the cable to the port on the back.
The recipe needs 2 cups of flour, 3 eggs, 1/2 cup of sugar, 100 g of butter and a pinch of salt.
Temperatures today range from 15 to 23 degrees, with a 40% chance of showers in the afternoon.
Her phone number is 555-0137 and the meeting is in room 204 on the 2nd floor at 3:15 pm.
The model looks at the picture, finds the important regions, and writes a short answer in plain language.
Vision language models combine an image encoder with a language model so they can talk about pictures.
The encoder turns the image into a grid of features; a projector maps them into the word embedding space.
Large images take longer to encode, so a fast encoder makes the first token appear much sooner.
Questions about charts, tables, documents and diagrams need high resolution to read the small text.
The weather was warm and sunny, so we walked along the river, stopped for lunch and took many photos.
On the shelf there are several books, a green plant in a pot, a framed photograph and an old radio.
A group of people is standing at a bus stop; one of them holds an umbrella and another reads a newspaper.
The airplane is flying above the clouds. Through the window you can see the wing and the bright sun.
An orange cat and a brown dog are lying together on a sofa; the cat has its paw on the dog's head.
The football players wear white and blue shirts; the goalkeeper jumps to catch the ball.
The store opens at 9 am and closes at 8 pm from Monday to Friday, and at 6 pm on Saturday and Sunday.
The table lists the population of each country, its capital city, its area and its official language.
If you look closely, you can see a small bird sitting on the branch of the tree in the upper right.
This is a close-up photo of a flower with purple petals and a yellow centre, covered in drops of water.
The road curves to the left and disappears into a forest; a car with its lights on is coming towards us.
The museum displays ancient pottery, bronze tools, woven baskets and jewellery found near the old harbour.
Engineers measured the bridge's vibration with sensors; the results were published in a technical journal.
Scientists believe the comet will return in seventy-six years, when astronomers around the world will observe it.
The orchestra performed a symphony by a famous composer, and the audience applauded enthusiastically afterwards.
Farmers harvest wheat, barley, corn and potatoes in autumn, then prepare the fields for the following spring.
The laboratory microscope reveals tiny organisms swimming in a single drop of pond water under bright illumination.
Our neighbourhood library organises reading groups, language classes, chess tournaments and weekend workshops.
The hospital's emergency department treats patients quickly; nurses check temperature, pressure and breathing.
Students should submit their assignments electronically before midnight; late submissions receive reduced marks.
The hikers followed a narrow path through the valley, crossed a waterfall and camped beside a quiet lake.
Global temperatures have increased, glaciers are melting, and coastal communities face rising sea levels.
The company announced quarterly earnings, new products, international partnerships and an ambitious strategy.
Please summarise the following paragraph in one sentence, keeping the most important information only.
Translate the sentence into French, German, Spanish, Italian and Japanese, then compare the translations.
Programmers write functions, classes and modules; they test their software, fix bugs and review each other's code.
The keyboard, mouse, monitor and speakers are connected to the computer through cables or wireless adapters.
Birds migrate thousands of kilometres every year, navigating by the sun, the stars and the magnetic field.
The restaurant serves vegetarian soup, grilled salmon, roasted chicken, chocolate cake and homemade lemonade.
Children learn mathematics through puzzles, games, drawings and experiments that make abstract ideas concrete.
During the storm, strong winds knocked down several trees, damaged roofs and interrupted the electricity supply.
The photographer adjusted the aperture, shutter speed and focus to capture the butterfly's delicate wings.
Architects designed the building with large windows, solar panels, green roofs and natural ventilation.
Volunteers collected plastic bottles, cans and paper from the beach, then sorted everything for recycling.
The detective examined the fingerprints, questioned witnesses and finally discovered who had stolen the painting.
Elephants, giraffes, zebras, lions and hippopotamuses gather near the river during the dry season.
The smartphone application tracks exercise, sleep, heartbeat and nutrition, and suggests healthier habits.
Historians disagree about the causes of the war, but everyone agrees it changed the continent forever.
The teacher wrote the equation on the whiteboard, explained each variable and solved several examples.
Traffic lights change from green to yellow to red; pedestrians wait patiently before crossing the avenue.
The spacecraft launched successfully, reached orbit, deployed its antenna and began transmitting photographs.
user assistant system image photo picture question answer describe explain describe briefly
<|im_start|>system
You are a helpful assistant.<|im_end|>
<|im_start|>user
Describe this image.<|im_end|>
<|im_start|>assistant
The image shows a cat sitting on a chair.<|im_end|>
0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 25 30 42 50 64 100 128 256 512 1000 1024 2024 2025
3.14159 2.71828 1,000,000 $19.99 50% #1 @user a+b=c x*y (1) [2] {3} <4> a/b a\\b a|b a~b a^b a_b
! ? . , ; : ' " - -- ... ( ) [ ] { } < > / \\ | @ # $ % ^ & * + = ~ ` _
Hello, world! Hello world. hello. HELLO. Thanks! Thank you very much. Goodbye.
"""


def standin_qwen2_tokenizer(vocab_size: int = 4096) -> PreTrainedTokenizerFast:
    """A deterministic stand-in for the Qwen2 tokenizer with Qwen2's special-token ids.

    Trained on a small built-in English corpus (so English text tokenizes into plausible
    word pieces), padded to 151,643 entries so ``<|endoftext|>``=151643 (pad),
    ``<|im_start|>``=151644 and ``<|im_end|>``=151645 (eos), as in the released models.
    Token ids below 151643 mean nothing like Qwen2's; use it with random weights only.
    """
    # Each line separately, so merges never span lines and training is order-stable.
    lines = _STANDIN_CORPUS.splitlines(keepends=True)
    return train_bpe_tokenizer(lines, vocab_size, pad_vocab_to=QWEN2_BPE_VOCAB_SIZE)


__all__ = [
    "QWEN2_BPE_VOCAB_SIZE",
    "QWEN2_SPECIAL_TOKENS",
    "QWEN2_SPLIT_REGEX",
    "standin_qwen2_tokenizer",
    "train_bpe_tokenizer",
]
