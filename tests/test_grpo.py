"""GRPO (--stage rl): group-normalized advantages, the policy loss's masks and clipping, the prompt
batches, and a short real run through the one loop whose mean reward rises.

The run's task is learnable in seconds by a tiny model: SFT first teaches the answer format with four
answers equally likely for every prompt (reward ≈ 1/4 when sampling); the RL data then names one of them as
the right answer for every prompt, which only the reward can teach.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import run_stage, write_shards

import ghostvis

from ghostvis.config import get_preset
from ghostvis.data.rl import PromptBatches
from ghostvis.data.shards import ShardStream
from ghostvis.infer.engine import Completion
from ghostvis.model.gpt import GPT
from ghostvis.train import loop
from ghostvis.train.engine import ConfigError
from ghostvis.train.grpo import completion_targets, group_advantages, policy_loss, token_logp
from ghostvis.train.settings import GRPOSettings, Settings
from ghostvis.train.stages import STAGES

PROMPTS, ANSWERS = ("pick a", "pick b", "pick c", "pick d"), ("red", "blue", "green", "fox")


def test_group_advantages_by_hand():
    rewards = torch.tensor([1.0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 0, 0])
    adv = group_advantages(rewards, 4, eps=0.0).view(4, 4)
    # mean 1/4, population std sqrt(3)/4: (1 - 1/4) / (sqrt(3)/4) = sqrt(3), (0 - 1/4) / (sqrt(3)/4) = -1/sqrt(3)
    torch.testing.assert_close(adv[0], torch.tensor([3**0.5, -(3**-0.5), -(3**-0.5), -(3**-0.5)]))
    assert torch.equal(adv[1], torch.zeros(4)) and torch.equal(adv[2], torch.zeros(4))  # all equal: no signal
    torch.testing.assert_close(adv[3], torch.tensor([1.0, 1, -1, -1]))
    # the default eps keeps all-equal groups at exactly zero and barely moves the others
    assert torch.equal(group_advantages(torch.ones(3), 3), torch.zeros(3))
    assert group_advantages(torch.tensor([1.0, 0]), 2)[0] == pytest.approx(1.0, rel=1e-3)


def test_targets_count_only_sampled_completion_tokens():
    prompts = [[1, 2, 3], [4, 5]]
    completions = [Completion([10, 11, 12, 13], [True, False, False, True], "length"),  # 11, 12: the calculator's
                   Completion([20], [True], "stop")]
    idx, targets = completion_targets(prompts, completions, pad_id=0)
    assert idx.tolist() == [[1, 2, 3, 10, 11, 12, 13], [4, 5, 20, 0, 0, 0, 0]]
    assert targets.tolist() == [[-1, -1, 10, -1, -1, 13, -1], [-1, 20, -1, -1, -1, -1, -1]]


def test_policy_loss_gradient_only_on_counted_tokens_and_clipped():
    torch.manual_seed(0)
    cfg, _ = get_preset("tiny")
    model = GPT(cfg)
    idx, targets = completion_targets([[1, 2, 3], [4, 5]], [Completion([10, 11, 12, 13], [True, False, False, True]),
                                                          Completion([20, 21], [True, True])], pad_id=0)
    logp = token_logp(model, idx, targets, None)
    mask = targets != -1
    assert torch.all(logp[~mask] == 0) and torch.all(logp[mask] < 0)

    leaf = logp.detach().requires_grad_(True)
    advantages = torch.tensor([1.5, -0.5])
    loss, kl = policy_loss(leaf, leaf.detach(), advantages, mask, clip_eps=0.2)
    loss.backward()
    assert kl is None
    assert torch.all(leaf.grad[~mask] == 0)  # prompt, forced and padding positions get no gradient
    # one step per rollout: ratio 1, so d loss / d logp = -A / (number of counted tokens)
    torch.testing.assert_close(leaf.grad[mask], torch.tensor([-1.5, -1.5, 0.5, 0.5]) / 4)
    torch.testing.assert_close(loss, -(1.5 * 2 - 0.5 * 2) / torch.tensor(4.0))

    # a ratio beyond 1 + eps with a positive advantage is clipped: no gradient pushes it further
    leaf.grad = None
    loss, _ = policy_loss(leaf, leaf.detach() - 1.0, advantages, mask, clip_eps=0.2)
    loss.backward()
    assert torch.all(leaf.grad[0] == 0) and torch.all(leaf.grad[1][mask[1]] != 0)

    # the KL penalty against a reference is >= 0, zero when equal, and also masked
    leaf.grad = None
    ref = logp.detach() + torch.randn_like(logp)
    loss, kl = policy_loss(leaf, leaf.detach(), advantages, mask, 0.2, kl_coef=0.5, ref_logp=ref)
    loss.backward()
    assert kl > 0 and torch.all(leaf.grad[~mask] == 0)
    assert policy_loss(leaf, leaf.detach(), advantages, mask, 0.2, 0.5, leaf.detach())[1] == 0


def test_settings_refused_clearly():
    with pytest.raises(ConfigError, match="--group-size 1"):
        GRPOSettings(1, 8, 1.0, 0.0, 0.2)
    with pytest.raises(ConfigError, match="--temperature"):
        GRPOSettings(4, 8, 0.0, 0.0, 0.2)
    req = loop.LossRequest(STAGES["rl"], Settings.of(STAGES["rl"], STAGES["rl"].defaults), None, torch.device("cpu"), "fp32",
                           {"zero_optimization": {"stage": 3}}, lambda: None)
    with pytest.raises(ConfigError, match="ZeRO-3.*zero2.json"):
        loop.LOSSES[STAGES["rl"].loss](req)


def conversation(prompt: str, reply: str, answer: str | None) -> dict:
    record = {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": reply}]}
    return record if answer is None else {**record, "answer": answer, "type": "pick"}


def write_split(d: Path, records: list[dict]) -> None:
    write_shards(d, "conversation", [{"__key__": f"s{i:04d}", "json": json.dumps(r).encode()}
                                     for i, r in enumerate(records)], per_shard=16)


@pytest.fixture(scope="module")
def pick_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pick")
    # sft: every prompt with every answer (the format); rl: "red" is right, whatever the prompt
    write_split(root / "sft" / "train", [conversation(p, a, None) for _ in range(4) for p in PROMPTS
                                         for a in ANSWERS])
    rl = [conversation(p, "red", "red") for _ in range(8) for p in PROMPTS]
    write_split(root / "rl" / "train", rl)
    # no `answer` field: the last assistant turn is the reference; nothing to answer: skipped, counted by cause
    write_split(root / "bad", rl + [{"messages": [{"role": "user", "content": "x"}]}, conversation("pick a", "red", None)])
    return root


def test_prompt_batches(pick_data, tiny_tokenizer):
    source = ShardStream(pick_data / "bad", seed=0, loop=False, shuffle=False, max_corrupt_fraction=0.5)
    batches = list(PromptBatches(source, tiny_tokenizer, batch_size=11, max_prompt_len=64, num_vision_tokens=0,
                                 transform=None))
    assert len(batches) == 3 and source.stats["corrupt"] == 0  # 33 usable prompts; a missing answer is no corruption
    assert batches[-1]["answers"][-1] == "red" and batches[-1]["skipped"] == {"no answer": 1}
    first = batches[0]
    prompt = first["prompts"][0]
    assert prompt == tiny_tokenizer.render_for_completion(conversation("pick a", "red", None))
    assert prompt[-1] == tiny_tokenizer.special_id("<|assistant_start|>") and first["answers"][0] == "red"
    assert first["types"][0] == "pick" and first["images"][0] == [] and first["num_tokens"] == 11 * len(prompt)


def test_grpo_run_raises_mean_reward(tmp_path, pick_data, tiny_tokenizer_dir, world1):
    sft, rl = tmp_path / "sft", tmp_path / "rl"
    run_stage("--stage", "sft", "--model", "vlm_tiny", "--data", pick_data / "sft", "--tokenizer", tiny_tokenizer_dir,
              "--out", sft, "--micro-batch", "16", "--seq-len", "32", "--steps", "40", "--lr", "1e-2")
    records = run_stage("--stage", "rl", "--init-from", sft, "--data", pick_data / "rl", "--tokenizer",
                        tiny_tokenizer_dir, "--out", rl, "--micro-batch", "4", "--seq-len", "32", "--steps", "30",
                        "--lr", "1e-3", "--group-size", "8", "--rl-max-new-tokens", "6", "--seed", "1")
    reward = [r["reward"] for r in records]
    assert len(reward) == 30 and all("completion_tokens" in r and r["tokens_per_s"] > 0 for r in records)
    first, last = sum(reward[:5]) / 5, sum(reward[-5:]) / 5
    assert 0.1 < first < 0.5  # the format is learned, which answer is right isn't
    assert last > first + 0.3, reward

    # LoRA under GRPO, with the KL reference (the base model, without adapters): runs, saves, merges
    run_stage("--stage", "rl", "--init-from", sft, "--data", pick_data / "rl", "--tokenizer", tiny_tokenizer_dir,
              "--out", tmp_path / "rl_lora", "--micro-batch", "4", "--seq-len", "32", "--steps", "2", "--lr", "1e-3",
              "--group-size", "4", "--rl-max-new-tokens", "6", "--kl-coef", "0.1", "--lora-rank", "4")
    assert (tmp_path / "rl_lora" / "adapter.safetensors").is_file()
    merged = ghostvis.load_pretrained(tmp_path / "rl_lora")[0]
    assert not any("lora" in name for name, _ in merged.named_parameters())
