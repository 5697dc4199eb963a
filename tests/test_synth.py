"""The embedded default data: deterministic, disjoint splits, answers that match the rendered pixels."""

from __future__ import annotations

import json
import operator
import re
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from data_prep import synth
from ghostvis.data import scenes
from ghostvis.data.manifest import read_manifest

SMALL = dict(num_captions=48, num_vqa=48, num_val=16, num_test=16, num_arith=24, num_arith_test=8,
             num_text_docs=30, shard_size=20, image_size=64)


def _members(tar: Path) -> dict[str, bytes]:
    with tarfile.open(tar) as tf:
        return {m.name: tf.extractfile(m).read() for m in tf if m.isfile()}


def _samples(d: Path) -> dict[str, dict[str, bytes]]:
    """key -> {ext: bytes} over every shard of a split directory."""
    out: dict[str, dict[str, bytes]] = {}
    for s in read_manifest(d).shards:
        for name, data in _members(d / s.name).items():
            key, ext = name.split(".", 1)
            out.setdefault(key, {})[ext] = data
    return out


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth")
    synth.generate(out, seed=3, workers=2, **SMALL)
    return out


def test_same_seed_gives_identical_bytes_serial_or_parallel(synth_dir: Path, tmp_path: Path) -> None:
    synth.main(["--out", str(tmp_path), "--seed", "3", "--workers", "1"]
               + [f"--{k.replace('_', '-')}={v}" for k, v in SMALL.items()])
    files = sorted(p.relative_to(synth_dir) for p in synth_dir.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    assert any(f.suffix == ".tar" for f in files) and any(f.suffix == ".jsonl" for f in files)
    for f in files:
        assert (synth_dir / f).read_bytes() == (tmp_path / f).read_bytes(), f


def test_other_seed_differs(synth_dir: Path, tmp_path: Path) -> None:
    synth.generate(tmp_path, seed=4, **SMALL)
    name = "captions/train/train-000000.tar"
    assert (synth_dir / name).read_bytes() != (tmp_path / name).read_bytes()


def test_manifests_and_counts(synth_dir: Path) -> None:
    expect = {"captions/train": ("image-text", 48), "captions/val": ("image-text", 16),
              "capchat/train": ("conversation", 12), "capchat/val": ("conversation", 16),
              "vqa/train": ("conversation", 48), "vqa/val": ("conversation", 16),
              "vqa/test": ("conversation", 16), "arith/train": ("conversation", 24),
              "arith/val": ("conversation", 8), "arith/test": ("conversation", 8)}
    for name, (kind, n) in expect.items():
        m = read_manifest(synth_dir / name, expected_kind=kind)
        assert m.num_samples == n and len(_samples(synth_dir / name)) == n
    assert [s.samples for s in read_manifest(synth_dir / "captions/train").shards] == [20, 20, 8]


def _scene(record: dict) -> scenes.Scene:
    return scenes.Scene(tuple(scenes.Shape(**o) for o in record["objects"]))


def test_splits_are_disjoint(synth_dir: Path) -> None:
    sigs: dict[str, set[str]] = {}
    for d in ("captions/train", "captions/val", "vqa/train", "vqa/val", "vqa/test"):
        split = d.split("/")[1]
        for s in _samples(synth_dir / d).values():
            record = json.loads(s["json"])
            scene = _scene(record.get("scene", record))
            assert scenes.split_of(scene) == split
            sigs.setdefault(split, set()).add(scene.signature())
    assert not sigs["train"] & sigs["val"] and not sigs["train"] & sigs["test"] and not sigs["val"] & sigs["test"]
    train = {json.loads(s["json"])["messages"][0]["content"] for s in _samples(synth_dir / "arith/train").values()}
    val, test = ({json.loads(s["json"])["messages"][0]["content"] for s in _samples(synth_dir / d).values()}
                 for d in ("arith/val", "arith/test"))
    assert train and val and test and not train & test and not train & val and not val & test


def _drawn_shape(img: Image.Image, o: scenes.Shape) -> str:
    """Which shape is painted at `o`, read from the pixels alone (probes need a large image)."""
    colour = scenes.COLOURS[o.colour]

    def filled(dx: float, dy: float) -> bool:
        return img.getpixel((int((o.x + dx * o.r) * img.width), int((o.y + dy * o.r) * img.width))) == colour

    assert filled(0, 0.2), f"{o.name} not painted at its centre"
    if filled(0.85, -0.85):
        return "square"
    return "circle" if filled(-0.75, 0) else "triangle"


def test_render_draws_the_scene() -> None:
    rng = scenes.scene_rng(0, "train", 0, "render-test")
    for _ in range(20):
        scene = scenes.sample_scene(rng)
        img = scenes.render(scene, 256)
        assert [_drawn_shape(img, o) for o in scene.objects] == [o.shape for o in scene.objects]


def test_answers_match_the_scene_and_the_pixels(synth_dir: Path, tiny_tokenizer) -> None:
    types = []
    for d in ("vqa/train", "vqa/test"):
        for key, s in _samples(synth_dir / d).items():
            record = json.loads(s["json"])
            scene = _scene(record["scene"])
            assert s["0.png"] == scenes.png_bytes(scenes.render(scene, 64)), key  # the image shows the scene
            user, answer = record["messages"][0]["content"], record["answer"]
            assert user.startswith("<|image|>\n") and record["messages"][1]["content"] == answer
            q = user.split("\n", 1)[1]
            by_colour = {o.colour: o for o in scene.objects}
            if record["type"] == "colour":
                shape = re.fullmatch(r"what colour is the (\w+)\?", q).group(1)
                assert [o.colour for o in scene.objects if o.shape == shape] == [answer]
            elif record["type"] == "shape":
                assert by_colour[re.fullmatch(r"what shape is the (\w+) object\?", q).group(1)].shape == answer
            elif record["type"] == "count":
                assert answer == str(len(scene.objects))
            else:
                m = re.fullmatch(r"is the (\w+) (\w+) left or right of the (\w+) (\w+)\?", q)
                a, b = by_colour[m.group(1)], by_colour[m.group(3)]
                assert (a.shape, b.shape) == (m.group(2), m.group(4))
                assert answer == ("left" if a.x < b.x else "right") and abs(a.x - b.x) >= scenes.MIN_DX
            assert answer in scenes.ANSWERS[record["type"]]
            types.append(record["type"])
            ids, mask = tiny_tokenizer.render_conversation(record, 512, num_vision_tokens=4)
            assert ids.count(tiny_tokenizer.image_token_id) == 4 and sum(mask) > 0
    assert {t: types.count(t) for t in set(types)} == {t: 16 for t in scenes.QUESTION_TYPES}


def test_captions_name_objects_left_to_right(synth_dir: Path, tiny_tokenizer) -> None:
    captions = _samples(synth_dir / "captions/val")
    for s in captions.values():
        scene, caption = _scene(json.loads(s["json"])), s["txt"].decode()
        positions = [caption.index(o.name) for o in scenes.left_to_right(scene)]
        assert positions == sorted(positions) and caption.endswith(".")
        assert s["png"] == scenes.png_bytes(scenes.render(scene, 64))
    for key, s in _samples(synth_dir / "capchat/val").items():  # the same samples as chats
        record = json.loads(s["json"])
        assert record["messages"][1]["content"] == captions[key]["txt"].decode() and s["0.png"] == captions[key]["png"]
        assert sum(tiny_tokenizer.render_conversation(record, 512, 4)[1]) > 0


OPS = {"+": operator.add, "-": operator.sub, "*": operator.mul}


def test_arithmetic_and_text_corpus_are_correct(synth_dir: Path, tiny_tokenizer) -> None:
    for s in _samples(synth_dir / "arith/train").values():
        record = json.loads(s["json"])
        a, op, b = re.fullmatch(r"what is (\d+) ([-+*]) (\d+)\?", record["messages"][0]["content"]).groups()
        assert record["answer"] == str(OPS[op](int(a), int(b))) and int(record["answer"]) >= 0
        parts = record["messages"][1]["content"]
        assert [p["type"] for p in parts] == ["python", "output", "text"] and parts[1]["text"] == record["answer"]
        ids, mask = tiny_tokenizer.render_conversation(record, 256)
        assert tiny_tokenizer.special_id("<|python_start|>") in ids and sum(mask) > 0
    lines = [ln for p in sorted((synth_dir / "text").glob("*.jsonl")) for ln in p.read_text().splitlines()]
    docs = [json.loads(ln)["text"] for ln in lines]
    assert len(docs) == 30
    text = "\n".join(docs)
    facts = re.findall(r"^(\d+) ([-+*]) (\d+) = (\d+)$", text, flags=re.M)
    assert len(facts) == 30 and all(OPS[op](int(a), int(b)) == int(c) for a, op, b, c in facts)


def test_chance_accuracy() -> None:
    assert synth.chance_accuracy("colour") == pytest.approx(1 / 6)
    assert synth.chance_accuracy("position") == 0.5
    assert synth.chance_accuracy("count") == 0.25
    with pytest.raises(ValueError, match="unknown question type"):
        synth.chance_accuracy("size")


def test_multi_turn_conversations_answer_from_the_image_only() -> None:
    """--vqa-turns: every turn's answer is right for the scene, and no earlier turn gives it away."""
    import json

    from data_prep.synth import Style, vqa_sample
    from ghostvis.data import scenes

    lengths = []
    for i in range(300):
        record = json.loads(vqa_sample(0, "train", i, 32, Style(vqa_turns=6))["json"])
        scene = scenes.Scene(tuple(scenes.Shape(**o) for o in record["scene"]["objects"]))
        truth = {(q.question, q.answer) for q in scenes.questions(scene)}
        msgs = record["messages"]
        turns = [(msgs[k]["content"].split("\n")[-1], msgs[k + 1]["content"]) for k in range(0, len(msgs), 2)]
        assert set(turns) <= truth and len(set(turns)) == len(turns)
        assert (record["answer"], turns[-1][1]) == (turns[-1][1], record["answer"])
        assert all("how many" not in q for q, _ in turns[1:])
        for k, (q, a) in enumerate(turns):
            before = " ".join(f"{q0} {a0}" for q0, a0 in turns[:k])
            for o in scene.objects:
                # a colour or shape answer about `o` must not follow a turn that paired o's colour and shape
                asked_about_o = f"the {o.colour} object" in q or f"the {o.shape}?" in q
                paired_before = o.name in before or f"the {o.colour} object? {o.shape}" in before \
                    or f"the {o.shape}? {o.colour}" in before
                assert not (asked_about_o and paired_before), (turns, k)
        pairs = [frozenset(n for n in (o.name for o in scene.objects) if n in q) for q, _ in turns if "left or" in q]
        assert len(pairs) == len(set(pairs)) <= 2
        lengths.append(len(turns))
    assert max(lengths) == 6 and sum(lengths) / len(lengths) > 3  # multi-object scenes get several turns
    # val/test stay one question, so the held-out eval is unchanged
    assert len(json.loads(vqa_sample(0, "test", 3, 32, Style(vqa_turns=6))["json"])["messages"]) == 2
    assert vqa_sample(0, "train", 5, 32, Style(vqa_turns=1)) == vqa_sample(0, "train", 5, 32)


def test_sentence_replies_name_the_object_right_before_the_answer() -> None:
    """QA.sentence (bench/vlm_probe.py --sentences): the one-word answer follows the words that name what the
    question asks about, so the reply's answer token is predicted where that name was just read."""
    import random

    for i in range(200):
        scene = scenes.sample_scene(random.Random(i))
        for q in scenes.questions(scene):
            words = q.sentence.rstrip(".").split()
            at = words.index(q.answer, 1 if q.type == "shape" else 0)
            before = " ".join(words[:at])
            if q.type == "shape":  # "a green square."
                assert before.split()[-1] == q.question.split()[-2], q
            elif q.type == "colour":  # "the circle is red."
                assert before == f"the {q.question.rstrip('?').split()[-1]} is", q
            elif q.type == "position":  # "the red circle is left of the blue square."
                assert q.question.startswith(f"is {before.removesuffix(' is')} left or right of") and \
                    q.sentence.endswith(q.question.rsplit(" of ", 1)[1].rstrip("?") + "."), q
            else:
                assert q.sentence == f"{q.answer}.", q
