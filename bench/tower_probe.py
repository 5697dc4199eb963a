"""Can a vision tower see what the questions ask? A direct probe, no LLM (docs/demo.md, "Learning to look").

    python bench/tower_probe.py --model vlm_tiny_cnn --task shape --steps 100
    python bench/tower_probe.py --model vlm_tiny --task bind --steps 100
    python bench/tower_probe.py --model vlm_tiny_cnn --task position --vision position_embedding=true
    # a warm encoder for --encoder-weights (docs/demo.md, "A warm encoder and batch 128"):
    python bench/tower_probe.py --model vlm_tiny_cnn --task bind --steps 250 --save-encoder warm_cnn.safetensors

The preset's tower (encoder unfrozen, random weights) turns synth scenes (64 px) into its vision tokens
(width 64); a small readout answers from them, trained with the tower end to end on fresh scenes every
step (batch 32; encoder lr 1e-3, the rest 2e-3: the demo's rates):

- `shape`: one object per scene; its shape (chance 1/3). Readout: a linear layer on the flattened tokens.
- `bind`: 1-4 objects; the shape of the object of a named colour (chance 1/3). Readout: one cross-attention
  layer whose query is the colour's embedding, then a linear layer.
- `position`: 2-4 objects; is the object of one named colour left or right of another's (chance 1/2, the two
  centres at least scenes.MIN_DX apart, as the visual QA asks). Readout: the same cross-attention queried by
  each colour, the two outputs concatenated, then a linear layer. It can only answer if the tokens it
  attends to say where they lie (VisionConfig.position_embedding, or what the encoder itself encodes).

Prints held-out accuracy on 400 fixed scenes every 25 steps.
"""

from __future__ import annotations

import argparse
import random
import time

import torch
from torch import nn

from ghostvis.config import get_preset, vision_override_arg
from ghostvis.data.scenes import COLOURS, MIN_DX, SHAPES, render, sample_scene
from ghostvis.vision.tower import VisionTower
from ghostvis.vision.transforms import image_transform

PROBE_LLM = get_preset("tiny")[0]  # the tower feeds the readout, not the preset's LLM: built at this width
WIDTH = PROBE_LLM.n_embd


class Readout(nn.Module):
    """Tokens [N, T, WIDTH] (+ colour indices [N, Q] for `bind` and `position`) -> answer logits."""

    def __init__(self, task: str, num_tokens: int) -> None:
        super().__init__()
        self.task = task
        if task == "shape":
            self.head = nn.Linear(num_tokens * WIDTH, len(SHAPES))
        else:
            queries, answers = (1, len(SHAPES)) if task == "bind" else (2, 2)
            self.colour = nn.Embedding(len(COLOURS), WIDTH)
            self.attn = nn.MultiheadAttention(WIDTH, 4, batch_first=True)
            self.head = nn.Linear(queries * WIDTH, answers)

    def forward(self, tokens: torch.Tensor, colour: torch.Tensor) -> torch.Tensor:
        if self.task == "shape":
            return self.head(tokens.flatten(1))
        out, _ = self.attn(self.colour(colour), tokens, tokens)
        return self.head(out.flatten(1))


def batch(rng: random.Random, n: int, task: str, transform) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(pixels, colour indices of the named objects [n, Q], answer index) for n fresh scenes."""
    xs, cs, ys = [], [], []
    colours = list(COLOURS)
    while len(xs) < n:
        scene = sample_scene(rng, 1 if task == "shape" else rng.randint(2, 4) if task == "position" else None)
        if task == "position":
            pairs = [(a, b) for a in scene.objects for b in scene.objects if abs(a.x - b.x) >= MIN_DX]
            if not pairs:
                continue
            a, b = rng.choice(pairs)
            cs.append([colours.index(a.colour), colours.index(b.colour)])
            ys.append(int(a.x > b.x))  # 0 = left of, 1 = right of
        else:
            obj = scene.objects[0] if task == "shape" else rng.choice(scene.objects)
            cs.append([colours.index(obj.colour)])
            ys.append(SHAPES.index(obj.shape))
        xs.append(transform(render(scene, 64)))
    return torch.stack(xs), torch.tensor(cs), torch.tensor(ys)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="vlm_tiny_cnn", help="a vlm_* preset whose tower is probed")
    p.add_argument("--task", default="shape", choices=("shape", "bind", "position"))
    p.add_argument("--vision", type=vision_override_arg, action="append", default=[], metavar="KEY=VALUE",
                   help="set a field of the preset's VisionConfig, e.g. position_embedding=true")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-encoder", default=None, metavar="FILE",
                   help="write the trained encoder's weights (timm-format safetensors), which "
                        "bench/vlm_probe.py --init-encoder and launch/train.py --encoder-weights read")
    a = p.parse_args()
    torch.manual_seed(a.seed)
    try:
        _, cfg = get_preset(a.model, **dict(a.vision))
        tower = VisionTower(cfg, PROBE_LLM, freeze_encoder=False) if cfg is not None else None
    except ValueError as e:
        p.error(str(e))
    if tower is None:
        p.error(f"--model {a.model} has no vision tower; pick a vlm_* preset")
    readout = Readout(a.task, tower.num_vision_tokens)
    transform = image_transform(cfg)
    opt = torch.optim.AdamW([
        {"params": tower.encoder.parameters(), "lr": 1e-3},
        {"params": [*tower.resampler.parameters(), *tower.projector.parameters(), *readout.parameters()], "lr": 2e-3}])
    test = batch(random.Random(123), 400, a.task, transform)
    rng, t0 = random.Random(a.seed), time.time()
    for step in range(1, a.steps + 1):
        x, c, y = batch(rng, 32, a.task, transform)
        loss = nn.functional.cross_entropy(readout(tower(x), c), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 25 == 0:
            tower.eval()
            with torch.no_grad():
                acc = (readout(tower(test[0]), test[1]).argmax(-1) == test[2]).float().mean().item()
            tower.train()
            print(f"{a.model} {a.task} step {step}: loss {loss.item():.3f}, held-out accuracy {acc:.1%} "
                  f"({time.time() - t0:.0f} s)", flush=True)
    if a.save_encoder:
        tower.encoder.save_encoder_weights(a.save_encoder)


if __name__ == "__main__":
    main()
