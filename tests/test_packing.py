"""--pack: the first-fit (read order) packer, packed batches from real shards, a real tiny VLM's packed loss and
gradients against the unpacked batch of the same samples, no attention across sample boundaries, exact
resume through the training loop with packing on, and the one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import REPO, bench_module, parse, write_shards

from data_prep import synth
from ghostvis.config import get_preset
from ghostvis.data.multimodal import CaptionBatches, ConversationBatches, Row, join_rows
from ghostvis.data.manifest import DataError
from ghostvis.data.packing import PackError, pack_rows
from ghostvis.data.shards import ShardStream
from ghostvis.model.attention import document_positions
from ghostvis.model.vlm import VLM
from ghostvis.train import loop
from ghostvis.train.engine import ConfigError
from ghostvis.vision.transforms import image_transform

# fp32 on CPU: the packed path (masked SDPA) and the unpacked one (causal SDPA) sum the same terms in
# another order, so they agree to rounding; a sample that saw another sample would be off by ~1e-1
LOSS_RTOL, GRAD_RTOL = 1e-5, 1e-4


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth")
    synth.generate(out, seed=3, num_captions=64, num_vqa=64, num_val=8, num_test=4, num_arith=16,
                   num_arith_test=4, num_text_docs=2, shard_size=16)
    return out


@pytest.fixture(scope="module")
def vlm(tiny_tokenizer) -> VLM:
    torch.manual_seed(0)
    cfg, vcfg = get_preset("vlm_tiny", vocab_size=tiny_tokenizer.vocab_size,
                           image_token_id=tiny_tokenizer.image_token_id)
    return VLM(cfg, vcfg).float()


def batcher(kind: type, d: Path, tok, model: VLM, **kw):
    src = ShardStream(d, seed=0, loop=kw.pop("loop", False), shuffle=False)
    return kind(src, tok, batch_size=kw.pop("batch_size", 4), max_len=kw.pop("max_len", 96),
                num_vision_tokens=model.num_vision_tokens, transform=image_transform(model.vision_config), **kw)


def test_pack_rows_bounds_determinism_and_errors() -> None:
    import random
    rng = random.Random(0)
    lengths = [rng.randint(1, 60) for _ in range(200)]
    images = [rng.randint(0, 3) for _ in range(200)]
    rows = pack_rows(lengths, images, 64, max_images=4)
    assert sorted(i for r in rows for i in r) == list(range(200))  # every sample once, none split
    assert all(sum(lengths[i] for i in r) <= 64 and sum(images[i] for i in r) <= 4 for r in rows)
    assert all(r == sorted(r) for r in rows) and rows == pack_rows(lengths, images, 64, max_images=4)
    assert len(rows) <= 1.25 * sum(lengths) / 64 + 1  # first fit wastes little
    # read order, not longest first: rows open in the stream's order, each sample at its turn, so a row mixes
    # what the stream gives (first-fit decreasing left the shortest samples to rows of their own)
    firsts = [r[0] for r in rows]
    assert firsts[0] == 0 and firsts == sorted(firsts)

    def room_for(i: int, row: list[int]) -> bool:  # whether `row`, as it stood at sample i's turn, had room
        before = [j for j in row if j < i]
        return sum(lengths[j] for j in before) + lengths[i] <= 64 and sum(images[j] for j in before) + images[i] <= 4

    for i in range(200):
        home = next(k for k, r in enumerate(rows) if i in r)
        assert not any(room_for(i, r) for r in rows[:home])  # no row opened before its own had room
    with pytest.raises(PackError, match=r"^a sample of 65 tokens is longer than a packed row \(64 tokens"):
        pack_rows([3, 65], [0, 0], 64)
    with pytest.raises(PackError, match="a sample with 3 images does not fit .* raise --pack-images to 3"):
        pack_rows([3, 5], [0, 3], 64, max_images=2)
    ids = torch.tensor([[0, 0, 0, 1, 1, 2], [0, 1, 1, 1, 1, 1]])
    assert document_positions(ids).tolist() == [[0, 1, 2, 0, 1, 0], [0, 0, 1, 2, 3, 4]]


def packed_and_unpacked(kind: type, d: Path, tok, model: VLM, n: int, max_len: int) -> tuple[dict, dict]:
    """The same n samples as one unpacked batch and as one packed batch (rows of max_len)."""
    plain = batcher(kind, d, tok, model, max_len=max_len, batch_size=n)
    rows = plain._read_rows(iter(plain.source))[0][:n]
    packer = batcher(kind, d, tok, model, max_len=max_len, batch_size=n, pack=True)
    (packed_rows,) = packer._arrange(rows)
    assert len(packed_rows) < n  # samples really share rows
    return plain.collate(rows), packer.collate(packed_rows)


def loss_and_grads(model: VLM, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad()
    kw = {k: batch[k] for k in ("pixel_values", "document_ids") if k in batch}
    loss = model(batch["input_ids"], batch["targets"], **kw)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kind,data", [(CaptionBatches, "captions"), (ConversationBatches, "vqa")])
def test_packed_loss_and_gradients_equal_unpacked(synth_dir, tiny_tokenizer, vlm, kind, data) -> None:
    plain, packed = packed_and_unpacked(kind, synth_dir / data / "train", tiny_tokenizer, vlm, 12, 96)
    assert packed["input_ids"].shape[1] == 96 and packed["num_tokens"] == plain["num_tokens"]
    assert packed["num_loss_tokens"] == plain["num_loss_tokens"]  # the loop's token weights are the same
    counted = [sorted(b["targets"][b["targets"] >= 0].tolist()) for b in (plain, packed)]
    assert counted[0] == counted[1]  # the same targets carry loss, none lost or added at a boundary
    loss_u, grads_u = loss_and_grads(vlm, plain)
    loss_p, grads_p = loss_and_grads(vlm, packed)
    assert loss_p.item() == pytest.approx(loss_u.item(), rel=LOSS_RTOL)
    assert grads_p.keys() == grads_u.keys() and any(n.startswith("vision.") for n in grads_u)
    for name, g in grads_u.items():
        err = ((grads_p[name] - g).norm() / g.norm().clamp(min=1e-12)).item()
        assert err < GRAD_RTOL, f"{name}: relative gradient error {err:.2e}"


def test_activation_checkpointing_keeps_documents(synth_dir, tiny_tokenizer, vlm) -> None:
    """Recomputed blocks get the same document mask and positions: the same loss and gradients."""
    _, packed = packed_and_unpacked(ConversationBatches, synth_dir / "vqa" / "train", tiny_tokenizer, vlm, 8, 96)
    vlm.train()
    loss, grads = loss_and_grads(vlm, packed)
    vlm.llm.set_activation_checkpointing(True)
    try:
        loss_ckpt, grads_ckpt = loss_and_grads(vlm, packed)
    finally:
        vlm.llm.set_activation_checkpointing(False)
    assert loss_ckpt.item() == pytest.approx(loss.item(), rel=LOSS_RTOL)
    assert all(torch.allclose(grads_ckpt[n], g, rtol=GRAD_RTOL, atol=1e-7) for n, g in grads.items())


def test_no_attention_across_sample_boundaries(synth_dir, tiny_tokenizer, vlm) -> None:
    """Perturb one sample of a packed row (its tokens and its image): the other samples' logits don't move."""
    _, packed = packed_and_unpacked(CaptionBatches, synth_dir / "captions" / "train", tiny_tokenizer, vlm, 12, 160)
    docs = packed["document_ids"]
    row = int(torch.argmax(docs.max(dim=1).values))  # the row with the most samples
    assert docs[row].max() >= 3  # three samples (and padding, or a fourth): one before and one after the perturbed
    inputs = {k: packed[k][row:row + 1] for k in ("input_ids", "document_ids")}
    images_before = int((packed["input_ids"][:row] == tiny_tokenizer.image_token_id).sum()) // vlm.num_vision_tokens
    n_img = int((inputs["input_ids"] == tiny_tokenizer.image_token_id).sum()) // vlm.num_vision_tokens
    pixels = packed["pixel_values"][images_before:images_before + n_img].clone()
    with torch.no_grad():
        before = vlm(inputs["input_ids"], pixel_values=pixels, document_ids=inputs["document_ids"])
        ids = inputs["input_ids"].clone()
        target = docs[row:row + 1] == 1  # the second sample: its caption tokens and its image change
        text = target & (ids != tiny_tokenizer.image_token_id) & (ids != tiny_tokenizer.bos_token_id)
        ids[text] = (ids[text] + 7) % 200
        pixels[1] = 255 - pixels[1]
        after = vlm(ids, pixel_values=pixels, document_ids=inputs["document_ids"])
    moved = (after - before).abs().amax(dim=-1)[0]
    assert moved[target[0]].max() > 1e-2  # the perturbed sample did change
    assert moved[~target[0]].max() < 1e-5  # nothing else did (before and after, after and before it)


def test_packed_batches_resume_exactly_and_bound_images(synth_dir, tiny_tokenizer, vlm) -> None:
    mix = synth_dir / "vqa" / "train"
    data = batcher(ConversationBatches, mix, tiny_tokenizer, vlm, loop=True, pack=True, batch_size=2, max_len=128,
                   pack_images=3)
    it = iter(data)
    first = [next(it) for _ in range(5)]
    state = json.loads(json.dumps(data.state_dict()))  # what a checkpoint stores
    expected = [next(it) for _ in range(12)]  # across a window's end
    resumed = batcher(ConversationBatches, mix, tiny_tokenizer, vlm, loop=True, pack=True, batch_size=2,
                      max_len=128, pack_images=3)
    resumed.load_state_dict(state)
    got = [b for b, _ in zip(resumed, range(12))]
    for a, b in zip(expected, got):
        assert all(torch.equal(a[k], b[k]) for k in ("input_ids", "targets", "document_ids", "pixel_values"))
    for b in first + expected:
        assert (b["pixel_values"].shape[0] <= 3 * b["input_ids"].shape[0]
                and (b["document_ids"].amax(dim=1) >= 1).any())  # several samples a row, at most 3 images a row


def test_resume_inside_a_window_keeps_its_cut(synth_dir, tiny_tokenizer, vlm) -> None:
    """A position inside a packing window (or a length group) names a batch of that cut: resuming it with
    --pack switched, or another --micro-batch (packed: --seq-len, --pack-images), is refused with the fix;
    between groups, and from states saved before these were stored, it resumes."""
    mix = synth_dir / "vqa" / "train"

    def make(**kw) -> ConversationBatches:
        return batcher(ConversationBatches, mix, tiny_tokenizer, vlm, **{"batch_size": 2, "max_len": 128, **kw})

    def state_after(n: int, **kw) -> dict:
        data = make(loop=True, **kw)
        it = iter(data)
        for _ in range(n):
            next(it)
        return json.loads(json.dumps(data.state_dict()))

    packed, grouped = state_after(1, pack=True), state_after(1, group_batches=2)
    assert packed["emitted"] and grouped["emitted"]
    with pytest.raises(DataError, match=r"saved with --pack.*\(add --pack\)"):
        make(group_batches=2).load_state_dict(packed)
    with pytest.raises(DataError, match=r"saved without --pack.*\(drop --pack\)"):
        make(pack=True).load_state_dict(grouped)
    for changed, fix in [({"batch_size": 3}, "--micro-batch 2"), ({"max_len": 96}, "--seq-len 128"),
                         ({"pack_images": 1}, "--pack-images 0")]:
        with pytest.raises(DataError, match=f"cut with {fix}; resume with {fix} "):
            make(pack=True, **changed).load_state_dict(packed)
    for changed, fix in [({"batch_size": 3}, "--micro-batch 2"), ({"max_len": 96}, "--seq-len 128")]:
        with pytest.raises(DataError, match=f"cut with {fix}; resume with {fix} "):  # rows sort by their cut length
            make(group_batches=2, **changed).load_state_dict(grouped)
    make(group_batches=2).load_state_dict(grouped)
    make(pack=True).load_state_dict(packed)
    between = state_after(2, group_batches=2)
    make(pack=True, batch_size=3, max_len=96).load_state_dict(between)
    unknown = {k: v for k, v in packed.items() if k not in ("pack", "cut")}
    make(pack=True, batch_size=3).load_state_dict(unknown)


def test_packed_batches_mix_row_lengths(synth_dir, tiny_tokenizer, vlm) -> None:
    """Rows of long samples and rows of short ones come out of a window side by side; cut in that order, a
    batch held one kind only (training on a GPU saw runs of steps of one caption length). Most batches of a
    window now mix them, and the window is arranged the same way again (exact resume)."""
    packer = batcher(CaptionBatches, synth_dir / "captions" / "train", tiny_tokenizer, vlm, max_len=64,
                     batch_size=4, pack=True)
    image = torch.zeros(3, 8, 8, dtype=torch.uint8)
    rows = ([Row([i] * 60, [1] * 60, [image]) for i in range(24)]
            + [Row([100 + i] * 10, [1] * 10, [image]) for i in range(60)])  # distinct ids: the order is checked
    batches = packer._arrange(rows)
    kinds = [{len(r.docs) > 1 for r in b} for b in batches]
    assert sum(len(b) for b in batches) == 24 + 10  # 24 one-sample rows, 60 short samples six to a row
    assert sum(k == {True, False} for k in kinds) >= len(batches) // 2  # most batches hold both kinds
    assert [[r.ids for r in b] for b in packer._arrange(rows)] == [[r.ids for r in b] for b in batches]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU: the packed kernels other than sdpa_mask")
def test_packed_kernel_on_cuda_matches_the_masked_one(synth_dir, tiny_tokenizer) -> None:
    """The packed kernel `select_attention` picks on CUDA (flex where no FlashAttention varlen is installed), in
    bf16 on real packed batches (one of them a window's short last batch), against the boolean-mask kernel:
    its loss and gradients are as far from fp32 as the mask kernel's own in bf16."""
    from ghostvis.model import attention
    torch.manual_seed(0)
    cfg, vcfg = get_preset("vlm_tiny", vocab_size=tiny_tokenizer.vocab_size,
                           image_token_id=tiny_tokenizer.image_token_id)
    model = VLM(cfg, vcfg).cuda()
    choice = attention.select_attention("auto", "cuda", torch.bfloat16, cfg.head_dim, packed="auto")
    packer = batcher(CaptionBatches, synth_dir / "captions" / "train", tiny_tokenizer, model, max_len=256,
                     batch_size=3, pack=True, loop=True, device="cuda")

    def run(batch: dict, kernel: str, bf16: bool) -> tuple[float, torch.Tensor]:
        attention._packed = kernel
        model.zero_grad(set_to_none=True)
        with torch.autocast("cuda", torch.bfloat16, enabled=bf16):
            loss = model(batch["input_ids"], batch["targets"], pixel_values=batch["pixel_values"],
                         document_ids=batch["document_ids"])
        loss.backward()
        return loss.item(), torch.cat([p.grad.flatten().float() for p in model.parameters() if p.grad is not None])

    try:
        for batch, _ in zip(packer, range(6)):
            (lk, gk), (lm, gm), (l32, g32) = (run(batch, choice.packed, True), run(batch, "sdpa_mask", True),
                                              run(batch, "sdpa_mask", False))
            err = [((g - g32).norm() / g32.norm()).item() for g in (gk, gm)]
            assert abs(lk - l32) <= 2 * abs(lm - l32) + 2e-3, (choice.packed, lk, lm, l32)
            assert err[0] <= 1.5 * err[1] + 1e-3, (choice.packed, err)
    finally:
        attention._packed = attention._selected = None  # later tests in this process choose their own


def test_sample_with_more_images_than_a_row_is_one_line_error(tmp_path, tiny_tokenizer, vlm) -> None:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (20, 12), (255, 0, 0)).save(buf, format="PNG")
    record = {"messages": [{"role": "user", "content": "<|image|> or <|image|>?"},
                           {"role": "assistant", "content": "the first"}]}
    d = write_shards(tmp_path / "two", "conversation", [{"__key__": "two", "json": json.dumps(record).encode(),
                                                          "0.png": buf.getvalue(), "1.png": buf.getvalue()}])
    data = batcher(ConversationBatches, d, tiny_tokenizer, vlm, pack=True, pack_images=1, max_len=128)
    with pytest.raises(PackError, match=r"^a sample with 2 images does not fit a packed row of at most 1 images; "
                                        r"raise --pack-images to 2 or more \(0 = no bound\)$"):
        next(iter(data))


def test_training_with_pack_resumes_exactly(synth_dir, tiny_tokenizer_dir, tmp_path, world1) -> None:
    """sft with --pack through the loop (real DeepSpeed engine, ZeRO-2 on CPU): stopped at step 2 mid-window and
    resumed from its checkpoint, the same losses as a straight run; validation bpb runs on packed rows too."""
    mix = tmp_path / "mix"
    mix.mkdir()
    (mix / "mixture.json").write_text(json.dumps({"datasets": [{"dir": str(synth_dir / "vqa"), "weight": 3},
                                                               {"dir": str(synth_dir / "arith"), "weight": 1}]}))

    def run(out: Path, *extra: str) -> list[dict]:
        loop.run(parse("--stage", "sft", "--model", "vlm_tiny", "--data", mix, "--tokenizer", tiny_tokenizer_dir,
                       "--pack", "--pack-images", "4", "--micro-batch", "2", "--seq-len", "128", "--steps", "4",
                       "--data-workers", "0", "--out", out, "--ds_config", REPO / "ds_configs" / "zero2.json",
                       "--eval-every", "2", "--eval-batches", "2", "--warmup", "1", "--lr", "3e-3", *extra))
        return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]

    straight = run(tmp_path / "straight", "--save-every", "0")
    run(tmp_path / "resumed", "--save-every", "2", "--stop-at", "2")
    resumed = run(tmp_path / "resumed", "--save-every", "2")
    assert [r["loss"] for r in resumed] == [r["loss"] for r in straight] and len(straight) == 4
    assert [r["val_bpb"] for r in resumed if "val_bpb" in r] == [r["val_bpb"] for r in straight if "val_bpb" in r]
    assert all(0.0 <= r["padding_frac"] < 0.5 for r in straight)  # packed rows are mostly full
    log = (tmp_path / "straight" / "run_log.md").read_text()
    assert "packed rows: sdpa_mask" in log and "training: llm " in log  # through build: the parts that train


def test_padded_unpacked_rows_get_a_pack_hint(synth_dir, tiny_tokenizer_dir, tmp_path, world1) -> None:
    """An unpacked sft run whose rows are mostly padding says so in its log after its first steps, with the fix
    (--pack and a smaller --micro-batch); a packed run and rows that are mostly real tokens say nothing."""
    from ghostvis.data.packing import PACK_HINT_PADDING, PACK_HINT_STEPS, pack_hint

    assert pack_hint([PACK_HINT_PADDING] * 4) is None and pack_hint([0.7, 0.2]) is None
    assert pack_hint([0.7, 0.6]).startswith("rows were 65% padding over the first 2 steps: --pack puts several")

    data = bench_module("packing").write_llava_like(tmp_path / "llava", 80, image_size=16, shard_size=40)

    def log(out: Path, *extra: str) -> tuple[str, float]:
        loop.run(parse("--stage", "sft", "--model", "vlm_tiny", "--data", data, "--tokenizer",
                       tiny_tokenizer_dir, "--steps", str(PACK_HINT_STEPS), "--data-workers", "0", "--out", out,
                       "--ds_config", REPO / "ds_configs" / "zero2.json", "--eval-every", "0", "--save-every", "0",
                       *extra))
        metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        return (out / "run_log.md").read_text(), sum(m["padding_frac"] for m in metrics) / len(metrics)

    text, padding = log(tmp_path / "padded", "--micro-batch", "8", "--seq-len", "1024")  # a LLaVA-like mix pads
    assert padding > PACK_HINT_PADDING and f"step {PACK_HINT_STEPS}: rows were {padding:.0%} padding" in text
    text, padding = log(tmp_path / "packed", "--micro-batch", "1", "--seq-len", "1024", "--pack")
    assert padding < PACK_HINT_PADDING and "rows were" not in text


def test_pack_refused_where_it_cannot_apply(text_data, tiny_tokenizer_dir, tmp_path, world1) -> None:
    args = parse("--stage", "base", "--model", "tiny", "--data", text_data, "--tokenizer", tiny_tokenizer_dir,
                 "--pack", "--out", tmp_path / "base", "--ds_config", REPO / "ds_configs" / "zero2.json",
                 "--eval-every", "0")
    with pytest.raises(PackError, match=r"^--pack: --stage base can't pack \(base already fills every row from one "
                                        r"token stream .*\); packing applies to vision_pretrain and sft: drop --pack$"):
        loop.run(args)


def test_packed_attention_refused_without_pack_or_a_gpu(synth_dir, tiny_tokenizer_dir, tmp_path, world1) -> None:
    from ghostvis.model.attention import AttentionError, select_attention

    common = ("--stage", "sft", "--model", "vlm_tiny", "--data", synth_dir / "vqa", "--tokenizer", tiny_tokenizer_dir,
              "--eval-every", "0", "--ds_config", REPO / "ds_configs" / "zero2.json", "--packed-attention", "flex")
    with pytest.raises(ConfigError, match=r"^--packed-attention flex chooses the kernel of --pack rows: add --pack, "
                                          r"or drop --packed-attention$"):
        loop.run(parse(*common, "--out", tmp_path / "s"))
    with pytest.raises(AttentionError, match=r"^--packed-attention flex runs only on a GPU in bf16/fp16; on cpu in "
                                             r"float32 packed rows use sdpa_mask \(pass auto\)$"):
        loop.run(parse(*common, "--pack", "--out", tmp_path / "p"))
    assert select_attention("auto", "cpu", torch.float32, 16, packed="sdpa_mask").packed == "sdpa_mask"
    with pytest.raises(AttentionError, match=r"^--packed-attention 'ring': choose from auto, varlen, flex, sdpa_mask$"):
        select_attention("auto", "cpu", torch.float32, 16, packed="ring")


def test_length_group_refused_where_nothing_is_grouped(text_data, synth_dir, tiny_tokenizer_dir, tmp_path,
                                                      world1) -> None:
    """--length-group sorts sft's unpacked conversations only: elsewhere it would be silently ignored."""
    common = ("--tokenizer", tiny_tokenizer_dir, "--length-group", "8", "--eval-every", "0",
              "--ds_config", REPO / "ds_configs" / "zero2.json")
    with pytest.raises(ConfigError, match=r"^--length-group 8: --stage base has no conversations to group \(length "
                                          r"grouping applies to sft without --pack\): drop --length-group$"):
        loop.run(parse("--stage", "base", "--model", "tiny", "--data", text_data, "--out", tmp_path / "b", *common))
    with pytest.raises(ConfigError, match=r"^--length-group 8: --pack fills rows from its own window, not from "
                                          r"length groups: drop one of them$"):
        loop.run(parse("--stage", "sft", "--model", "vlm_tiny", "--data", synth_dir / "vqa", "--pack",
                       "--out", tmp_path / "s", *common))


def test_pack_with_context_parallel_is_refused() -> None:
    from ghostvis.data.packing import check_packing

    check_packing("sft", "conversation", 1, 0, cp=1)  # allowed
    with pytest.raises(PackError, match=r"^--pack with --cp 2: .*use --cp 1 \(or drop --pack\)$"):
        check_packing("sft", "conversation", 1, 0, cp=2)
