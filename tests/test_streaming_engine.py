"""StreamingModule equals plain autograd: output, every parameter gradient and the input gradient."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from slidestream.errors import StreamingError
from slidestream.streaming import (
    StagedStreamingModule,
    StreamingModule,
    check_streamable,
    trunk_geometry,
)
from slidestream.streaming.check import randomize_norms
from slidestream.streaming.tiling import AxisGeometry, TrunkGeometry

torch.set_num_threads(1)
TOL = 1e-10  # float64, relative to the largest reference value of each tensor


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).item()


def compare(trunk, x, tile, **kwargs) -> dict[str, float]:
    """Max relative errors of streaming vs conventional for output, each param, and x.grad."""
    trunk = trunk.double()
    trunk.zero_grad(set_to_none=True)
    x = x.double().requires_grad_(True)
    ref = trunk(x)
    w = torch.randn_like(ref)
    (ref * w).sum().backward()
    ref_grads = {n: p.grad.clone() for n, p in trunk.named_parameters()}
    ref_x = x.grad.clone()
    trunk.zero_grad(set_to_none=True)
    x.grad = None
    out = StreamingModule(trunk, tile, **kwargs)(x)
    (out * w).sum().backward()
    errs = {"output": _rel(out, ref), "x": _rel(x.grad, ref_x)}
    for n, p in trunk.named_parameters():
        errs[n] = _rel(p.grad, ref_grads[n])
    return errs


def assert_exact(trunk, shape=(2, 3, 45, 37), tile=8, **kwargs) -> None:
    torch.manual_seed(0)
    randomize_norms(trunk.eval())
    errs = compare(trunk, torch.randn(shape), tile, **kwargs)
    bad = {k: v for k, v in errs.items() if not v <= TOL}
    assert not bad, bad


class Residual(nn.Module):
    def __init__(self, c: int, stride: int = 1):
        super().__init__()
        self.a = nn.Conv2d(c, c, 3, stride, 1)
        self.bn = nn.BatchNorm2d(c)
        self.b = nn.Conv2d(c, c, 3, 1, 1)
        self.down = nn.Conv2d(c, c, 1, stride) if stride > 1 else nn.Identity()

    def forward(self, x):
        return torch.relu(self.down(x) + self.b(torch.relu(self.bn(self.a(x)))))


class ConvNeXtLike(nn.Module):
    """Depthwise 7x7 conv, channels-last LayerNorm and pointwise Linear layers."""

    def __init__(self, c: int):
        super().__init__()
        self.dw = nn.Conv2d(c, c, 7, padding=3, groups=c)
        self.norm = nn.LayerNorm(c)
        self.fc = nn.Linear(c, 2 * c)
        self.fc2 = nn.Linear(2 * c, c)

    def forward(self, x):
        y = self.dw(x).permute(0, 2, 3, 1)
        y = self.fc2(nn.functional.gelu(self.fc(self.norm(y))))
        return x + y.permute(0, 3, 1, 2)


LAYERS = {
    "conv5_s2_p2": lambda: nn.Sequential(nn.Conv2d(3, 4, 5, 2, 2), nn.ReLU(), nn.Conv2d(4, 4, 3, 1, 1)),
    "conv3_s3_nopad": lambda: nn.Sequential(nn.Conv2d(3, 4, 3, 3), nn.Conv2d(4, 4, 3)),
    "conv_dilated": lambda: nn.Sequential(nn.Conv2d(3, 4, 3, padding=2, dilation=2), nn.Conv2d(4, 4, 3, padding=3, dilation=3)),
    "conv_groups": lambda: nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, 2, 1, groups=4)),
    "conv_asym": lambda: nn.Sequential(nn.Conv2d(3, 4, (3, 5), (1, 2), (1, 2)), nn.Conv2d(4, 4, (5, 1), padding=(2, 0))),
    "conv1x1_s2_skips_pixels": lambda: nn.Sequential(nn.Conv2d(3, 4, 1, 2), nn.Conv2d(4, 4, 3, padding=1)),
    "maxpool": lambda: nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.MaxPool2d(3, 2, 1), nn.Conv2d(4, 4, 3)),
    "maxpool_ceil": lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.MaxPool2d(2, ceil_mode=True), nn.Conv2d(4, 4, 3, padding=1)),
    "avgpool": lambda: nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.AvgPool2d(3, 2, 1, count_include_pad=False), nn.ELU()),
    "activations": lambda: nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.GELU(), nn.Conv2d(4, 4, 3, padding=1), nn.SiLU(), nn.Hardswish(), nn.Conv2d(4, 4, 1), nn.ReLU6()),
    "batchnorm_eval": lambda: nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3, 2, 1), nn.BatchNorm2d(4)),
    "residual": lambda: nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), Residual(4), Residual(4, stride=2)),
    "convnext_layernorm": lambda: nn.Sequential(nn.Conv2d(3, 4, 2, 2), ConvNeXtLike(4)),
    "instancenorm_running": lambda: nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.InstanceNorm2d(4, affine=True, track_running_stats=True)),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_exact_per_layer_type(name):
    assert_exact(LAYERS[name](), tile=9 if name == "conv3_s3_nopad" else 8)


@pytest.mark.parametrize("shape", [(1, 3, 33, 65), (2, 3, 50, 21), (3, 3, 17, 17)])
def test_exact_odd_sizes_and_batches(shape):
    trunk = nn.Sequential(nn.Conv2d(3, 4, 3, 2, 1), nn.BatchNorm2d(4), nn.ReLU(), Residual(4, 2))
    assert_exact(trunk, shape=shape, tile=8)


def test_exact_with_single_tile_and_tile_larger_than_image():
    assert_exact(LAYERS["residual"](), shape=(2, 3, 30, 20), tile=64)


def test_forward_without_grad_matches():
    trunk = LAYERS["maxpool"]().double().eval()
    x = torch.randn(1, 3, 40, 30, dtype=torch.float64)
    with torch.no_grad():
        out = StreamingModule(trunk, 8)(x)
    # equal up to float64 rounding (oneDNN may pick a different conv kernel for a crop's shape)
    torch.testing.assert_close(out, trunk(x).detach(), rtol=1e-12, atol=1e-12)


class _Custom(nn.Sequential):
    def forward(self, x):
        return super().forward(x)


def test_too_small_margin_gives_wrong_gradients_and_is_refused():
    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Conv2d(3, 4, 5, padding=2), nn.ReLU(), nn.Conv2d(4, 4, 5, padding=2))
    measured = trunk_geometry(trunk, 3)
    shrink = AxisGeometry(1, measured.y.lo + 2, measured.y.hi - 2)
    small = TrunkGeometry(shrink, shrink)
    unchecked = {"verify_geometry": False, "check_first_use": False}
    errs = compare(trunk, torch.randn(1, 3, 40, 40), 8, geometry=small, **unchecked)
    assert errs["0.weight"] > 1e-3 and errs["output"] > 1e-3  # the comparison bites
    with pytest.raises(StreamingError, match="smaller than the trunk needs"):
        StreamingModule(trunk, 8, geometry=small)(torch.randn(1, 3, 40, 40, dtype=torch.float64))
    # the first-use check alone catches the same too-small margins (of a trunk it checks:
    # one with a module outside torch.nn)
    custom = _Custom(*trunk)
    with pytest.raises(
        StreamingError, match=r"test image the streamed .* is off ordinary backprop"
    ):
        StreamingModule(custom, 8, geometry=small, verify_geometry=False)(torch.randn(1, 3, 40, 40))
    assert max(compare(trunk, torch.randn(1, 3, 40, 40), 8, geometry=measured).values()) <= TOL


def _blob_image(shape=(2, 3, 96, 80), bg=1.0):
    x = torch.full(shape, bg, dtype=torch.float64)
    x[:, :, 10:30, 8:40] = torch.rand(shape[0], shape[1], 20, 32, dtype=torch.float64)
    return x


@pytest.mark.parametrize("input_grad", [True, False])
def test_background_skipping_is_exact_and_skips(input_grad):
    torch.manual_seed(0)
    trunk = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), Residual(4, 2)
    )
    trunk = trunk.double().eval()
    randomize_norms(trunk)
    x = _blob_image().requires_grad_(input_grad)
    ref = trunk(x)
    w = torch.randn_like(ref)
    (ref * w).sum().backward()
    ref_grads = [p.grad.clone() for p in trunk.parameters()]
    ref_x = x.grad.clone() if input_grad else None
    trunk.zero_grad(set_to_none=True)
    x.grad = None
    smod = StreamingModule(trunk, 8, background=1.0)
    out = smod(x)
    (out * w).sum().backward()
    stats = smod.last_stats
    assert stats["background_tiles"] > 0 and stats["crops_computed"] < stats["tiles"] / 2
    assert _rel(out, ref) <= TOL
    assert max(_rel(p.grad, g) for p, g in zip(trunk.parameters(), ref_grads, strict=True)) <= TOL
    if input_grad:
        assert _rel(x.grad, ref_x) <= TOL


def test_background_mask_paints_masked_pixels():
    torch.manual_seed(0)
    trunk = LAYERS["residual"]().double().eval()
    x = torch.rand(1, 3, 64, 64, dtype=torch.float64)
    mask = torch.zeros(64, 64, dtype=torch.bool)
    mask[:, 30:] = True
    smod = StreamingModule(trunk, 8, background=(0.5, 0.5, 0.5))
    out = smod(x, background_mask=mask)
    painted = torch.where(mask, torch.tensor(0.5, dtype=torch.float64), x)
    assert _rel(out, trunk(painted)) <= TOL
    assert smod.last_stats["background_tiles"] > 0
    with pytest.raises(StreamingError, match="bool tensor of shape"):
        smod(x, background_mask=mask[:10])


def test_uint8_input_normalised_per_tile():
    torch.manual_seed(0)
    trunk = LAYERS["batchnorm_eval"]().double().eval()
    x = torch.randint(0, 256, (1, 3, 40, 36), dtype=torch.uint8)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    smod = StreamingModule(trunk, 8, mean=mean, std=std, input_scale=1 / 255)
    out = smod(x)
    m, s = (torch.tensor(v, dtype=torch.float64).view(1, 3, 1, 1) for v in (mean, std))
    ref_in = (x.double() * (1 / 255) - m) / s
    ref = trunk(ref_in)
    w = torch.randn_like(ref)
    (ref * w).sum().backward()
    ref_grads = [p.grad.clone() for p in trunk.parameters()]
    trunk.zero_grad(set_to_none=True)
    (out * w).sum().backward()
    assert _rel(out, ref) <= TOL
    assert max(_rel(p.grad, g) for p, g in zip(trunk.parameters(), ref_grads, strict=True)) <= TOL


def test_channels_last_exact():
    assert_exact(LAYERS["residual"](), tile=8, channels_last=True)


def test_autocast_bfloat16_with_grad_scaler():
    torch.manual_seed(0)
    trunk = LAYERS["batchnorm_eval"]().float().eval()
    x = torch.randn(1, 3, 48, 40)
    grads = []
    for streamed in (False, True):
        trunk.zero_grad(set_to_none=True)
        scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
        model = StreamingModule(trunk, 8) if streamed else trunk
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
            loss = out.float().square().mean()
        assert out.dtype == torch.bfloat16
        scaler.scale(loss).backward()
        grads.append([p.grad.float() / 1024.0 for p in trunk.parameters()])
    for a, b in zip(*grads, strict=True):
        assert _rel(a, b) < 5e-2


REFUSED = [
    (nn.BatchNorm2d(4).train(), "BatchNorm2d.*training mode|batch statistics"),
    (nn.GroupNorm(2, 4), "GroupNorm"),
    (nn.AdaptiveAvgPool2d(1), "AdaptiveAvgPool2d"),
    (nn.Flatten(), "Flatten"),
    (nn.Dropout(0.5).train(), "dropout in training mode"),
    (nn.InstanceNorm2d(4), "instance statistics"),
    (nn.LayerNorm([4, 8, 8]), "LayerNorm over more"),
]


@pytest.mark.parametrize(("layer", "message"), REFUSED)
def test_refuses_non_local_modules_by_name(layer, message):
    trunk = nn.Sequential(nn.Conv2d(3, 4, 3), layer)
    with pytest.raises(StreamingError, match=r"cannot stream module '1'"):
        check_streamable(trunk)
    with pytest.raises(StreamingError, match=message):
        StreamingModule(trunk, 8)(torch.randn(1, 3, 16, 16))


def test_refuses_attention_and_accepts_eval_dropout():
    with pytest.raises(StreamingError, match="attention"):
        check_streamable(nn.ModuleList([nn.MultiheadAttention(4, 2)]))
    check_streamable(
        nn.Sequential(nn.Conv2d(3, 4, 3), nn.Dropout(0.5).eval(), nn.BatchNorm2d(4).eval())
    )


def test_rejects_bad_arguments():
    trunk = nn.Sequential(nn.Conv2d(3, 4, 3, 2))
    with pytest.raises(StreamingError, match="tile_size must be a multiple of 2, got 7"):
        StreamingModule(trunk, 7)(torch.randn(1, 3, 16, 16))
    with pytest.raises(StreamingError, match=r"\(N, C, H, W\)"):
        StreamingModule(trunk, 8)(torch.randn(3, 16, 16))
    with pytest.raises(StreamingError, match="both mean and std"):
        StreamingModule(trunk, 8, mean=(0, 0, 0))


def _staged_trunk() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, 2, 1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        Residual(4, 2),
        Residual(4),
        nn.Conv2d(4, 4, 3, 2, 1),
        Residual(4),
    )


@pytest.mark.parametrize("split", [["3"], ["2", "4"]])
def test_staged_streaming_is_exact(split):
    torch.manual_seed(0)
    trunk = _staged_trunk().double().eval()
    randomize_norms(trunk)
    x = torch.randn(2, 3, 75, 61, dtype=torch.float64, requires_grad=True)
    ref = trunk(x)
    w = torch.randn_like(ref)
    (ref * w).sum().backward()
    ref_grads = [p.grad.clone() for p in trunk.parameters()]
    ref_x = x.grad.clone()
    trunk.zero_grad(set_to_none=True)
    x.grad = None
    smod = StagedStreamingModule(trunk, 16, split)
    out = smod(x)
    (out * w).sum().backward()
    assert len(smod.last_stats) == len(split) + 1
    assert all(st["tiles"] > 1 for st in smod.last_stats)
    assert _rel(out, ref) <= TOL and _rel(x.grad, ref_x) <= TOL
    assert max(_rel(p.grad, g) for p, g in zip(trunk.parameters(), ref_grads, strict=True)) <= TOL


def test_staged_streaming_checks_arguments():
    trunk = _staged_trunk().double().eval()
    with pytest.raises(StreamingError, match="split_after must name children"):
        StagedStreamingModule(trunk, 16, ["nope"])
    with pytest.raises(StreamingError, match="tile_size must be a multiple of 8, got 12"):
        StagedStreamingModule(trunk, 12, ["3"])(torch.randn(1, 3, 40, 40, dtype=torch.float64))


def test_double_backward_is_refused():
    trunk = nn.Sequential(nn.Conv2d(3, 2, 3, padding=1)).double()
    x = torch.randn(1, 3, 16, 16, dtype=torch.float64, requires_grad=True)
    out = StreamingModule(trunk, 8)(x)
    with pytest.raises(StreamingError, match="double backward"):
        torch.autograd.grad(out.square().sum(), x, create_graph=True)
