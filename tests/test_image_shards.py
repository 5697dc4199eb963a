"""Ingest of every supported input format, on small fixtures made here, read back with ShardStream."""

from __future__ import annotations

import io
import json
import struct
import tarfile
import zlib
from pathlib import Path

import datasets
import numpy as np
import pytest
from PIL import Image

from data_prep import image_shards
from ghostvis.data.manifest import Manifest, read_manifest
from ghostvis.data.shards import ShardStream
from ghostvis.vision.transforms import load_image


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _huge_png_header(side: int = 9000) -> bytes:
    """A PNG that claims side x side pixels (a decompression bomb): only the header is real."""
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def awkward_images() -> dict[str, bytes]:
    """file name -> bytes: every mode the ingest must accept, plus unusable ones it must skip."""
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 255, (24, 40, 3), dtype=np.uint8))
    good = {
        "rgb.jpg": _encode(rgb, "JPEG"),
        "rgba.png": _encode(rgb.convert("RGBA"), "PNG"),
        "palette.png": _encode(rgb.convert("P"), "PNG"),
        "cmyk.jpg": _encode(rgb.convert("CMYK"), "JPEG"),
        "gray16.png": _encode(Image.fromarray(np.full((20, 20), 40000, dtype=np.uint16)), "PNG"),
        "gray.webp": _encode(rgb.convert("L"), "WEBP"),
        "wide.bmp": _encode(Image.new("RGB", (200, 100), (10, 200, 30)), "BMP"),
    }
    bad = {
        "truncated.jpg": good["rgb.jpg"][: len(good["rgb.jpg"]) // 2],
        "notanimage.jpg": b"this is text, not an image",
        "bomb.png": _huge_png_header(),
    }
    return {**good, **bad}


GOOD = ("rgb.jpg", "rgba.png", "palette.png", "cmyk.jpg", "gray16.png", "gray.webp", "wide.bmp")
BAD = ("truncated.jpg", "notanimage.jpg", "bomb.png")


@pytest.fixture()
def image_dir(tmp_path: Path) -> Path:
    d = tmp_path / "images"
    d.mkdir()
    for name, data in awkward_images().items():
        (d / name).write_bytes(data)
    return d


def read_all(data_dir: Path, kind: str) -> list[dict]:
    return list(ShardStream(data_dir, seed=0, loop=False, shuffle=False, expected_kind=kind))


def skipped(out: Path) -> dict[str, str]:
    return {json.loads(l)["source"]: json.loads(l)["reason"] for l in (out / "skipped.jsonl").read_text().splitlines()}


def test_folder_jsonl_checks_every_image(image_dir: Path, tmp_path: Path) -> None:
    rows = [{"file": n, "caption": f"picture {n}"} for n in GOOD + BAD]
    rows += [{"image": "missing.jpg", "text": "gone"}, {"file": "rgb.jpg", "caption": "  "}]
    (tmp_path / "caps.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    m = image_shards.main(["folder", "--images", str(image_dir), "--captions", str(tmp_path / "caps.jsonl"),
                           "--out", str(out), "--shard-size", "4", "--workers", "2"])
    assert m.kind == "image-text" and m.num_samples == len(GOOD)
    reasons = skipped(out)
    assert set(reasons) == {*BAD, "missing.jpg", "rgb.jpg"}
    assert "too large" in reasons["bomb.png"] and "truncated" in reasons["truncated.jpg"]
    assert "unreadable" in reasons["missing.jpg"] and reasons["rgb.jpg"] == "missing caption"
    samples = read_all(out, "image-text")
    assert [json.loads(s["json"])["file"] for s in samples] == list(GOOD)
    for s in samples:
        (ext,) = [e for e in s if e in ("jpg", "png", "webp")]
        assert load_image(s[ext]).mode == "RGB"
        assert s["txt"].decode() == f"picture {json.loads(s['json'])['file']}"
    by_file = {json.loads(s["json"])["file"]: s for s in samples}
    assert "png" in by_file["wide.bmp"] and "jpg" in by_file["cmyk.jpg"]  # BMP re-encoded, JPEG kept
    assert by_file["cmyk.jpg"]["jpg"] == (image_dir / "cmyk.jpg").read_bytes()


def test_folder_csv_max_side_and_resume(image_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "caps.csv").write_text("file,caption\nwide.bmp,a green box\nrgb.jpg,noise\ncmyk.jpg,ink\n")
    out = tmp_path / "out"
    args = ["folder", "--images", str(image_dir), "--captions", str(tmp_path / "caps.csv"), "--out", str(out),
            "--max-side", "32", "--shard-size", "2", "--workers", "1"]
    image_shards.main(args)
    sizes = [load_image(s.get("png") or s["jpg"]).size for s in read_all(out, "image-text")]
    assert sizes == [(32, 16), (32, 19), (32, 19)]
    shards = sorted(out.glob("shard-*.tar"))
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in shards}
    (out / ".progress" / "shard-000001.tar.json").unlink()  # as if interrupted before shard 1 was recorded
    image_shards.main(args)
    after = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in shards}
    assert after["shard-000000.tar"] == before["shard-000000.tar"]  # kept, not rewritten
    assert after["shard-000001.tar"][0] != before["shard-000001.tar"][0]  # redone ...
    assert after["shard-000001.tar"][1] == before["shard-000001.tar"][1]  # ... to the same bytes
    image_shards.main(args[:-4] + ["--shard-size", "3", "--workers", "1"])  # other settings: all redone
    assert [s.samples for s in read_manifest(out).shards] == [3]


def test_folder_bad_table_names_the_field(image_dir: Path, tmp_path: Path) -> None:
    """A row without the fields, a row that is not an object and a LLaVA file each get their one-line fix; a JSON
    array of caption rows (one line or many) is read as a table."""
    def run(name: str, text: str) -> Manifest:
        (tmp_path / name).write_text(text)
        return image_shards.main(["folder", "--images", str(image_dir), "--captions", str(tmp_path / name),
                                  "--out", str(tmp_path / "out" / name)])

    with pytest.raises(SystemExit, match="file / image"):
        run("caps.jsonl", json.dumps({"path": "rgb.jpg", "caption": "x"}) + "\n")
    with pytest.raises(SystemExit, match="row 1 is a JSON list, not an object"):
        run("caps.jsonl", json.dumps({"file": "rgb.jpg", "caption": "x"}) + "\n" + json.dumps([1, 2]) + "\n")
    llava = [{"id": "a", "image": "rgb.jpg", "conversations": [{"from": "human", "value": "<image>\nhi"}]}]
    with pytest.raises(SystemExit, match=r"row 0 is a LLaVA conversation.*image_shards llava --json"):
        run("llava.json", json.dumps(llava))
    rows = [{"file": n, "caption": f"picture {n}"} for n in GOOD]
    assert run("caps.json", json.dumps(rows)).num_samples == len(GOOD)
    assert run("indented.json", json.dumps(rows, indent=2)).num_samples == len(GOOD)


def test_llava_conversations(image_dir: Path, tmp_path: Path) -> None:
    entries = [
        {"id": "cap", "image": "rgb.jpg", "conversations": [
            {"from": "human", "value": "<image>\nDescribe briefly."}, {"from": "gpt", "value": "noise"}]},
        {"id": "multi", "image": "rgba.png", "conversations": [
            {"from": "human", "value": "What is this?\n<image>"}, {"from": "gpt", "value": "a picture"},
            {"from": "human", "value": "Sure?"}, {"from": "gpt", "value": "yes"}]},
        {"id": "text", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]},
        {"id": "two", "image": ["rgb.jpg", "palette.png"], "conversations": [
            {"from": "human", "value": "<image> vs <image>"}, {"from": "gpt", "value": "same"}]},
        {"id": "mismatch", "image": "rgb.jpg", "conversations": [
            {"from": "human", "value": "<image><image>"}, {"from": "gpt", "value": "?"}]},
        {"id": "corrupt", "image": "truncated.jpg", "conversations": [
            {"from": "human", "value": "<image>"}, {"from": "gpt", "value": "?"}]},
        {"id": "role", "conversations": [{"from": "robot", "value": "beep"}]},
    ]
    (tmp_path / "llava.json").write_text(json.dumps(entries))
    out = tmp_path / "out"
    m = image_shards.main(["llava", "--json", str(tmp_path / "llava.json"), "--images", str(image_dir),
                           "--out", str(out), "--workers", "1"])
    assert m.kind == "conversation" and m.num_samples == 4
    reasons = skipped(out)
    assert "2 <|image|> placeholders but 1 images" in reasons["mismatch"]
    assert "bad image" in reasons["corrupt"] and "turn 0" in reasons["role"]
    samples = {json.loads(s["json"])["id"]: s for s in read_all(out, "conversation")}
    multi = json.loads(samples["multi"]["json"])["messages"]
    assert [x["role"] for x in multi] == ["user", "assistant", "user", "assistant"]
    assert multi[0]["content"] == "What is this?\n<|image|>" and "0.png" in samples["multi"]
    assert not any(k[0].isdigit() for k in samples["text"])
    assert {"0.jpg", "1.png"} <= set(samples["two"])


def _img2dataset_tar(path: Path, images: dict[str, bytes]) -> None:
    """A tar laid out as img2dataset writes it: <key>.jpg, <key>.txt, <key>.json."""
    with tarfile.open(path, "w") as tf:
        for i, (name, data) in enumerate(images.items()):
            key = f"{i:09d}"
            for ext, blob in (("jpg", data), ("txt", f"caption of {name}".encode()),
                              ("json", json.dumps({"key": key, "status": "success"}).encode())):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(blob)
                tf.addfile(info, io.BytesIO(blob))


def test_img2dataset_index_in_place_and_rewrite(tmp_path: Path) -> None:
    imgs = awkward_images()
    src = tmp_path / "i2d"
    src.mkdir()
    _img2dataset_tar(src / "00000.tar", {n: imgs[n] for n in ("rgb.jpg", "truncated.jpg", "cmyk.jpg")})
    _img2dataset_tar(src / "00001.tar", {n: imgs[n] for n in ("rgba.png",)})
    before = (src / "00000.tar").read_bytes()
    m = image_shards.main(["img2dataset", "--input", str(src), "--workers", "1"])
    assert (src / "00000.tar").read_bytes() == before  # indexed as is
    assert [(s.name, s.samples) for s in m.shards] == [("00000.tar", 3), ("00001.tar", 1)]
    assert list(skipped(src)) == ["00000.tar:000000001"]
    # The bad sample stays in the tar: the stream yields all 4, the batcher will skip the bad one.
    assert len(read_all(src, "image-text")) == 4
    with pytest.raises(SystemExit):
        image_shards.main(["img2dataset", "--input", str(src), "--max-side", "8"])

    out = tmp_path / "rewritten"
    m = image_shards.main(["img2dataset", "--input", str(src), "--rewrite", "--out", str(out), "--workers", "1"])
    assert m.num_samples == 3
    assert [s["txt"].decode() for s in read_all(out, "image-text")] == [
        "caption of rgb.jpg", "caption of cmyk.jpg", "caption of rgba.png"]


def test_hf_dataset_saved_to_disk(tmp_path: Path) -> None:
    imgs = awkward_images()
    names = ["rgb.jpg", "gray16.png", "truncated.jpg", "palette.png"]
    features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")})
    ds = datasets.Dataset.from_dict(
        {"image": [{"bytes": imgs[n], "path": None} for n in names], "text": [f"about {n}" for n in names]},
        features=features)
    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "hf"))
    out = tmp_path / "out"
    m = image_shards.main(["hf", "--path", str(tmp_path / "hf"), "--out", str(out), "--workers", "1"])
    assert m.kind == "image-text" and m.num_samples == 3
    assert list(skipped(out)) == ["row 2"]
    assert [s["txt"].decode() for s in read_all(out, "image-text")] == [
        "about rgb.jpg", "about gray16.png", "about palette.png"]

    chats = datasets.Dataset.from_dict({
        "img": [{"bytes": imgs["rgb.jpg"], "path": None}],
        "conv": [[{"from": "human", "value": "<image>\nwhat?"}, {"from": "gpt", "value": "noise"}]],
    }, features=datasets.Features({"img": datasets.Image(), "conv": [{"from": datasets.Value("string"),
                                                                        "value": datasets.Value("string")}]}))
    chats.save_to_disk(str(tmp_path / "hf2"))
    m = image_shards.main(["hf", "--path", str(tmp_path / "hf2"), "--image-column", "img", "--text-column", "conv",
                           "--out", str(tmp_path / "out2"), "--workers", "1"])
    (s,) = read_all(tmp_path / "out2", "conversation")
    assert m.kind == "conversation" and json.loads(s["json"])["messages"][0]["content"] == "<|image|>\nwhat?"
    with pytest.raises(SystemExit, match="--text-column"):
        image_shards.main(["hf", "--path", str(tmp_path / "hf2"), "--image-column", "img", "--text-column", "caption",
                           "--out", str(out)])
