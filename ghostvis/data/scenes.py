"""Rendered shape scenes: the embedded default data (docs/datasets.md).

A scene is 1-4 coloured shapes on a plain background. From a scene come an image, a caption and
question/answer pairs whose one-word answers make exact-match accuracy meaningful. Everything is a
pure function of a `random.Random`, so data_prep/synth.py (writing shards) and the eval (checking
answers, blanking images) share one definition.

Questions are asked only when unambiguous: colours are distinct within a scene (so "the green object"
names one object), a shape is asked about only when it occurs once, and left/right only when the two
centres are clearly apart.
"""

from __future__ import annotations

import hashlib
import io
import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 205, 30),
    "purple": (140, 60, 180),
    "orange": (245, 140, 30),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
QUESTION_TYPES: tuple[str, ...] = ("colour", "shape", "count", "position")
MAX_OBJECTS = 4
BACKGROUND = (235, 235, 235)
NUMBER_WORDS = ("zero", "one", "two", "three", "four")

# Answer sets: a uniform guess over them is the chance level the eval prints.
ANSWERS: dict[str, tuple[str, ...]] = {
    "colour": tuple(COLOURS),
    "shape": SHAPES,
    "count": tuple(str(n) for n in range(1, MAX_OBJECTS + 1)),
    "position": ("left", "right"),
}


@dataclass(frozen=True)
class Shape:
    shape: str
    colour: str
    x: float  # centre, as a fraction of the image side
    y: float
    r: float  # half the side of the bounding box, as a fraction of the image side

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"

    @property
    def a_name(self) -> str:
        """The name with its article: "a red circle", "an orange square"."""
        return f"{'an' if self.colour[0] in 'aeiou' else 'a'} {self.name}"


@dataclass(frozen=True)
class Scene:
    objects: tuple[Shape, ...]

    def signature(self) -> str:
        """A stable identity of the scene's content (what split assignment hashes)."""
        parts = [f"{o.shape},{o.colour},{o.x:.3f},{o.y:.3f},{o.r:.3f}" for o in self.objects]
        return ";".join(sorted(parts))

    def to_json(self) -> dict:
        return {"objects": [o.__dict__ for o in self.objects]}


@dataclass(frozen=True)
class QA:
    type: str
    question: str
    answer: str  # the one word the question asks for
    sentence: str  # the same answer as a sentence that names its object right before the answer word


# Sizes (radius as a fraction of the side) and the gap that keeps left/right unambiguous.
SIZES = (0.10, 0.14)
MIN_DX = 0.12


def sample_scene(rng: random.Random, num_objects: int | None = None) -> Scene:
    """1..MAX_OBJECTS shapes with distinct colours at non-overlapping positions."""
    n = num_objects if num_objects is not None else rng.randint(1, MAX_OBJECTS)
    colours = rng.sample(list(COLOURS), n)
    objects: list[Shape] = []
    while len(objects) < n:
        r = rng.choice(SIZES)
        x, y = rng.uniform(r, 1 - r), rng.uniform(r, 1 - r)
        # Bounding circles (radius r·√2 covers a square's corners) must not touch.
        if all((x - o.x) ** 2 + (y - o.y) ** 2 > (1.45 * (r + o.r)) ** 2 for o in objects):
            objects.append(Shape(rng.choice(SHAPES), colours[len(objects)], round(x, 3), round(y, 3), r))
        elif len(objects) and rng.random() < 0.02:
            objects.clear()  # a crowded layout: start over rather than loop forever
    return Scene(tuple(objects))


def render(scene: Scene, size: int) -> Image.Image:
    img = Image.new("RGB", (size, size), BACKGROUND)
    draw = ImageDraw.Draw(img)
    for o in scene.objects:
        cx, cy, r = o.x * size, o.y * size, o.r * size
        fill = COLOURS[o.colour]
        if o.shape == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        elif o.shape == "square":
            draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
        else:
            draw.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=fill)
    return img


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def left_to_right(scene: Scene) -> list[Shape]:
    return sorted(scene.objects, key=lambda o: o.x)


def place(o: Shape) -> str:
    """Where an object lies on a 3 x 3 grid, in words: "at the top left", "on the right", "in the centre"."""
    row = ("top", "", "bottom")[min(2, int(o.y * 3))]
    col = ("left", "", "right")[min(2, int(o.x * 3))]
    if row and col:
        return f"at the {row} {col}"
    if row or col:
        return f"{'at' if row else 'on'} the {row or col}"
    return "in the centre"


def caption(scene: Scene, places: bool = False) -> str:
    """One template per object count, objects named left to right; with `places`, each object also says
    where it lies (`place`), so the caption supervises every object's position, not only their order."""
    objs = left_to_right(scene)
    names = [o.a_name + (f" {place(o)}" if places else "") for o in objs]
    if len(objs) == 1:
        return f"{names[0]}."
    if len(objs) == 2 and not places:
        return f"{names[0]} to the left of {names[1]}."
    listed = ", ".join(names[:-1]) + f" and {names[-1]}"
    return f"{NUMBER_WORDS[len(objs)]} shapes: {listed}, from left to right."


def questions(scene: Scene) -> list[QA]:
    """Every unambiguous question about the scene, grouped by type."""
    n = len(scene.objects)
    qas = [QA("count", "how many shapes are there?", str(n), f"{n}.")]
    for o in scene.objects:
        qas.append(QA("shape", f"what shape is the {o.colour} object?", o.shape, f"{o.a_name}."))
        if sum(p.shape == o.shape for p in scene.objects) == 1:
            qas.append(QA("colour", f"what colour is the {o.shape}?", o.colour, f"the {o.shape} is {o.colour}."))
    for a in scene.objects:
        for b in scene.objects:
            if a is not b and abs(a.x - b.x) >= MIN_DX:
                side = "left" if a.x < b.x else "right"
                qas.append(QA("position", f"is the {a.name} left or right of the {b.name}?", side,
                              f"the {a.name} is {side} of the {b.name}."))
    return qas


def _revealed(qa: QA, scene: Scene) -> tuple[set[str], frozenset[str] | None]:
    """What a question and its answer give away: the objects whose colour-shape pairing it names or answers,
    and for a left/right question the pair it relates."""
    named = {o.name for o in scene.objects if o.name in qa.question
             or (qa.type == "shape" and f"the {o.colour} object" in qa.question)
             or (qa.type == "colour" and f"the {o.shape}?" in qa.question)}
    return named, frozenset(named) if qa.type == "position" else None


def conversation_qas(scene: Scene, first: QA, rng: random.Random, max_turns: int) -> list[QA]:
    """`first`, then up to `max_turns - 1` more questions about the same scene, none of whose answers an
    earlier turn gives away: a shape or colour question is skipped once its object's colour-shape pairing
    was named or answered, a left/right pair is asked once, and the count comes only first (later turns
    enumerate objects). Colour questions (the rarest: asked only of a shape that occurs once) go first,
    then shape, then at most two left/right ones, which name two objects and would give their pairings
    away. Several answers per image spread the cost of encoding it over more supervised tokens. The first
    turn keeps the single-question data's type balance: the held-out questions are all first turns."""
    turns = [first]
    known, asked = _revealed(first, scene)
    related = {asked} if asked else set()
    rest = [q for q in questions(scene) if q.type != "count" and q != first]
    rng.shuffle(rest)
    pool = sorted(rest, key=lambda q: ("colour", "shape", "position").index(q.type))  # stable: shuffled within
    for q in pool:
        if len(turns) >= max_turns:
            break
        named, pair = _revealed(q, scene)
        if pair is not None:
            if pair in related or len(related) >= 2:
                continue
            related.add(pair)
        elif named & known:
            continue
        turns.append(q)
        known |= named
    return turns


def split_of(scene: Scene) -> str:
    """Which split a scene belongs to, from its content, so splits are disjoint by construction."""
    bucket = int(hashlib.sha256(scene.signature().encode()).hexdigest()[:8], 16) % 10
    return "test" if bucket == 0 else "val" if bucket == 1 else "train"


def scene_rng(seed: int, split: str, index: int, stream: str) -> random.Random:
    """An independent generator per sample, so any sample can be made alone (and in parallel)."""
    digest = hashlib.sha256(f"{seed}/{stream}/{split}/{index}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "little"))


def sample_split_scene(rng: random.Random, split: str, qtype: str | None = None) -> tuple[Scene, list[QA]]:
    """Draw scenes until one falls in `split` (and, given `qtype`, admits a question of that type)."""
    while True:
        scene = sample_scene(rng)
        if split_of(scene) != split:
            continue
        qas = questions(scene)
        if qtype is None or any(q.type == qtype for q in qas):
            return scene, qas


def chance_accuracy(qtype: str) -> float:
    """Exact-match accuracy of a uniform guess over the answer set of a question type."""
    if qtype not in ANSWERS:
        raise ValueError(f"unknown question type {qtype!r}; expected one of {list(ANSWERS)}")
    return 1.0 / len(ANSWERS[qtype])
