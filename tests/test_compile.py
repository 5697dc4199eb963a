"""torch.compile must not change what trains: compiled and eager values and gradients agree.

The fused head + loss (`linear_cross_entropy`, an autograd.Function) once wrote its output in place; under
torch 2.11's compiler that routed the gradient to a phantom alias and every gradient upstream came back
zero, so `--compile` trained nothing on the GPU (docs/training.md, "torch.compile"). Newer torch builds
compile it correctly either way, so these tests fail on the old code only under an affected torch; the GPU
check (`launch/train.py --compile` loss falling, and the benches' learning check) covers the rest. A compiled model
now runs that loss eagerly (its chunking's memory), and the Function's own compile is still tested.
"""

from __future__ import annotations

import pytest
import torch

from ghostvis.model.linear_ce import IGNORE_INDEX, traceable_linear_cross_entropy
from tests.conftest import tiny_gpt

BACKENDS = ["aot_eager", "inductor"]


def _loss_and_grads(fn, x: torch.Tensor, w: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, ...]:
    x, w = x.detach().clone().requires_grad_(True), w.detach().clone().requires_grad_(True)
    per_token = fn(x, w, targets)
    # weighted so that every token's gradient differs (a plain mean would hide a permutation)
    weights = torch.linspace(0.5, 1.5, per_token.numel()).view_as(per_token)
    (per_token * weights).sum().backward()
    return per_token.detach(), x.grad, w.grad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("softcap", [None, 15.0])
def test_compiled_fused_loss_matches_eager(backend: str, softcap: float | None) -> None:
    torch.manual_seed(0)
    n, d, vocab, padded = 48, 16, 50, 64
    x, w = torch.randn(n, d), torch.randn(padded, d) * 0.5
    targets = torch.randint(0, vocab, (n,))
    targets[::7] = IGNORE_INDEX

    def fused(x: torch.Tensor, w: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        # the Function traced, as a compile of it would (the model runs it eagerly); 10 rows per chunk: several
        # chunks, the last one short
        return traceable_linear_cross_entropy(x, w, t, vocab_size=vocab, softcap=softcap,
                                              chunk_elements=10 * padded)

    torch._dynamo.reset()
    eager = _loss_and_grads(fused, x, w, targets)
    compiled = _loss_and_grads(torch.compile(fused, backend=backend, fullgraph=True), x, w, targets)
    for name, a, b in zip(("loss", "grad x", "grad w"), eager, compiled):
        assert b.abs().sum() > 0, f"compiled {name} is all zero"
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=f"compiled {name} differs from eager")


def test_compiled_gpt_leaves_the_chunked_loss_eager() -> None:
    """Inductor would unroll the loss's chunk loop and hold every chunk's logits at once (the memory the chunking
    saves: bench/loss_memory.py), so a compiled model must run the fused loss outside its graphs."""
    graphs: list[torch.fx.GraphModule] = []

    def recording(gm: torch.fx.GraphModule, example_inputs: list) -> object:
        graphs.append(gm)
        return gm.forward

    torch.manual_seed(0)
    model = tiny_gpt()
    idx = torch.randint(0, model.config.vocab_size, (2, 24))
    torch._dynamo.reset()
    loss = torch.compile(model, backend=recording)(idx, idx)
    loss.backward()
    assert graphs, "nothing was compiled"
    traced = [n.target for g in graphs for n in g.graph.nodes if "autograd_function_apply" in str(n.target)]
    assert not traced, f"the fused loss was traced into a compiled graph ({traced})"
    assert all(p.grad is not None for p in model.parameters()), "a parameter got no gradient across the break"


def test_compiled_gpt_gradients_match_eager() -> None:
    """Every parameter's gradient of a compiled GPT (its fused head + loss runs eagerly) equals eager's."""
    torch.manual_seed(0)
    model = tiny_gpt()
    idx = torch.randint(0, model.config.vocab_size, (2, 24))
    targets = torch.randint(0, model.config.vocab_size, (2, 24))
    targets[:, :3] = IGNORE_INDEX

    def grads(fwd) -> dict[str, torch.Tensor]:
        model.zero_grad(set_to_none=True)
        fwd(idx, targets).backward()
        return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    torch._dynamo.reset()
    eager = grads(model)
    compiled = grads(torch.compile(model, backend="aot_eager"))
    assert eager.keys() == compiled.keys()
    zero = [n for n, g in compiled.items() if g.abs().sum() == 0]
    assert not zero, f"compiled gradients are zero for {zero[:5]}"
    for n in eager:
        torch.testing.assert_close(compiled[n], eager[n], rtol=1e-4, atol=1e-5, msg=f"compiled grad of {n}")
