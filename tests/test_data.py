"""Data: manifest checks, ShardStream order/split/resume/corruption, token-row packing, text_shards.py."""

from __future__ import annotations

import gzip
import io
import json
import math
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from webdataset import TarWriter

from data_prep import text_shards
from data_prep.readers import iter_documents
from ghostvis.data import shards
from ghostvis.data import (DataError, Manifest, ShardInfo, ShardStream, TokenRowLoader, read_manifest,
                           token_bytes, write_manifest)


def write_token_shards(out: Path, docs: list[np.ndarray], per_shard: list[int], tokenizer, prefix="train") -> Path:
    """A text-tokens directory with the given documents split into shards of the given sizes."""
    out.mkdir(parents=True, exist_ok=True)
    assert sum(per_shard) == len(docs)
    shards, i = [], 0
    for s, n in enumerate(per_shard):
        name = f"{prefix}-{s:06d}.tar"
        with TarWriter(str(out / name), encoder=False, mtime=0) as w:
            for _ in range(n):
                buf = io.BytesIO()
                np.save(buf, docs[i].astype(np.uint16))
                w.write({"__key__": f"{i:06d}", "npy": buf.getvalue()})
                i += 1
        shards.append(ShardInfo(name, n))
    write_manifest(out, Manifest("text-tokens", shards, dtype="uint16",
                                 tokenizer={"fingerprint": tokenizer.fingerprint, "vocab_size": tokenizer.vocab_size}))
    return out


def make_docs(n: int, seed: int = 0, max_len: int = 40) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, size=int(rng.integers(0, max_len))) for _ in range(n)]


@pytest.fixture
def shard_dir(tmp_path, tiny_tokenizer) -> Path:
    return write_token_shards(tmp_path / "d", make_docs(47), [6, 5, 7, 6, 5, 6, 7, 5], tiny_tokenizer)


def keys(stream, n=None) -> list[str]:
    out = []
    for s in stream:
        out.append(s["__key__"])
        if n is not None and len(out) == n:
            break
    return out


# ---- manifest ------------------------------------------------------------------------------------


def test_manifest_roundtrip_and_errors(tmp_path, shard_dir, tiny_tokenizer):
    m = read_manifest(shard_dir, expected_kind="text-tokens", expected_tokenizer=tiny_tokenizer)
    assert m.num_samples == 47 and m.shards[2] == ShardInfo("train-000002.tar", 7)
    assert json.loads((shard_dir / "manifest.json").read_text())["num_samples"] == 47
    assert not list(shard_dir.glob(".manifest-*"))  # the temp file was renamed away

    with pytest.raises(DataError, match="does not exist"):
        read_manifest(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="is empty"):
        read_manifest(tmp_path / "empty")
    (tmp_path / "empty" / "x.tar").write_bytes(b"")
    with pytest.raises(DataError, match="no manifest.json"):
        read_manifest(tmp_path / "empty")
    with pytest.raises(DataError, match="'kind' is 'text-tokens' but this stage reads 'image-text'"):
        read_manifest(shard_dir, expected_kind="image-text")
    raw = json.loads((shard_dir / "manifest.json").read_text())
    (shard_dir / "manifest.json").write_text(json.dumps({**raw, "num_samples": 3}))
    with pytest.raises(DataError, match=r"manifest.json: field 'num_samples'"):
        read_manifest(shard_dir)
    (shard_dir / "manifest.json").write_text(json.dumps(raw))
    (shard_dir / "train-000003.tar").unlink()
    with pytest.raises(DataError, match="missing.*train-000003.tar"):
        read_manifest(shard_dir)


def test_mismatched_tokenizer_refused(shard_dir):
    with pytest.raises(DataError, match=r"made with tokenizer \w+, the run uses f00d.*rebuild with data_prep/"):
        TokenRowLoader(shard_dir, seq_len=8, batch_size=2, tokenizer="f00d", bos_id=1)


# ---- ShardStream ---------------------------------------------------------------------------------


def test_order_deterministic_from_seed(shard_dir):
    n = 47
    a = keys(ShardStream(shard_dir, seed=3), 3 * n)
    assert a == keys(ShardStream(shard_dir, seed=3), 3 * n)
    assert a != keys(ShardStream(shard_dir, seed=4), 3 * n)
    epochs = [a[i * n:(i + 1) * n] for i in range(3)]
    assert all(sorted(e) == [f"{i:06d}" for i in range(n)] for e in epochs)  # each epoch = every sample once
    assert epochs[0] != epochs[1]  # shard order is re-drawn per epoch
    fixed = keys(ShardStream(shard_dir, seed=3, loop=False, shuffle=False))
    assert fixed == [f"{i:06d}" for i in range(n)]


@pytest.mark.parametrize("world", [2, 3])
def test_rank_split_disjoint_and_complete(shard_dir, world):
    per_rank = [keys(ShardStream(shard_dir, seed=1, rank=r, world_size=world, loop=False)) for r in range(world)]
    flat = [k for ks in per_rank for k in ks]
    assert len(flat) == len(set(flat)) == 47
    # Each round of `world` global indices gives one to every rank, in a drawn order: every rank reads its
    # samples in the one-rank order, the ranks stay within one sample of each other, and the rounds' draws vary.
    order = keys(ShardStream(shard_dir, seed=1, loop=False))
    rounds = [order[i:i + world] for i in range(0, 47, world)]
    assert all(sorted(ks[i] for ks in per_rank if i < len(ks)) == sorted(rnd) for i, rnd in enumerate(rounds))
    assert len({tuple(rnd.index(per_rank[r][i]) for r in range(world)) for i, rnd in enumerate(rounds[:-1])}) > 1


def test_rank_split_across_windows_resumes_exactly_and_counts_corrupt(shard_dir, monkeypatch):
    """Windows of 2 rounds (6 indices for 3 readers): the split's window arithmetic and its cache are crossed
    many times an epoch. Ranks stay disjoint and complete in every epoch, each resumes exactly from any
    position, and a damaged shard's lost samples are counted once, by the readers that owned them."""
    monkeypatch.setattr(shards, "SPLIT_WINDOW", 2)
    world = 3
    read = [[(x["__epoch__"], x["__key__"]) for x, _ in zip(ShardStream(shard_dir, seed=2, rank=r, world_size=world),
                                                             range(40))] for r in range(world)]
    for epoch in range(2):  # 47 samples an epoch: 15 or 16 to each rank
        flat = [k for ks in read for e, k in ks if e == epoch]
        assert len(flat) == len(set(flat)) == 47
    straight = [k for _, k in read[1]]
    for k in (1, 5, 11, 16, 17, 30):
        s = ShardStream(shard_dir, seed=2, rank=1, world_size=world)
        assert keys(s, k) == straight[:k]
        resumed = ShardStream(shard_dir, seed=2, rank=1, world_size=world)
        resumed.load_state_dict(json.loads(json.dumps(s.state_dict())))
        assert keys(resumed, 40 - k) == straight[k:]
    lost = truncate_middle(shard_dir / "train-000002.tar")
    assert lost > 0
    streams = [ShardStream(shard_dir, seed=2, rank=r, world_size=world, loop=False, max_corrupt_fraction=0.5)
               for r in range(world)]
    got = [keys(s) for s in streams]
    assert sum(len(g) for g in got) == 47 - lost and sum(s.stats["seen"] for s in streams) == 47
    for r, s in enumerate(streams):  # each rank counts the lost samples that were its own
        assert s.stats["corrupt"] == len({k for e, k in read[r] if e == 0} - set(got[r]))


def _bytes_read() -> int:
    return int(next(line for line in Path("/proc/self/io").read_text().splitlines() if line.startswith("rchar:")).split()[1])


@pytest.mark.skipif(not Path("/proc/self/io").exists(), reason="byte counts from Linux /proc")
def test_each_rank_reads_only_its_share_of_the_bytes(tmp_path, tiny_tokenizer):
    """Other ranks' samples are seeked over, not read: I/O per rank falls with the world size."""
    big = [np.random.default_rng(i).integers(0, 256, size=60_000) for i in range(40)]  # ~120 KB a sample
    data = write_token_shards(tmp_path / "big", big, [20, 20], tiny_tokenizer)
    total = sum(f.stat().st_size for f in data.glob("*.tar"))
    before = _bytes_read()
    got = keys(ShardStream(data, seed=0, rank=1, world_size=4, loop=False))
    read = _bytes_read() - before
    assert len(got) == 10
    assert read < 0.35 * total, f"rank 1 of 4 read {read} of {total} bytes"  # was all of them: 0.998


def test_stream_resume_exact_across_epochs(shard_dir):
    straight = keys(ShardStream(shard_dir, seed=5, rank=1, world_size=2), 60)
    for k in (0, 1, 9, 23, 24, 40):  # 23-24: around the end of epoch 0 (24 samples for rank 1)
        s = ShardStream(shard_dir, seed=5, rank=1, world_size=2)
        assert keys(s, k) == straight[:k] if k else True
        state = json.loads(json.dumps(s.state_dict()))
        resumed = ShardStream(shard_dir, seed=5, rank=1, world_size=2)
        resumed.load_state_dict(state)
        assert keys(resumed, 60 - k) == straight[k:]
    with pytest.raises(DataError, match="seed 5, this run uses 6"):
        ShardStream(shard_dir, seed=6).load_state_dict(state)


def truncate_middle(path: Path) -> int:
    """Cut a tar in the middle of a member's data; returns how many samples are lost."""
    with tarfile.open(path) as tf:
        members = tf.getmembers()
    cut = members[len(members) // 2].offset_data + 3
    path.write_bytes(path.read_bytes()[:cut])
    return sum(1 for m in members if m.offset_data + m.size > cut)


def test_corrupt_shard_skipped_and_counted(shard_dir):
    lost = truncate_middle(shard_dir / "train-000002.tar")  # 7 samples
    assert 0 < lost < 7
    s = ShardStream(shard_dir, seed=0, loop=False, max_corrupt_fraction=0.2)
    got = keys(s)
    assert len(got) == 47 - lost and len(set(got)) == len(got)
    assert s.stats == {"seen": 47, "corrupt": lost, "by_shard": {"train-000002.tar": lost},
                       "by_reason": {"unreadable": lost}}
    # A shard that can't be opened at all counts every sample.
    (shard_dir / "train-000005.tar").write_bytes(b"not a tar" * 100)
    s = ShardStream(shard_dir, seed=0, loop=False, max_corrupt_fraction=0.5)
    assert len(keys(s)) == 47 - lost - 6 and s.stats["by_shard"]["train-000005.tar"] == 6


def test_manifest_miscounting_an_intact_shard_is_refused_either_way(shard_dir):
    """Positions are defined by the manifest's counts: a shard holding more or fewer samples than listed is
    refused, never silently cut or padded; a tar cut exactly at a member boundary is damage, not a miscount."""
    manifest = json.loads((shard_dir / "manifest.json").read_text())
    for delta, which in ((-1, "more"), (1, "fewer")):
        changed = json.loads(json.dumps(manifest))
        changed["shards"][2]["samples"] += delta
        changed["num_samples"] += delta
        (shard_dir / "manifest.json").write_text(json.dumps(changed))
        with pytest.raises(DataError, match=f"train-000002.tar holds {which} samples than the .*manifest.json"):
            keys(ShardStream(shard_dir, seed=0, loop=False, shuffle=False, max_corrupt_fraction=1.0))
    (shard_dir / "manifest.json").write_text(json.dumps(manifest))
    path = shard_dir / "train-000002.tar"
    with tarfile.open(path) as tf:
        members = tf.getmembers()
    last = next(m for m in members if m.name.split(".")[0] == members[-1].name.split(".")[0])
    path.write_bytes(path.read_bytes()[:last.offset])  # cut right before the last sample's first header
    s = ShardStream(shard_dir, seed=0, loop=False, shuffle=False, max_corrupt_fraction=1.0)
    assert len(keys(s)) == 46 and s.stats["by_reason"] == {"unreadable": 1}


def test_gzip_compressed_shards_still_read(shard_dir):
    """A shard gzipped under its .tar name (some tools write them) is read whole, just not seeked."""
    path = shard_dir / "train-000001.tar"
    path.write_bytes(gzip.compress(path.read_bytes()))
    s = ShardStream(shard_dir, seed=0, loop=False)
    assert len(keys(s)) == 47 and s.stats["corrupt"] == 0


def test_fail_past_corrupt_fraction(shard_dir):
    truncate_middle(shard_dir / "train-000002.tar")
    with pytest.raises(DataError, match=r"corrupt .*max_corrupt_fraction 1\.0%.*train-000002\.tar"):
        keys(ShardStream(shard_dir, seed=0, max_corrupt_fraction=0.01, min_count=10))
    # min_count delays the check, the epoch end still applies it.
    with pytest.raises(DataError, match="train-000002.tar"):
        keys(ShardStream(shard_dir, seed=0, loop=False, max_corrupt_fraction=0.01, min_count=10**6))


def test_bad_samples_marked_and_validated(tmp_path, tiny_tokenizer):
    docs = make_docs(12)
    d = write_token_shards(tmp_path / "d", docs, [6, 6], tiny_tokenizer)
    # Replace one sample's npy with garbage: the loader decodes it, fails, and marks it corrupt.
    with TarWriter(str(d / "train-000001.tar"), encoder=False, mtime=0) as w:
        for i in range(6, 12):
            buf = io.BytesIO()
            np.save(buf, docs[i].astype(np.uint16))
            w.write({"__key__": f"{i:06d}", "npy": b"garbage" if i == 8 else buf.getvalue()})
    loader = TokenRowLoader(d, seq_len=1000, batch_size=1, tokenizer=tiny_tokenizer, eval_mode=True,
                            max_corrupt_fraction=0.5)
    (inputs, targets), = list(loader)
    assert loader.stats["corrupt"] == 1 and loader.stats["by_shard"] == {"train-000001.tar": 1}
    n_tokens = sum(len(x) + 1 for i, x in enumerate(docs) if i != 8)
    assert int((targets >= 0).sum()) == n_tokens - 1
    s = ShardStream(d, seed=0, loop=False, validate=lambda smp: smp["__key__"] != "000003",
                    max_corrupt_fraction=0.5)
    assert "000003" not in keys(s) and s.stats["corrupt"] == 1


# ---- TokenRowLoader ------------------------------------------------------------------------------


def test_rows_pack_documents_with_bos(shard_dir, tiny_tokenizer):
    bos = tiny_tokenizer.bos_token_id
    T, B = 16, 3
    loader = TokenRowLoader(shard_dir, seq_len=T, batch_size=B, tokenizer=tiny_tokenizer, eval_mode=True)
    batches = list(loader)
    assert len(list(loader)) == len(batches)  # eval passes restart
    docs = make_docs(47)
    stream = np.concatenate([np.concatenate([[bos], d]) for d in docs])  # manifest order in eval mode
    inputs = torch.cat([x for x, _ in batches])
    targets = torch.cat([y for _, y in batches])
    assert inputs.shape[1] == T and inputs.dtype == torch.long and inputs.shape[0] == B * len(batches)
    n_rows = math.ceil((len(stream) - 1) / T)
    assert inputs.shape[0] - n_rows < B  # only the last batch is padded
    # Row r holds stream[r*T : r*T + T + 1]: inputs / targets are that shifted by one.
    for r in range(n_rows):
        seg = stream[r * T: r * T + T + 1]
        assert inputs[r, :len(seg) - 1].tolist() == seg[:-1].tolist()
        assert targets[r, :len(seg) - 1].tolist() == seg[1:].tolist()
    assert int((targets >= 0).sum()) == len(stream) - 1  # every token after the first is a target once
    assert int((targets == bos).sum()) == 46  # each document start (but the first) is predicted as BOS
    assert targets[-1, -1] == -1


def test_exact_resume_mid_document(tmp_path, tiny_tokenizer):
    d = write_token_shards(tmp_path / "d", make_docs(30, seed=2, max_len=90), [8, 7, 8, 7], tiny_tokenizer)
    kw = dict(seq_len=12, batch_size=2, rank=1, world_size=2, seed=7, tokenizer=tiny_tokenizer)
    straight = [torch.cat(b) for _, b in zip(range(40), TokenRowLoader(d, **kw))]  # > 1 epoch per rank
    offsets = []
    for k in (1, 5, 17, 33):
        loader = TokenRowLoader(d, **kw)
        for _, _ in zip(range(k), loader):
            pass
        state = json.loads(json.dumps(loader.state_dict()))  # plain JSON: no tensors in the state
        offsets.append(state["offset"])
        resumed = TokenRowLoader(d, **kw)
        resumed.load_state_dict(state)
        again = [torch.cat(b) for _, b in zip(range(40 - k), resumed)]
        assert all(torch.equal(a, b) for a, b in zip(again, straight[k:])), f"resume after {k} batches differs"
    assert any(o > 0 for o in offsets)  # some saves were inside a document


def test_token_bytes_counts_utf8(tiny_tokenizer):
    tb = token_bytes(tiny_tokenizer)
    text = "Il y a un carré bleu en bas à droite. 天空"
    assert int(tb[tiny_tokenizer.encode(text)].sum()) == len(text.encode())
    assert tb[tiny_tokenizer.bos_token_id] == 0 and tb.shape == (tiny_tokenizer.vocab_size,)


# ---- data_prep -----------------------------------------------------------------------------------


def make_inputs(root: Path) -> tuple[list[str], list[Path]]:
    """A .txt folder (one file with invalid UTF-8), a .jsonl (bad line, empty doc) and a .parquet."""
    (root / "txt").mkdir(parents=True)
    texts = [f"Plain text document number {i}. A red circle is left of a blue square." for i in range(4)]
    for i, t in enumerate(texts):
        (root / "txt" / f"{i}.txt").write_text(t)
    (root / "txt" / "4.txt").write_bytes(b"caf\xe9 latin-1 bytes \xff\xfe here")
    texts.append("caf\ufffd latin-1 bytes \ufffd\ufffd here")
    (root / "txt" / "notes.md").write_text("ignored")
    jl = [f"JSON line document {i}: how many triangles? 3" for i in range(5)]
    lines = [json.dumps({"text": t, "id": i}) for i, t in enumerate(jl)]
    lines.insert(2, "{not json")
    lines.insert(3, json.dumps({"text": "   "}))
    (root / "docs.jsonl").write_text("\n".join(lines) + "\n")
    pq_texts = [f"Parquet row {i} says hello" for i in range(6)]
    pq.write_table(pa.table({"text": pq_texts, "n": list(range(6))}), root / "rows.parquet")
    return texts + jl + pq_texts, [root / "txt", root / "docs.jsonl", root / "rows.parquet"]


def test_text_shards_end_to_end(tmp_path, tiny_tokenizer, tiny_tokenizer_dir, capsys):
    texts, inputs = make_inputs(tmp_path / "in")
    out = tmp_path / "out"
    argv = ["--input", *map(str, inputs), "--tokenizer", str(tiny_tokenizer_dir), "--out", str(out),
            "--docs-per-shard", "4", "--val-docs", "3"]
    summary = text_shards.main(argv + ["--workers", "2"])
    assert summary["docs"] == len(texts) == 16 and summary["val_docs"] == 3
    assert summary["skipped_docs"] == 2 and summary["invalid_utf8_bytes"] == 3
    assert summary["tokens"] == sum(len(tiny_tokenizer.encode(t)) for t in texts)
    assert "16 docs (3 val)" in capsys.readouterr().out
    train = read_manifest(out / "train", expected_kind="text-tokens", expected_tokenizer=tiny_tokenizer)
    val = read_manifest(out / "val")
    assert [s.samples for s in train.shards] == [4, 4, 4, 1] and val.num_samples == 3
    assert train.dtype == "uint16" and train.shards[0].name == "train-000000.tar"
    # Documents come back in order, as the tokenizer's ids, with BOS in front.
    loader = TokenRowLoader(out / "train", seq_len=4096, batch_size=1, tokenizer=tiny_tokenizer, eval_mode=True)
    (x, y), = list(loader)
    want = [i for t in texts[3:] for i in [tiny_tokenizer.bos_token_id] + tiny_tokenizer.encode(t)]
    assert x[0, :len(want)].tolist() == want
    # A re-run reuses every complete shard and writes the same manifests; other settings are refused.
    before = (out / "train" / "manifest.json").read_text()
    (out / "train" / "train-000003.tar").unlink()
    again = text_shards.main(argv + ["--workers", "1"])
    assert again["reused_shards"] == 4 and again["tokens"] == summary["tokens"]
    assert (out / "train" / "manifest.json").read_text() == before
    with pytest.raises(SystemExit, match="docs_per_shard"):
        text_shards.main(argv[:-4] + ["--docs-per-shard", "5", "--workers", "1"])


def test_text_shards_bad_arguments(tmp_path, tiny_tokenizer_dir, capsys):
    with pytest.raises(SystemExit):
        text_shards.main(["--input", str(tmp_path / "missing.txt"), "--tokenizer", str(tiny_tokenizer_dir),
                          "--out", str(tmp_path / "o")])
    assert "--input" in capsys.readouterr().err
    (tmp_path / "a.txt").write_text("hello")
    with pytest.raises(SystemExit):
        text_shards.main(["--input", str(tmp_path / "a.txt"), "--tokenizer", str(tmp_path / "tok"),
                          "--out", str(tmp_path / "o")])
    assert "--tokenizer" in capsys.readouterr().err


def test_iter_documents_formats(tmp_path):
    datasets = pytest.importorskip("datasets")
    hf = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"body": ["hf one", "hf two"]}),
                               "test": datasets.Dataset.from_dict({"body": ["held out"]})})
    hf.save_to_disk(str(tmp_path / "hf"))
    with gzip.open(tmp_path / "z.jsonl.gz", "wt") as f:
        f.write(json.dumps({"body": "gz doc"}) + "\n" + json.dumps("bare string doc") + "\n")
    (tmp_path / "shards").mkdir()
    with TarWriter(str(tmp_path / "shards" / "t-000000.tar"), encoder=False) as w:
        w.write({"__key__": "a", "txt": b"shard doc", "json": b"{}"})
    write_manifest(tmp_path / "shards", Manifest("text", [ShardInfo("t-000000.tar", 1)]))
    stats: dict[str, int] = {}
    docs = list(iter_documents([tmp_path / "hf", tmp_path / "z.jsonl.gz", tmp_path / "shards"],
                               text_field="body", stats=stats))
    assert docs == ["hf one", "hf two", "gz doc", "bare string doc", "shard doc"]
    assert stats["files"] == 3 and stats["docs"] == 5
    assert list(iter_documents(tmp_path / "hf" / "test", text_field="body")) == ["held out"]
    assert list(iter_documents([tmp_path / "hf"], text_field="body", max_chars=8)) == ["hf one", "hf"]
    with pytest.raises(ValueError, match="no column 'text'.*--text-field"):
        list(iter_documents(tmp_path / "hf"))
    (tmp_path / "other.jsonl").write_text(json.dumps({"body": "x", "id": 1}) + "\n")
    with pytest.raises(ValueError, match=r"no record has a string field 'text' \(first record has: \['body', 'id'\]"):
        list(iter_documents(tmp_path / "other.jsonl"))
