"""Does the whole VLM learn to answer? The demo's model, trained directly on fresh synth scenes, no DeepSpeed,
no shards: a fast way to compare recipes before running `make demo` (docs/demo.md, "Learning to look").
The LLM is make demo's shape (`small --depth 4`) from random weights (or `--init-llm` a base export); the tower
is the preset's, from random weights (or `--init-encoder`). Runs on CUDA when there is one.

    python bench/vlm_probe.py --tokenizer runs/demo/tokenizer --model vlm_tiny_cnn --steps 600
    # what binds every question type on a GPU by step ~2000 (docs/demo.md, "Where binding starts"):
    python bench/vlm_probe.py --tokenizer runs/demo/tokenizer --vision position_embedding=true --turns 6 \
        --captions 0.5 --places --batch 64 --steps 4000 --eval-every 250
    # what binds colour on two CPU cores in 300 steps (docs/demo.md, "A warm encoder and batch 128"; shape too
    # with --sentences or --captions 0.25 --places, by step 100, but no run bound both):
    python bench/vlm_probe.py --tokenizer runs/demo/tokenizer --init-encoder warm_cnn.safetensors \
        --batch 128 --steps 300

Each step draws `--batch` scenes (64 px); a `--captions` fraction of the rows are captions (loss on every
caption token, as vision_pretrain trains), the rest visual questions (`--turns` about the same scene per
row, as `data_prep.synth --vqa-turns` makes them), rendered with the chat template as SFT renders it (loss on
the answers). The connector and the encoder train from random weights. Every `--eval-every` steps it prints held-out
accuracy per question type on 400 fixed scenes (100 per type): the answer's first token, by argmax after
`<|assistant_start|>`, the check `launch/eval.py` makes by generation.
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import time
from pathlib import Path

import torch

from ghostvis import checkpoint_io
from ghostvis.config import get_preset, small_config, vision_override_arg
from ghostvis.data import scenes
from ghostvis.data.multimodal import shift_targets
from ghostvis.model.vlm import VLM
from ghostvis.tokenizer import IMAGE_PLACEHOLDER
from ghostvis.tokenizer_dir import load_tokenizer
from ghostvis.vision.transforms import image_transform

def qa_sample(rng: random.Random, qtype: str, max_objects: int = scenes.MAX_OBJECTS) -> tuple[scenes.Scene, scenes.QA]:
    while True:
        scene = scenes.sample_scene(rng, rng.randint(1, max_objects))
        options = [q for q in scenes.questions(scene) if q.type == qtype]
        if options:
            return scene, rng.choice(options)


def prompt(question: str, question_first: bool) -> str:
    return f"{question}\n{IMAGE_PLACEHOLDER}" if question_first else f"{IMAGE_PLACEHOLDER}\n{question}"


def make_batch(rng: random.Random, n: int, caption_frac: float, places: bool, question_first: bool, tok,
               n_vis: int, transform, turns: int = 1, max_objects: int = scenes.MAX_OBJECTS, frame: str = "none",
               sentences: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    rows, images = [], []
    for _ in range(n):
        if rng.random() < caption_frac:
            scene = scenes.sample_scene(rng, rng.randint(1, max_objects))
            ids, mask = tok.render_caption(scenes.caption(scene, places), n_vis, frame)
        else:
            scene, qa = qa_sample(rng, rng.choice(scenes.QUESTION_TYPES), max_objects)
            # one turn draws nothing more, so the earlier single-question runs repeat exactly
            chat = [qa] if turns == 1 else scenes.conversation_qas(scene, qa, rng, turns)
            messages = []
            for i, q in enumerate(chat):
                messages += [{"role": "user", "content": prompt(q.question, question_first) if i == 0 else q.question},
                             {"role": "assistant", "content": q.sentence if sentences else q.answer}]
            record = {"messages": messages}
            ids, mask = tok.render_conversation(record, 10_000, n_vis, frame)
        rows.append((ids, shift_targets(ids, mask)))
        images.append(transform(scenes.render(scene, 64)))
    T = max(len(ids) for ids, _ in rows)
    pad = tok.pad_token_id
    idx = torch.tensor([ids + [pad] * (T - len(ids)) for ids, _ in rows])
    tgt = torch.tensor([t + [-1] * (T - len(t)) for _, t in rows])
    return idx, tgt, torch.stack(images)


def held_out(tok, n_vis: int, transform, question_first: bool, frame: str = "none",
             sentences: bool = False) -> list[tuple[str, list[int], list[int], torch.Tensor]]:
    """(type, prompt ids, reply ids, image) for 100 fixed scenes per question type."""
    rng = random.Random(12345)
    out = []
    for qtype in scenes.QUESTION_TYPES:
        for _ in range(100):
            scene, qa = qa_sample(rng, qtype)
            ids = tok.render_for_completion(
                {"messages": [{"role": "user", "content": prompt(qa.question, question_first)}]}, n_vis, frame)
            reply = tok.encode(qa.sentence if sentences else qa.answer)
            out.append((qtype, ids, reply if sentences else reply[:1], transform(scenes.render(scene, 64))))
    return out


@torch.no_grad()
def accuracy(model: VLM, cases, pad: int, device: torch.device) -> dict[str, float]:
    model.eval()
    hits: dict[str, list[int]] = {}
    for i in range(0, len(cases), 100):
        chunk = cases[i:i + 100]
        rows = [p + r[:-1] for _, p, r, _ in chunk]  # the reply teacher-forced: every token right = greedy's reply
        T = max(len(r) for r in rows)
        idx = torch.tensor([r + [pad] * (T - len(r)) for r in rows], device=device)
        pred = model(idx, pixel_values=torch.stack([im for *_, im in chunk]).to(device)).argmax(-1).tolist()
        for (qtype, p, reply, _), row in zip(chunk, pred):
            got = row[len(p) - 1:len(p) - 1 + len(reply)]
            hits.setdefault(qtype, []).append(int(got == reply))
    model.train()
    return {t: sum(h) / len(h) for t, h in hits.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokenizer", required=True, help="a tokenizer directory (launch/tok_train.py)")
    p.add_argument("--model", default="vlm_tiny_cnn", help="a vlm preset")
    p.add_argument("--llm-depth", type=int, default=4,
                   help="the LLM is `small --depth D` (make demo's base: 4, i.e. 256 wide, 2 heads of 128)")
    p.add_argument("--llm-heads", type=int, default=None, help="query heads instead of the family's ~128-wide ones")
    p.add_argument("--vision", type=vision_override_arg, action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--captions", type=float, default=0.0, help="fraction of rows that are captions")
    p.add_argument("--places", action="store_true", help="captions say where each object lies")
    p.add_argument("--question-first", action="store_true",
                   help="the question before the image in the prompt, so image tokens can attend to it")
    p.add_argument("--turns", type=int, default=1,
                   help="questions per QA row (scenes.conversation_qas; loss on every answer); held-out stays one")
    p.add_argument("--sentences", action="store_true",
                   help="replies as sentences that name their object right before the answer word (QA.sentence); "
                        "held-out accuracy is then the whole reply's, teacher-forced")
    p.add_argument("--captions-first", type=int, default=0, metavar="STEPS",
                   help="only captions for the first STEPS steps (as vision_pretrain before SFT), then --captions")
    p.add_argument("--curriculum", type=int, default=0, metavar="STEPS",
                   help="scenes of one or two objects for the first STEPS steps, then up to four")
    p.add_argument("--init-llm", default=None, metavar="DIR",
                   help="start the LLM from an export (a base model trained with this --tokenizer): its config and "
                        "llm.safetensors; --llm-depth and --llm-heads are then ignored")
    p.add_argument("--reinit", default=None, metavar="REGEX",
                   help="with --init-llm: the LLM parameters whose names match (e.g. 'attn' or 'wte|lm_head') become "
                        "--shrink x base + --perturb x fresh (GPT.shrink_perturb); by default their fresh random "
                        "weights alone, to find which part of a base model slows binding")
    p.add_argument("--shrink", type=float, default=None, metavar="S",
                   help="with --reinit: the share of the base weights kept, default 0 (launch/train.py --init-shrink "
                        "does this to every block)")
    p.add_argument("--perturb", type=float, default=None, metavar="P",
                   help="with --reinit: the share of fresh weights added, default 1")
    p.add_argument("--init-encoder", default=None, metavar="FILE",
                   help="the encoder's starting weights, not random ones: a timm .safetensors file such as "
                        "bench/tower_probe.py --save-encoder writes (launch/train.py --encoder-weights)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="default: cuda when there is one")
    p.add_argument("--lr", type=float, default=1e-3, help="the LLM's learning rate")
    p.add_argument("--vision-lr", type=float, default=2e-3, help="connector (resampler + projector)")
    p.add_argument("--encoder-lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()

    if (a.shrink is not None or a.perturb is not None) and not a.reinit:
        p.error("--shrink/--perturb act on the parameters --reinit REGEX names (with --init-llm): give --reinit")
    if a.reinit and not a.init_llm:
        p.error("--reinit changes the weights of --init-llm: give the base export")
    torch.manual_seed(a.seed)
    tok = load_tokenizer(a.tokenizer)
    _, vision_cfg = get_preset(a.model, **dict(a.vision))
    if a.init_llm:
        base_cfg, _, raw = checkpoint_io.read_config(a.init_llm)
        if raw["tokenizer"]["fingerprint"] != tok.fingerprint:
            raise SystemExit(f"--init-llm {a.init_llm} was trained with another tokenizer than --tokenizer {a.tokenizer}")
        model_cfg = dataclasses.replace(base_cfg, image_token_id=tok.image_token_id)
    else:
        heads = {} if a.llm_heads is None else {"n_head": a.llm_heads, "n_kv_head": max(1, a.llm_heads // 2),
                                                 "head_dim": 64 * a.llm_depth // a.llm_heads}
        model_cfg = dataclasses.replace(small_config(a.llm_depth), vocab_size=tok.vocab_size,
                                        image_token_id=tok.image_token_id, **heads)
    device = torch.device(a.device)
    model = VLM(model_cfg, vision_cfg, freeze_encoder=False)
    if a.init_llm:
        checkpoint_io.load_weights(model.llm, Path(a.init_llm) / checkpoint_io.LLM_FILE)
        shrink, perturb = 0.0 if a.shrink is None else a.shrink, 1.0 if a.perturb is None else a.perturb
        if a.reinit and not model.llm.shrink_perturb(shrink, perturb, a.reinit):
            raise SystemExit(f"--reinit {a.reinit!r} matches no LLM parameter; names look like "
                             f"{next(iter(model.llm.state_dict()))}")
    if a.init_encoder:
        checkpoint_io.load_encoder_weights(model.vision.encoder, a.init_encoder)
    model.to(device)
    n_vis, transform = vision_cfg.num_vision_tokens, image_transform(vision_cfg)
    groups = [{"params": list(model.llm.parameters()), "lr": a.lr},
              {"params": [q for n, q in model.vision.named_parameters() if not n.startswith("encoder.")],
               "lr": a.vision_lr},
              {"params": list(model.vision.encoder.parameters()), "lr": a.encoder_lr}]
    opt = torch.optim.AdamW(groups, betas=(0.9, 0.95), weight_decay=0.0)
    peak = [g["lr"] for g in opt.param_groups]
    cases = held_out(tok, n_vis, transform, a.question_first, vision_cfg.image_frame, a.sentences)
    pad = tok.pad_token_id
    rng = random.Random(a.seed)
    t0 = time.time()
    for step in range(1, a.steps + 1):
        scale = min(1.0, step / a.warmup)
        for g, lr in zip(opt.param_groups, peak):
            g["lr"] = lr * scale
        captions = 1.0 if step <= a.captions_first else a.captions
        idx, tgt, pixels = make_batch(rng, a.batch, captions, a.places, a.question_first, tok, n_vis, transform,
                                      a.turns, 2 if step <= a.curriculum else scenes.MAX_OBJECTS,
                                      vision_cfg.image_frame, a.sentences)
        loss = model(idx.to(device), tgt.to(device), pixel_values=pixels.to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % a.eval_every == 0 or step == a.steps:
            acc = accuracy(model, cases, pad, device)
            cells = " ".join(f"{t} {acc[t]:5.1%}" for t in scenes.QUESTION_TYPES)
            print(f"step {step:5d}  loss {loss.item():.3f}  {cells}  ({time.time() - t0:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
