"""The vision tower's attention in one call per block (ssrl.padded_vision_attention, what CUDA runs without
flash-attn) against transformers' loop over windows (what SDPA runs): the same values and gradients for both
families, prompts of 1-5 images of different sizes, Qwen2.5-VL's windowed and full-attention blocks both."""
import random

import pytest
import torch

import grpo
import ssrl
from tests.helpers import make_record, tiny_model

# images from 56 to 336 px: Qwen2.5-VL's 112-px windows come whole and cut at the edges, and a full-attention block
# sees images from 16 to ~560 patches
SIZES = ((56, 56), (336, 252), (112, 84), (168, 308), (224, 224), (98, 70), (252, 140))


def tower_outputs(model, batch, seed=0):
    """Merged vision features and the gradients of a random projection of them (pixels and every tower weight)."""
    visual = model.model.visual
    visual.zero_grad()
    pixels = batch["pixel_values"].clone().requires_grad_(True)
    out = visual(pixels, grid_thw=batch["image_grid_thw"]).pooler_output
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed))
    (out * upstream).sum().backward()
    grads = {name: p.grad.clone() for name, p in visual.named_parameters() if p.grad is not None}
    return out.detach(), pixels.grad, grads


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_one_call_per_block_equals_the_window_loop(family, monkeypatch):
    model, processor = tiny_model(family)
    rng = random.Random(3)
    records, images = zip(*[make_record(rng, count, sizes=[rng.choice(SIZES) for _ in range(count)])
                            for count in (1, 2, 3, 4, 5)])
    batch = grpo.encode_prompts(processor, list(records), list(images), 56 * 56, 336 * 336)
    assert batch["image_grid_thw"].shape[0] == 15 and batch["image_grid_thw"][:, 1:].prod(-1).max() >= 300
    loop = tower_outputs(model, batch)
    calls = []
    real_sdpa = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda *a, **k: calls.append(a[0].shape) or real_sdpa(*a, **k))
    one_call = tower_outputs(ssrl.use_padded_vision_attention(model), batch)
    blocks = len(model.model.visual.blocks)
    assert blocks <= len(calls) <= 2 * blocks           # a second call only where one image dwarfs the others
    for reference, value in zip(loop[:2], one_call[:2]):
        assert (reference - value).abs().max() <= 1e-5 * reference.abs().max()
    assert loop[2].keys() == one_call[2].keys() and len(loop[2]) > 40
    for name, reference in loop[2].items():
        assert (reference - one_call[2][name]).abs().max() <= 1e-5 * reference.abs().max(), name


def test_windows_of_one_size_take_one_call_and_a_dwarfing_image_its_own():
    query = torch.randn(1, 2, 700, 8)
    calls = []
    real_sdpa = torch.nn.functional.scaled_dot_product_attention

    def counting(*args, **kwargs):
        calls.append(args[0].shape[:3])
        return real_sdpa(*args, **kwargs)

    torch.nn.functional.scaled_dot_product_attention, saved = counting, real_sdpa
    try:
        for lengths, expected in (([64] * 9 + [32, 16, 16, 16], [(13, 2, 64)]),
                                  ([500, 40, 40, 40, 40, 40], [(2, 2, 500), (4, 2, 40)])):
            calls.clear()
            cu = torch.tensor([0] + lengths).cumsum(0)
            part = query[:, :, :int(cu[-1])]
            out, _ = ssrl.padded_vision_attention(None, part, part, part, scaling=0.3, cu_seq_lens_q=cu)
            assert calls == expected
            for begin, end in zip(cu.tolist(), cu.tolist()[1:]):     # each window attends to itself only
                window = part[:, :, begin:end]
                alone = real_sdpa(window, window, window, scale=0.3).transpose(1, 2)
                assert torch.allclose(out[:, begin:end], alone, atol=1e-6)
    finally:
        torch.nn.functional.scaled_dot_product_attention = saved
