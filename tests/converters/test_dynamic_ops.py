"""Shape-dependent ops over dynamic dimensions, each through compile -> run at several sizes inside
the range vs eager (sizes computed in the network, none taken from the example)."""
from __future__ import annotations

import pytest
import torch

import refitcore


class Fn(torch.nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn
        self.w = torch.nn.Parameter(torch.randn(1, 16, 4))   # a table sliced to a run-time length

    def forward(self, x):
        return self.fn(self, x)


CASES = {
    "view-merge": (lambda m, x: x.view(x.shape[0] * x.shape[1], -1) * 2, (3, 5, 4), {0: (1, 4), 1: (2, 8)}),
    "flatten": (lambda m, x: torch.flatten(x, 1) + 1, (3, 5, 4), {0: (1, 4)}),
    "unsqueeze-squeeze": (lambda m, x: x.unsqueeze(1).squeeze(1) * 3, (3, 5, 4), {1: (2, 8)}),
    "split-heads": (lambda m, x: x.view(x.shape[0], x.shape[1], 2, 2).transpose(1, 2).reshape(x.shape[0], -1),
                    (3, 5, 4), {1: (2, 8)}),
    "slice-weight": (lambda m, x: x + m.w[:, :x.shape[1]], (2, 5, 4), {1: (2, 16)}),
    # (ranges from 3: torch.export refuses ranges where the slice could have size 1 or 2)
    "slice-from-end": (lambda m, x: x[:, -2:] * 2, (2, 5, 4), {1: (3, 8)}),
    "slice-drop-last": (lambda m, x: x[:, :-1] * 2, (2, 5, 4), {1: (3, 8)}),
    "slice-step": (lambda m, x: x[:, ::2] * 2, (2, 5, 4), {1: (3, 8)}),
    "select": (lambda m, x: x[:, 0] * 2, (2, 5, 4), {1: (2, 8)}),
    "expand": (lambda m, x: x[:, :1].expand(-1, x.shape[1], -1) + x, (2, 5, 4), {1: (2, 8)}),
    "arange": (lambda m, x: x + torch.arange(x.shape[1], dtype=torch.float32)[None, :, None], (2, 5, 4), {1: (2, 8)}),
    "arange-start-step": (lambda m, x: x + torch.arange(3, 3 + 2 * x.shape[1], 2, dtype=torch.float32)[None, :, None],
                          (2, 5, 4), {1: (2, 8)}),
    "ones": (lambda m, x: x * torch.ones(x.shape[0], x.shape[1], 1), (2, 5, 4), {0: (1, 4), 1: (2, 8)}),
    "full": (lambda m, x: x + torch.full((x.shape[1], 4), 0.5), (2, 5, 4), {1: (2, 8)}),
    "zeros-like": (lambda m, x: torch.zeros_like(x) + x * 2, (2, 5, 4), {1: (2, 8)}),
    "new-ones": (lambda m, x: x.new_ones(x.shape[0], x.shape[1]).unsqueeze(-1) * x, (2, 5, 4), {1: (2, 8)}),
    "causal-mask": (lambda m, x: (x @ x.transpose(1, 2)).masked_fill(
        torch.arange(x.shape[1])[None, :] > torch.arange(x.shape[1])[:, None], -1e9).softmax(-1), (2, 5, 4),
        {1: (2, 8)}),
    "sdpa-bool-mask": (lambda m, x: torch.nn.functional.scaled_dot_product_attention(
        x, x, x, attn_mask=torch.arange(x.shape[1])[None, :] < x.shape[1] - 1), (2, 5, 4), {1: (2, 8)}),
    "index-every-axis": (lambda m, x: x.sum(-1)[torch.arange(x.shape[0])[:, None, None],
                                                torch.arange(x.shape[1])[None, None, :]] * 2,
                         (2, 5, 4), {0: (1, 4), 1: (2, 8)}),
    "size-as-number": (lambda m, x: x / x.shape[1], (2, 5, 4), {1: (2, 8)}),
    "cat-dynamic": (lambda m, x: torch.cat([x, x * 2], dim=1), (2, 5, 4), {1: (2, 8)}),
    "layer-norm": (lambda m, x: torch.nn.functional.layer_norm(x, (4,)), (2, 5, 4), {0: (1, 4), 1: (2, 8)}),
}


@pytest.mark.parametrize("name", list(CASES))
def test_dynamic_op_matches_eager_across_the_range(name):
    fn, shape, dims = CASES[name]
    torch.manual_seed(0)
    model = Fn(fn).eval()
    engine = refitcore.compile(model, torch.randn(*shape), backend="reference", dynamic_shapes={0: dims})
    sizes = [{d: r[0] for d, r in dims.items()}, {d: r[1] for d, r in dims.items()},
             {d: (r[0] + r[1]) // 2 + 1 for d, r in dims.items()}]
    for chosen in sizes:
        s = list(shape)
        for d, n in chosen.items():
            s[d] = n
        x = torch.randn(*s)
        with torch.no_grad():
            want = model(x)
        got = engine(x)
        assert got.shape == want.shape, (name, s)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=lambda m, s=s: f"{name} at {s}: {m}")


def test_two_index_tensors_over_every_axis_match_eager():
    """x[i, j] with one index tensor per axis (static shapes): a gather at the linear index."""
    model = Fn(lambda m, x: x[x.argmax(0), x.argmin(1)] * 2).eval()
    x = torch.randn(5, 5)
    engine = refitcore.compile(model, x, backend="reference")
    for _ in range(3):
        x = torch.randn(5, 5)
        torch.testing.assert_close(engine(x), model(x))
