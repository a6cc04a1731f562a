"""A small local tokenizer for the tiny test checkpoints.

Real checkpoints ship tokenizers with 150k-260k entries; here a byte-level BPE
is trained in well under a second on a short built-in English corpus.  Because
the BPE starts from the full 256-symbol byte alphabet, *any* text (any script,
emoji, stray control characters) tokenizes without an unknown token.  The
model's real special tokens are added as special (never split) tokens, so a
prompt rendered by the chat template maps them to single ids, exactly as with
the real tokenizer.

Nothing here touches the network.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

#: Target size of the trained BPE vocabulary (the byte alphabet included,
#: special tokens excluded).  The corpus is small, so training may stop a bit
#: short of it; the result is deterministic either way.
DEFAULT_BPE_VOCAB_SIZE = 1000

# A short corpus in the domain of the project (pictures, objects, colours,
# positions, yes/no questions about an image), plus general English, digits and
# punctuation, so common words become single tokens.  Written for this module.
CORPUS: tuple[str, ...] = (
    "Is the red circle left of the blue square? Yes, the red circle is left of the blue square.",
    "Is the blue square above the green triangle? No, the blue square is below the green triangle.",
    "Is there a dog in the image? No, there is no dog in the image. There is a cat on the sofa.",
    "Is there a person in the picture? Yes, a person is standing next to a bicycle near the road.",
    "How many apples are on the table? There are three apples and two oranges on the wooden table.",
    "What color is the car? The car is white. A yellow bus is parked behind the white car.",
    "Describe the image in detail. The photo shows a kitchen with a window, a sink and a small plant.",
    "The small black cat sits to the right of the large brown dog, and both look at the camera.",
    "A man is holding an umbrella in the rain while a woman rides a horse across the field.",
    "The image contains a clock, a chair, a laptop, a cup of coffee and a book on a desk.",
    "Answer with yes or no. Is the object in the top left corner a bird? Yes. Is it flying? No.",
    "There are four people playing frisbee in the park; one of them wears a red shirt.",
    "Please answer the question about the picture briefly and accurately, using a single word.",
    "Which shape is bigger, the circle or the square? The square is bigger than the circle.",
    "Between the tree and the house there is a fence. The sky is blue and there are no clouds.",
    "A plate with pizza, a fork and a knife. The pizza has tomatoes, cheese and green peppers.",
    "The train arrives at the station at 10:45. Passengers wait on the platform with their bags.",
    "Count the objects: 1, 2, 3, 4, 5, 6, 7, 8, 9, 10. Numbers like 42, 100 and 2024 appear too.",
    "The giraffe is taller than the elephant, but the elephant is heavier than the giraffe.",
    "Two boats float on the lake under a bridge; a child on the shore throws bread to the ducks.",
    "Hallucination means the model describes an object that does not exist in the image.",
    "The model said there was a phone on the bed, but the image shows only a pillow and a blanket.",
    "Look at the image carefully. Is the statement true or false? The statement is false.",
    "Where is the ball? The ball is under the chair, in front of the door, behind the box.",
    "She said: \"It's a sunny day!\" He replied (quietly): 'Maybe - we'll see...' #weather @home",
    "Objects: person, bicycle, car, motorcycle, airplane, bus, train, truck, boat, traffic light,",
    "fire hydrant, stop sign, parking meter, bench, bird, cat, dog, horse, sheep, cow, elephant,",
    "bear, zebra, giraffe, backpack, umbrella, handbag, tie, suitcase, skis, snowboard, kite,",
    "bottle, wine glass, cup, spoon, bowl, banana, apple, sandwich, orange, broccoli, carrot,",
    "hot dog, pizza, donut, cake, couch, potted plant, bed, dining table, toilet, tv, mouse,",
    "remote, keyboard, cell phone, microwave, oven, toaster, refrigerator, vase, scissors, teddy bear.",
    "Colors: red, orange, yellow, green, blue, purple, pink, brown, black, white, gray, silver, gold.",
    "Positions: left, right, above, below, on top of, beneath, inside, outside, next to, near, far.",
    "The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs.",
    "What is happening in this scene? Children are building a sandcastle on a sunny beach.",
    "You are a helpful assistant. Look at the picture and answer the user's question.",
    # Chat roles as they follow a turn marker: "<|im_start|>user\n", "<start_of_turn>model\n".
    "Question:\n\nWhat is in the image?\n\nAnswer:\n\nA cat.\n\n",
    "user\nsystem\nassistant\nmodel\nuser\nmodel\nuser\nassistant\nsystem\nuser\nmodel\nassistant\n",
)


def train_byte_level_bpe(
    corpus: Sequence[str] = CORPUS,
    vocab_size: int = DEFAULT_BPE_VOCAB_SIZE,
    leading_special_tokens: Sequence[str] = (),
    add_prefix_space: bool = False,
) -> Tokenizer:
    """Train a byte-level BPE ``tokenizers.Tokenizer`` on ``corpus``.

    ``leading_special_tokens`` get the first ids (0, 1, ...), the way Gemma
    puts ``<pad>``, ``<eos>``, ``<bos>``, ``<unk>`` first.  Training is
    single-threaded in effect (tiny corpus) and deterministic.
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size + len(leading_special_tokens),
        min_frequency=1,
        show_progress=False,
        special_tokens=[AddedToken(t, special=True, normalized=False) for t in leading_special_tokens],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(list(corpus), trainer=trainer)
    return tok


def build_tokenizer(
    *,
    leading_special_tokens: Sequence[str] = (),
    trailing_special_tokens: Sequence[str] = (),
    named_special_tokens: Mapping[str, str],
    chat_template: str,
    add_bos_token: bool = False,
    padding_side: str = "right",
    bpe_vocab_size: int = DEFAULT_BPE_VOCAB_SIZE,
    extra_init_kwargs: Mapping[str, object] | None = None,
) -> PreTrainedTokenizerFast:
    """Build a ``PreTrainedTokenizerFast`` carrying a model's special tokens.

    Args:
        leading_special_tokens: special tokens given the lowest ids, in order.
        trailing_special_tokens: special tokens appended after the BPE vocabulary,
            in order (the way Qwen's control tokens follow its BPE entries).
        named_special_tokens: ``{"bos_token": "<bos>", "image_token": ..., ...}``;
            the standard names (bos/eos/unk/pad...) and model specific ones
            (``image_token``, ``boi_token`` ...) become tokenizer attributes, and
            ``<name>_id`` resolves to their ids.  Every value must appear in one of
            the two lists above.
        chat_template: Jinja chat template stored with the tokenizer.
        add_bos_token: whether plain ``tokenizer(text)`` prepends the bos token
            (Gemma does, Qwen does not).
        padding_side: the tokenizer's default padding side as saved in the
            checkpoint (real Qwen2.5-VL ships "right", real Gemma 3 "left");
            batched generation needs "left", set it when loading.
    """
    declared = list(leading_special_tokens) + list(trailing_special_tokens)
    if len(set(declared)) != len(declared):
        raise ValueError(f"duplicate special tokens in {declared}")
    missing = [v for v in named_special_tokens.values() if v not in declared]
    if missing:
        raise ValueError(f"named special tokens {missing} are not in the special token lists")

    backend = train_byte_level_bpe(vocab_size=bpe_vocab_size, leading_special_tokens=leading_special_tokens)
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in trailing_special_tokens])
    if add_bos_token:
        bos = named_special_tokens["bos_token"]
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos}:0 $A:0",
            pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
            special_tokens=[(bos, backend.token_to_id(bos))],
        )
    else:
        backend.post_processor = processors.ByteLevel(trim_offsets=False)

    # Special tokens that have no name (e.g. <start_of_turn>) are listed as extra
    # special tokens so that decode(skip_special_tokens=True) drops them.
    named_values = set(named_special_tokens.values())
    extra = [t for t in declared if t not in named_values]
    kwargs: dict[str, object] = dict(named_special_tokens)
    kwargs.update(
        tokenizer_object=backend,
        extra_special_tokens=extra,
        chat_template=chat_template,
        model_max_length=32768,
        clean_up_tokenization_spaces=False,
        padding_side=padding_side,
    )
    if extra_init_kwargs:
        kwargs.update(extra_init_kwargs)
    tokenizer = PreTrainedTokenizerFast(**kwargs)

    for token in declared:  # every special token must be a single, known id
        ids = tokenizer.convert_tokens_to_ids([token])
        if ids[0] is None or tokenizer.convert_ids_to_tokens(ids)[0] != token:
            raise RuntimeError(f"special token {token!r} did not get its own id")
    return tokenizer
