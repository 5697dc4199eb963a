"""The inference engine on tiny real models: the KV cache changes nothing under greedy decoding,
batching changes nothing, generation stops at <|assistant_end|>, and the calculator tool's output is
force-fed into the sequence."""

import pytest
import torch
from conftest import TOK, bigram_gpt, tiny_gpt, tiny_vlm

from ghostvis.infer.chat import ReplyStream, fit_prompt, user_message, ContextTooLong
from ghostvis.infer.engine import Engine, ToolUse, sample
from ghostvis.tokenizer import IMAGE_TOKENS


def greedy_without_cache(model, prompt, n, pixel_values=None):
    """The reference: recompute the whole sequence every step; never an image token or its frame, as the engine."""
    ids = list(prompt)
    banned = [TOK.special_id(name) for name in IMAGE_TOKENS]
    with torch.no_grad():
        for _ in range(n):
            idx = torch.tensor([ids])
            logits = model(idx, pixel_values=pixel_values) if pixel_values is not None else model(idx)
            ids.append(int(logits[0, -1].index_fill(-1, torch.tensor(banned), float("-inf")).argmax()))
    return ids[len(prompt):]


def prompt_ids(text: str, n_images: int = 0, num_vision_tokens: int = 0) -> list[int]:
    return TOK.render_for_completion({"messages": [user_message(text, n_images)]}, num_vision_tokens)


def test_greedy_with_cache_equals_full_recompute_gpt():
    model = tiny_gpt()
    engine = Engine(model, TOK)
    prompt = prompt_ids("what is two plus two?")
    [done] = engine.complete([prompt], max_new_tokens=20, temperature=0.0, stop_ids=[])
    assert len(done.tokens) == 20 and done.finish_reason == "length"
    assert done.tokens == greedy_without_cache(model, prompt, 20)


def test_greedy_with_cache_equals_full_recompute_vlm_with_image():
    model = tiny_vlm()
    engine = Engine(model, TOK)
    assert engine.num_vision_tokens == model.num_vision_tokens > 0
    prompt = prompt_ids("what colour is the square?", 1, engine.num_vision_tokens)
    pixels = torch.randn(1, 3, model.vision_config.image_size, model.vision_config.image_size)
    [done] = engine.complete([prompt], [[pixels[0]]], max_new_tokens=12, temperature=0.0, stop_ids=[])
    assert done.tokens == greedy_without_cache(model, prompt, 12, pixel_values=pixels)
    # the image matters: another image gives another continuation's logits
    other = engine.complete([prompt], [[-pixels[0]]], max_new_tokens=12, temperature=0.0, stop_ids=[])[0]
    assert other.tokens == greedy_without_cache(model, prompt, 12, pixel_values=-pixels)


def test_batch_of_different_lengths_equals_one_by_one():
    model = tiny_vlm(seed=1)
    engine = Engine(model, TOK)
    n_vis, size = engine.num_vision_tokens, model.vision_config.image_size
    img_a, img_b = torch.randn(3, size, size), torch.randn(3, size, size)
    prompts = [prompt_ids("hi", 1, n_vis), prompt_ids("a longer question here"), prompt_ids("hi", 1, n_vis),
               prompt_ids("hi", 1, n_vis), prompt_ids("two images", 2, n_vis), prompt_ids("a longer question here")]
    # rows 1 and 5 make a group of identical prompts: one prefill copied into both rows
    images = [[img_a], [], [img_a], [img_b], [img_a, img_b], []]
    batched = engine.complete(prompts, images, max_new_tokens=10, temperature=0.0, stop_ids=[])
    for prompt, imgs, got in zip(prompts, images, batched):
        [alone] = engine.complete([prompt], [imgs], max_new_tokens=10, temperature=0.0, stop_ids=[])
        assert got.tokens == alone.tokens
    assert batched[0].tokens == batched[2].tokens
    assert batched[0].tokens != batched[3].tokens  # same text, other image


def test_stops_at_a_stop_token():
    model = tiny_gpt(seed=2)
    engine = Engine(model, TOK)
    prompt = prompt_ids("hello")
    free = engine.complete([prompt], max_new_tokens=8, temperature=0.0, stop_ids=[])[0].tokens
    stop_at = free[3]
    first = free.index(stop_at)
    [done] = engine.complete([prompt], max_new_tokens=8, temperature=0.0, stop_ids=[stop_at])
    assert done.tokens == free[:first + 1] and done.finish_reason == "stop"


def test_seeded_sampling_is_reproducible_and_top_k_1_is_greedy():
    engine = Engine(tiny_gpt(seed=3), TOK)
    prompts = [prompt_ids("sample me")] * 3
    kw = dict(max_new_tokens=10, temperature=1.5, stop_ids=[])
    a = [c.tokens for c in engine.complete(prompts, seed=7, **kw)]
    b = [c.tokens for c in engine.complete(prompts, seed=7, **kw)]
    assert a == b and len({tuple(t) for t in a}) > 1  # same seed, same draws; rows differ from each other
    greedy = engine.complete(prompts[:1], max_new_tokens=10, temperature=0.0, stop_ids=[])[0].tokens
    assert engine.complete(prompts[:1], top_k=1, seed=1, **kw)[0].tokens == greedy


def test_top_p_keeps_the_smallest_prefix_reaching_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    gen = torch.Generator().manual_seed(0)
    draws = {int(sample(logits, 1.0, None, 0.7, gen)) for _ in range(300)}
    assert draws == {0, 1}
    assert {int(sample(logits, 1.0, 2, None, gen)) for _ in range(300)} == {0, 1}


def test_tool_call_output_is_force_fed():
    sp = TOK.special_id
    expr = TOK.encode("2+3")
    assert len(set(expr)) == len(expr) and TOK.encode("5")[0] not in expr
    chain = [sp("<|assistant_start|>"), sp("<|python_start|>"), *expr, sp("<|python_end|>")]
    model = bigram_gpt(chain + [sp("<|output_end|>"), sp("<|assistant_end|>")])
    engine = Engine(model, TOK)
    [done] = engine.complete([prompt_ids("add")], max_new_tokens=30, temperature=0.0)
    forced = [sp("<|output_start|>"), *TOK.encode("5"), sp("<|output_end|>")]
    assert done.tokens == chain[1:] + forced + [sp("<|assistant_end|>")]
    assert done.sampled == [True] * len(chain[1:]) + [False] * len(forced) + [True]
    assert done.finish_reason == "stop"
    stream = ReplyStream(engine)
    text = "".join(stream.feed(t) for t in done.tokens)
    assert text == "[calc: 2+3 = 5]"
    assert stream.finish() == {"role": "assistant", "content": [{"type": "python", "text": "2+3"},
                                                                 {"type": "output", "text": "5"}]}


def test_tool_state_machine_reports_refusals():
    tool = ToolUse(TOK)
    for t in [TOK.special_id("<|python_start|>"), *TOK.encode("__import__('os')"), TOK.special_id("<|python_end|>")]:
        tool.observe(t)
    forced = []
    while (t := tool.next_forced()) is not None:
        forced.append(t)
    assert forced[0] == TOK.special_id("<|output_start|>") and forced[-1] == TOK.special_id("<|output_end|>")
    assert TOK.decode(forced[1:-1]).startswith("error: only numbers")
    tool.observe(TOK.special_id("<|python_end|>"))  # an end without a start forces nothing
    assert tool.next_forced() is None


def test_reply_stream_never_shows_broken_utf8():
    engine = Engine(tiny_gpt(), TOK)
    stream = ReplyStream(engine)
    pieces = [stream.feed(t) for t in TOK.encode("héllo ✓")]
    assert "".join(pieces) == "héllo ✓" and not any("\ufffd" in p for p in pieces)
    assert stream.feed(TOK.special_id("<|assistant_end|>")) == ""
    assert stream.finish()["content"] == [{"type": "text", "text": "héllo ✓"}]


def test_bad_requests_are_refused_clearly():
    model = tiny_vlm()
    engine = Engine(model, TOK)
    n_vis, size = engine.num_vision_tokens, model.vision_config.image_size
    with pytest.raises(ValueError, match="image-token positions"):
        engine.complete([prompt_ids("hi", 1, n_vis)], [[]], max_new_tokens=2)
    with pytest.raises(ValueError, match="context"):
        engine.complete([[1] * model.config.max_seq_len], max_new_tokens=2)
    with pytest.raises(ValueError, match="temperature"):
        engine.complete([[1, 2]], max_new_tokens=2, temperature=-1.0)
    img = torch.zeros(3, size, size)
    with pytest.raises(ValueError, match="1 images were given"):
        fit_prompt(engine, [user_message("hi")], [img], 10)


def test_long_conversations_drop_the_oldest_turns():
    engine = Engine(tiny_gpt(), TOK)  # context 256 tokens; the byte tokenizer spends one per character
    turn = "x" * 60
    messages = []
    for _ in range(4):
        messages += [user_message(turn), {"role": "assistant", "content": [{"type": "text", "text": turn}]}]
    messages.append(user_message("and now?"))
    ids, _, dropped = fit_prompt(engine, messages, [], reply_tokens=64)
    assert dropped > 0 and dropped % 2 == 0 and len(ids) <= engine.max_seq_len - 64
    assert ids == TOK.render_for_completion({"messages": messages[dropped:]})
    with pytest.raises(ContextTooLong, match="context holds 256"):
        fit_prompt(engine, [user_message("y" * 300)], [], reply_tokens=64)


def test_continuous_batching_rows_equal_solo_generation():
    """Requests of different lengths, with 0-2 images, joining and leaving a batcher with fewer rows
    than requests: each gets exactly its solo greedy tokens, and a seeded sampled request its solo draw."""
    import threading

    from ghostvis.infer.batching import Batcher, Request

    model = tiny_vlm()
    engine = Engine(model, TOK)
    n_vis, size = engine.num_vision_tokens, model.vision_config.image_size
    torch.manual_seed(1)
    imgs = [torch.randn(3, size, size) for _ in range(3)]
    cases = [(prompt_ids("hello", 0), [], 0.0), (prompt_ids("what is in this picture?", 1, n_vis), imgs[:1], 0.0),
             (prompt_ids("a" * 40), [], 0.0), (prompt_ids("two", 2, n_vis), imgs[1:], 0.0),
             (prompt_ids("sampled", 0), [], 0.9)]
    solo = [engine.complete([p], [im], max_new_tokens=10 + i, temperature=t, seed=7).pop().tokens
            for i, (p, im, t) in enumerate(cases)]
    batcher = Batcher(engine, max_batch=3, max_queue=len(cases))
    got, done = [[] for _ in cases], [threading.Event() for _ in cases]

    def emit(i):
        def on_update(update):
            if update.token is not None:
                got[i].append(update.token)
            if update.finish:
                done[i].set()
        return on_update

    for i, (p, im, t) in enumerate(cases):
        batcher.submit(Request(p, im, emit(i), max_new_tokens=10 + i, temperature=t, seed=7))
    batcher.start()
    try:
        assert all(d.wait(120) for d in done)
    finally:
        batcher.stop()
    assert got == solo


@pytest.mark.parametrize("preset,depth", [("vlm_tiny", None), ("vlm_small", 3)])
def test_random_chat_models_take_framed_images(preset, depth):
    """The stand-in models of load tests frame images as their presets do (Idefics3's, Idefics2's), and a
    reply can never sample an image token or its frame."""
    from ghostvis.infer.chat import random_chat_model

    chat = random_chat_model(preset, depth=depth)
    engine, tok = chat.engine, chat.engine.tokenizer
    size = engine.model.vision_config.image_size
    ids, kept, _ = fit_prompt(engine, [user_message("what colour?", 1)], [torch.zeros(3, size, size)], reply_tokens=8)
    assert tok.special_id("<|image_frame|>") in ids and len(kept) == 1
    assert sorted(engine.never_sampled.tolist()) == sorted(
        tok.special_id(name) for name in ("<|image|>", "<|image_frame|>", "<|image_global|>"))
    [done] = engine.complete([ids], [kept], max_new_tokens=4, temperature=0.0, stop_ids=[])
    assert not set(done.tokens) & set(engine.never_sampled.tolist())


def test_fitting_keeps_the_system_message_and_its_images():
    engine = Engine(tiny_vlm(), TOK)
    n_vis, size = engine.num_vision_tokens, 64
    imgs = [torch.full((3, size, size), float(i)) for i in range(3)]
    system = {"role": "system", "content": [{"type": "text", "text": "be brief"}]}
    messages = [system, user_message("x" * 80, 1), {"role": "assistant", "content": [{"type": "text", "text": "y" * 80}]},
                user_message("look", 2)]
    ids, kept, dropped = fit_prompt(engine, messages, imgs, reply_tokens=64)
    assert dropped == 2 and [int(k[0, 0, 0]) for k in kept] == [1, 2]
    assert ids == TOK.render_for_completion({"messages": [system, messages[-1]]}, n_vis, engine.image_frame)


def test_stop_text_holds_back_a_possible_stop_string():
    from ghostvis.infer.openai_api import StopText

    stop = StopText(["END", "xyz"])
    shown = [stop.feed(p) for p in ["abc E", "N", "D more"]]
    assert "".join(shown) == "abc " and stop.stopped
    free = StopText([])
    assert free.feed("a") + free.feed("b", final=True) == "ab" and not free.stopped


def test_server_decodes_only_the_images_the_fitted_prompt_keeps():
    """A long history with an image in every turn: the prompt is fitted first, so only the kept turns' images
    are read and decoded (a broken image in a dropped turn is never touched), and errors keep the request's
    image numbers."""
    import base64

    from ghostvis.infer.openai_api import APIError, parse_chat_request, prepare_prompt
    from ghostvis.vision.transforms import BadImage

    engine = Engine(tiny_vlm(), TOK)  # context 256, 16 vision tokens per image
    size = engine.model.vision_config.image_size

    def turn(text, k):
        url = "data:image/png;base64," + base64.b64encode(f"image {k}".encode()).decode()
        return {"role": "user", "content": [{"type": "text", "text": text}, {"type": "image_url", "image_url": {"url": url}}]}

    raw = []
    for k in range(6):
        raw += [turn("x" * 60, k), {"role": "assistant", "content": "y" * 60}]
    raw.append(turn("and this one?", 6))
    req = parse_chat_request({"messages": raw}, max_tokens_cap=32, default_temperature=0.0)
    decoded = []

    def preprocess(data: bytes) -> torch.Tensor:
        decoded.append(data.decode())
        if data == b"image 0":
            raise BadImage("broken")  # only if it were decoded
        return torch.full((3, size, size), float(len(decoded)))

    ids, images = prepare_prompt(engine, req, preprocess, None, 1 << 20, context=256)
    assert decoded == ["image 5", "image 6"] and len(images) == 2  # the last pair's image and the new one
    expected, _, _ = fit_prompt(engine, req.messages, [torch.zeros(1)] * 7, 32, 256)
    assert ids == expected and ids.count(TOK.image_token_id) == 2 * engine.num_vision_tokens

    def refuse_6(data: bytes) -> torch.Tensor:
        if data == b"image 6":
            raise BadImage("broken")
        return torch.zeros(3, size, size)

    with pytest.raises(APIError, match="image 6 is not a usable image: broken") as err:
        prepare_prompt(engine, req, refuse_6, None, 1 << 20, context=256)
    assert err.value.param == "image 6"

    # a text-only model says so before reading any url: a missing file under no --image-root is not the reason
    text_req = parse_chat_request({"messages": [{"role": "user", "content": [
        {"type": "text", "text": "what is this?"}, {"type": "image_url", "image_url": {"url": "/nowhere.png"}}]}]},
        max_tokens_cap=32, default_temperature=0.0)

    def text_only(data: bytes) -> torch.Tensor:
        raise ValueError("the checkpoint X is a text-only model (no vision tower)")

    with pytest.raises(APIError, match="text-only model") as err:
        prepare_prompt(Engine(tiny_gpt(), TOK), text_req, text_only, None, 1 << 20, context=256)
    assert err.value.param == "image 0"
