"""A small generated VQA set (coloured shapes, relational questions) for demos and tests.

Everything is derived from ``random.Random(seed)``, so the same arguments give the same
images and questions byte for byte.  Shapes in one scene have distinct kinds and distinct
colours and sit in distinct rows *and* columns of a 3x3 grid, so "the red circle", "the
square" and every left/right/above/below relation are unambiguous.

Stand-in labels.  The demo's models have random weights, so their answers cannot be judged in any
meaningful way (the ``halp`` rule calls every one hallucinated, leaving the probes a single class).
``labels.csv`` therefore labels the *questions* instead: ``hallucinated`` is what a model that always
answers "yes" would get, i.e. true where the ground truth is "no", false where it is "yes", and empty
(unjudged) for the questions that are not yes/no.  Both classes are guaranteed (half the yes/no
answers are "yes"), and since the label depends on the image, a random model's states carry no
signal about it: the demo's probe AUROCs should sit near chance.  They are not hallucination labels.
"""

from __future__ import annotations

import csv
import io
import json
import os
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from PIL import Image, ImageDraw

from vlmstates.atomic import write_bytes_atomic
from vlmstates.dataset import Question

__all__ = [
    "COLORS",
    "SHAPES",
    "Shape",
    "Scene",
    "demo_questions",
    "make_scene",
    "render_scene",
    "relation_holds",
    "stand_in_label",
    "write_demo_dataset",
]

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "blue": (40, 90, 220),
    "green": (30, 160, 60),
    "yellow": (235, 195, 20),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
BACKGROUND: tuple[int, int, int] = (245, 245, 240)
SIDE_LENGTHS: tuple[int, ...] = (96, 112, 128, 144, 160)
RELATIONS: dict[str, tuple[str, str]] = {
    # axis -> (relation holding when a < b on that axis, the opposite relation)
    "x": ("to the left of", "to the right of"),
    "y": ("above", "below"),
}


@dataclass(frozen=True)
class Shape:
    kind: str  # circle | square | triangle
    color: str  # key of COLORS
    cx: int  # centre of the bounding box, pixels
    cy: int
    r: int  # half the side of the bounding box

    @property
    def name(self) -> str:
        return f"{self.color} {self.kind}"


@dataclass(frozen=True)
class Scene:
    image_id: str
    width: int
    height: int
    shapes: tuple[Shape, ...]


def relation_holds(a: Shape, b: Shape, relation: str) -> bool:
    """Whether ``a`` is ``relation`` ``b`` (compared by bounding-box centres)."""
    if relation == "to the left of":
        return a.cx < b.cx
    if relation == "to the right of":
        return a.cx > b.cx
    if relation == "above":
        return a.cy < b.cy
    if relation == "below":
        return a.cy > b.cy
    raise ValueError(f"unknown relation {relation!r}")


def make_scene(image_id: str, rng: random.Random, size: tuple[int, int] | None = None) -> Scene:
    """A scene of `size` (width, height), or of side lengths drawn from SIDE_LENGTHS."""
    width, height = size or (rng.choice(SIDE_LENGTHS), rng.choice(SIDE_LENGTHS))
    k = rng.choice((2, 3))
    kinds = rng.sample(SHAPES, k)
    colors = rng.sample(sorted(COLORS), k)
    cols = rng.sample(range(3), k)
    rows = rng.sample(range(3), k)
    cell_w, cell_h = width / 3, height / 3
    cell = min(cell_w, cell_h)
    shapes = []
    for kind, color, col, row in zip(kinds, colors, cols, rows):
        r = int(cell * rng.uniform(0.26, 0.38))
        slack = max(0, int(cell / 2 - r) - 2)
        cx = int((col + 0.5) * cell_w) + rng.randint(-slack, slack)
        cy = int((row + 0.5) * cell_h) + rng.randint(-slack, slack)
        shapes.append(Shape(kind, color, cx, cy, r))
    return Scene(image_id, width, height, tuple(shapes))


def render_scene(scene: Scene) -> Image.Image:
    img = Image.new("RGB", (scene.width, scene.height), BACKGROUND)
    draw = ImageDraw.Draw(img)
    for s in scene.shapes:
        fill = COLORS[s.color]
        box = (s.cx - s.r, s.cy - s.r, s.cx + s.r, s.cy + s.r)
        if s.kind == "circle":
            draw.ellipse(box, fill=fill)
        elif s.kind == "square":
            draw.rectangle(box, fill=fill)
        elif s.kind == "triangle":
            draw.polygon([(s.cx, s.cy - s.r), (s.cx - s.r, s.cy + s.r), (s.cx + s.r, s.cy + s.r)], fill=fill)
        else:
            raise ValueError(f"unknown shape {s.kind!r}")
    return img


def _relational_question(scene: Scene, want: str, rng: random.Random) -> tuple[str, str]:
    a, b = rng.sample(scene.shapes, 2)
    holds_if_less, opposite = RELATIONS[rng.choice(("x", "y"))]
    true_rel = holds_if_less if relation_holds(a, b, holds_if_less) else opposite
    false_rel = opposite if true_rel == holds_if_less else holds_if_less
    rel = true_rel if want == "yes" else false_rel
    answer = "yes" if relation_holds(a, b, rel) else "no"
    assert answer == want
    return f"Is the {a.name} {rel} the {b.name}?", answer


def _count_question(scene: Scene) -> tuple[str, str]:
    return "How many shapes are there?", str(len(scene.shapes))


def _colour_question(scene: Scene, rng: random.Random) -> tuple[str, str]:
    shape = rng.choice(scene.shapes)
    return f"What color is the {shape.kind}?", shape.color


def stand_in_label(answer: str) -> str:
    """The demo's stand-in label of a question: was an always-"yes" answer wrong? ("" if not yes/no)."""
    return {"no": "true", "yes": "false"}.get(answer, "")


def _csv_bytes(header: list[str], rows) -> bytes:
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return text.getvalue().encode("utf-8")


def write_demo_dataset(out_dir: os.PathLike | str, n_images: int = 24, seed: int = 0) -> Path:
    """Write ``out_dir/images/scene_NNN.png``, ``out_dir/scenes.json`` (the geometry), the
    stand-in labels ``out_dir/labels.csv`` (see the module's docstring) and, last,
    ``out_dir/questions.csv``; return the CSV path.

    Each image gets one yes/no relational question (exactly half "yes" overall, up to
    one for odd counts); every second image also gets a "How many shapes are there?"
    or a "What color is the <shape>?" question (about 1.5 questions per image).
    """
    if n_images < 1:
        raise ValueError(f"n_images must be >= 1, got {n_images}")
    out_dir = Path(out_dir)
    images_dir = out_dir / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    csv_path = out_dir / "questions.csv"
    csv_path.unlink(missing_ok=True)  # no CSV until the images are complete

    rng = random.Random(seed)
    width = max(3, len(str(n_images)))
    scenes = [make_scene(f"scene_{i:0{width}d}.png", rng) for i in range(1, n_images + 1)]

    yes_no = (["yes", "no"] * ((n_images + 1) // 2))[:n_images]
    rng.shuffle(yes_no)
    rows: list[tuple[str, str, str]] = []  # image_id, question, answer
    for i, scene in enumerate(scenes):
        rows.append((scene.image_id, *_relational_question(scene, yes_no[i], rng)))
        if i % 4 == 1:
            rows.append((scene.image_id, *_count_question(scene)))
        elif i % 4 == 3:
            rows.append((scene.image_id, *_colour_question(scene, rng)))

    wanted = {s.image_id for s in scenes}
    for old in images_dir.glob("scene_*.png"):
        if old.name not in wanted:
            old.unlink()
    for scene in scenes:
        buf = io.BytesIO()
        render_scene(scene).save(buf, format="PNG")
        write_bytes_atomic(images_dir / scene.image_id, buf.getvalue())

    meta = {"seed": seed, "n_images": n_images, "colors": COLORS, "scenes": [asdict(s) for s in scenes]}
    write_bytes_atomic(out_dir / "scenes.json", (json.dumps(meta, indent=1) + "\n").encode("utf-8"))

    qwidth = max(4, len(str(len(rows))))
    questions = [(f"q{n:0{qwidth}d}", *row) for n, row in enumerate(rows, start=1)]
    labels = [(qid, stand_in_label(answer)) for qid, _, _, answer in questions]
    write_bytes_atomic(out_dir / "labels.csv", _csv_bytes(["question_id", "hallucinated"], labels))
    write_bytes_atomic(csv_path, _csv_bytes(["question_id", "image_id", "question", "answer"], questions))
    return csv_path


#: What makes a relational question of `demo_questions` long, as the HALP set's longest are.
LONG_QUESTION_TAIL = " Look at the whole picture carefully before you answer, and answer yes or no."


def demo_questions(
    out_dir: os.PathLike | str, n: int, sizes: Sequence[tuple[int, int]], seed: int = 0
) -> list[Question]:
    """`n` questions on `n` demo scenes, scene i of size sizes[i % len(sizes)] (width, height), written as
    ``out_dir/scene_NNNN.png``: for tests that need images of chosen sizes and prompts of mixed lengths
    (in turn a relational, a count, a colour and a long relational question, 5 to 20 words)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    questions = []
    for i in range(n):
        scene = make_scene(f"scene_{i:04d}.png", rng, sizes[i % len(sizes)])
        render_scene(scene).save(out_dir / scene.image_id)
        kind = i % 4
        if kind in (0, 3):
            text, answer = _relational_question(scene, rng.choice(("yes", "no")), rng)
            text += LONG_QUESTION_TAIL if kind == 3 else ""
        elif kind == 1:
            text, answer = _count_question(scene)
        else:
            text, answer = _colour_question(scene, rng)
        questions.append(Question(f"q{i:04d}", scene.image_id, text, answer))
    return questions
