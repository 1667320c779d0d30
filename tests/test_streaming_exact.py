"""Issue #21: every trunk is streamed exactly (float64, 1e-10) or refused in one line.

Each kind of the issue's table (large dilations, wrap-around padding, inner upsampling, NaN-
hiding activations, pixel (un)shuffle, odd strides) with more cases of the same kind and exact
cases around them; every refusal's message is checked.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from slidestream.errors import StreamingError
from slidestream.streaming import StreamingModule
from slidestream.streaming.check import randomize_norms

torch.set_num_threads(1)
TOL = 1e-10


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).item()


def stream_errors(trunk: nn.Module, shape, tile, **kwargs) -> dict[str, float]:
    """Relative errors of the streamed output, input gradient and every parameter gradient."""
    torch.manual_seed(0)
    trunk = trunk.double().eval()
    randomize_norms(trunk)
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    ref = trunk(x)
    w = torch.randn_like(ref)
    params = list(trunk.parameters())
    ref_g = torch.autograd.grad((ref * w).sum(), [x, *params])
    smod = StreamingModule(trunk, tile, **kwargs)
    out = smod(x)
    got_g = torch.autograd.grad((out * w).sum(), [x, *params])
    assert len(smod.plan(shape[1], tuple(shape[2:]))) > 1, "the case must use several tiles"
    errs = {"output": _rel(out, ref)}
    names = ["x", *(n for n, _ in trunk.named_parameters())]
    errs.update({n: _rel(a, b) for n, a, b in zip(names, got_g, ref_g, strict=True)})
    return errs


def assert_exact(trunk, shape, tile, **kwargs) -> None:
    errs = stream_errors(trunk, shape, tile, **kwargs)
    bad = {k: v for k, v in errs.items() if not v <= TOL}
    assert not bad, bad


def assert_refused(trunk, shape, tile, match: str) -> None:
    x = torch.randn(shape, dtype=torch.float64)
    with pytest.raises(StreamingError, match=match) as info:
        StreamingModule(trunk.double().eval(), tile)(x)
    assert "\n" not in str(info.value)


def _c(cin, cout, k=3, s=1, p=None, d=1, **kw):
    return nn.Conv2d(cin, cout, k, s, d * (k // 2) if p is None else p, dilation=d, **kw)


class Branch(nn.Module):
    """x + body(act(x)): a residual branch around an arbitrary activation function."""

    def __init__(self, c: int, act, d: int = 1):
        super().__init__()
        self.a, self.b, self.act = _c(c, c, d=d), _c(c, c), act

    def forward(self, x):
        return x + self.b(self.act(self.a(x)))


class ASPP(nn.Module):
    def __init__(self, c: int, rates=(1, 3, 6, 9)):
        super().__init__()
        self.branches = nn.ModuleList(_c(c, c, d=r) for r in rates)
        self.project = nn.Conv2d(c * len(rates), c, 1)

    def forward(self, x):
        return self.project(torch.cat([b(x) for b in self.branches], 1))


def _where_relu(y):
    return torch.where(y > 0, y, torch.zeros_like(y))  # NaN > 0 is False: NaN becomes 0


ACTS = {
    "where_relu": _where_relu,
    "where_leaky": lambda y: torch.where(y > 0, y, 0.1 * y),
    "masked": lambda y: y * (y > 0.2).to(y.dtype),
    "nan_to_num": lambda y: torch.nan_to_num(y, nan=0.0).clamp(-1, 1),
    "isnan_guard": lambda y: torch.where(torch.isnan(y), torch.zeros_like(y), y).clamp(min=0),
    "hardtanh": F.hardtanh,
}

# name: (trunk factory, input shape, tile (h, w))
EXACT = {
    # large dilations, stride 1 and > 1, and after strided layers (the probe must see them)
    "dil1300_s1": (lambda: nn.Sequential(_c(3, 2, d=1300), _c(2, 2)), (1, 3, 2800, 12), (640, 4)),
    "dil1300_valid": (lambda: nn.Sequential(nn.Conv2d(3, 2, (3, 1), dilation=(1300, 1))), (1, 3, 2700, 6), (96, 6)),
    "dil600_s2": (lambda: nn.Sequential(_c(3, 2, s=2, d=600)), (1, 3, 1500, 8), (200, 4)),
    "dil300_after_s2": (lambda: nn.Sequential(_c(3, 2, s=2), _c(2, 2, d=300)), (1, 3, 1400, 10), (200, 4)),
    "dil_after_s3_s2": (lambda: nn.Sequential(_c(3, 2, s=3), _c(2, 2, s=2, d=70)), (1, 3, 1000, 14), (120, 6)),
    "dil2_4_16": (lambda: nn.Sequential(_c(3, 4, d=2), nn.ReLU(), _c(4, 4, d=4), _c(4, 4, d=16)), (1, 3, 120, 90), (16, 16)),
    "aspp": (lambda: nn.Sequential(_c(3, 4, s=2), ASPP(4)), (1, 3, 80, 70), (16, 16)),
    "depthwise_dilated": (lambda: nn.Sequential(_c(3, 6), _c(6, 6, 5, d=3, groups=6), _c(6, 6, 1)), (1, 3, 70, 64), (16, 8)),
    "stride27": (lambda: nn.Sequential(_c(3, 2, s=3), _c(2, 2, s=3), _c(2, 2, s=3)), (1, 3, 300, 250), (54, 81)),
    "stride27_kernel": (lambda: nn.Sequential(nn.Conv2d(3, 2, 27, 27), _c(2, 2)), (1, 3, 300, 250), (54, 54)),
    # padding modes that read only near their edge are exact (wrap-around is refused below)
    "reflect": (lambda: nn.Sequential(_c(3, 4, padding_mode="reflect"), _c(4, 4, s=2, padding_mode="reflect")), (1, 3, 45, 37), (8, 8)),
    "replicate": (lambda: nn.Sequential(_c(3, 4, 5, padding_mode="replicate"), _c(4, 4, d=3, padding_mode="replicate")), (1, 3, 45, 37), (8, 8)),
    "reflection_pad": (lambda: nn.Sequential(nn.ReflectionPad2d((2, 1, 0, 3)), nn.Conv2d(3, 2, 3, 2)), (1, 3, 41, 39), (8, 8)),
    # inner upsampling on its own phase grid
    "convT_s2_after_s4": (lambda: nn.Sequential(_c(3, 4, s=4), nn.ConvTranspose2d(4, 4, 4, 2, 1)), (1, 3, 70, 62), (8, 8)),
    "convT_s3_p1_op2": (lambda: nn.Sequential(_c(3, 4, s=3), nn.ConvTranspose2d(4, 4, 3, 3, 1, output_padding=2), _c(4, 4)), (1, 3, 61, 52), (9, 9)),
    "convT_s2_p0_op1_d2": (lambda: nn.Sequential(_c(3, 4, s=4), nn.ConvTranspose2d(4, 4, 3, 2, 0, 1, dilation=2), _c(4, 4, s=2)), (1, 3, 67, 70), (8, 8)),
    "convT_first_then_s2": (lambda: nn.Sequential(nn.ConvTranspose2d(3, 4, 3, 2, 1, 1), _c(4, 4, s=2)), (1, 3, 33, 29), (6, 6)),
    "upsample_nearest2": (lambda: nn.Sequential(_c(3, 4, s=4), nn.Upsample(scale_factor=2), _c(4, 4)), (1, 3, 66, 58), (8, 8)),
    "upsample_nearest3": (lambda: nn.Sequential(_c(3, 4, s=6), nn.Upsample(scale_factor=3), _c(4, 4)), (1, 3, 75, 61), (8, 10)),
    "upsample_bilinear2": (lambda: nn.Sequential(_c(3, 4, s=4), nn.Upsample(scale_factor=2, mode="bilinear"), _c(4, 4)), (1, 3, 66, 58), (8, 8)),
    "upsample_bilinear3": (lambda: nn.Sequential(_c(3, 4, s=3), nn.Upsample(scale_factor=3, mode="bilinear"), _c(4, 4, s=2)), (1, 3, 62, 57), (8, 8)),
    "upsample_fits_grid": (lambda: nn.Sequential(_c(3, 4, s=2), _c(4, 4, s=2), nn.Upsample(scale_factor=2), _c(4, 4, s=2)), (1, 3, 70, 66), (8, 12)),
    # pixel (un)shuffle: crops on the unshuffle's grid with even lengths
    "unshuffle_shuffle": (lambda: nn.Sequential(nn.PixelUnshuffle(2), _c(12, 12), nn.PixelShuffle(2)), (1, 3, 42, 38), (8, 6)),
    "unshuffle3_shuffle3": (lambda: nn.Sequential(nn.PixelUnshuffle(3), _c(27, 27), nn.PixelShuffle(3)), (1, 3, 45, 36), (9, 12)),
    "conv_shuffle": (lambda: nn.Sequential(_c(3, 16, s=2), nn.PixelShuffle(2), _c(4, 4)), (1, 3, 41, 37), (8, 8)),
    **{
        f"residual_{k}": (lambda a=a: nn.Sequential(_c(3, 4), Branch(4, a), Branch(4, a, d=5)), (1, 3, 60, 52), (8, 8))
        for k, a in ACTS.items()
    },
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(EXACT))
def test_exact_or_refused_cases_are_exact(name):
    factory, shape, tile = EXACT[name]
    assert_exact(factory(), shape, tile)


class _Wrap(nn.Module):
    """x shifted by one column with wrap-around, hand-written (no op the analysis refuses)."""

    def forward(self, x):
        w = x.shape[-1]
        return torch.cat([x.narrow(3, 1, w - 1), x.narrow(3, 0, 1)], 3)


class _Coord(nn.Module):
    def forward(self, x):
        ramp = torch.linspace(0, 1, x.shape[-1], dtype=x.dtype).expand_as(x[:, :1])
        return torch.cat([x, ramp], 1)


class _FunctionalCircular(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 3)

    def forward(self, x):
        return self.conv(F.pad(x, (1, 1, 1, 1), mode="circular"))


class _Roll(nn.Module):
    def forward(self, x):
        return torch.roll(x, 1, dims=3)


class _SizeInterp(nn.Module):
    def forward(self, x):
        return F.interpolate(x, size=(x.shape[2] * 2, x.shape[3] * 2))


class _Slice(nn.Module):
    def forward(self, x):
        return x[..., 1:, :]


class _Train(nn.Module):
    """Keeps ``m`` in training mode when the trunk is put in eval mode."""

    def __init__(self, m: nn.Module):
        super().__init__()
        self.m = m

    def forward(self, x):
        return self.m.train()(x)


class _Softmax(nn.Module):
    def forward(self, x):
        return x.softmax(dim=-1)


REFUSED = {
    "circular": (nn.Sequential(_c(3, 2), _c(2, 2, padding_mode="circular")), r"module '1' \(Conv2d\): circular padding wraps"),
    "circular_functional": (nn.Sequential(_FunctionalCircular()), r"module '0' \(_FunctionalCircular\): circular padding"),
    "roll": (nn.Sequential(_c(3, 2), _Roll()), r"'1' \(_Roll\): torch.roll wraps around"),
    "coordconv": (nn.Sequential(_Coord(), _c(4, 2)), r"'0' \(_Coord\): torch.linspace builds a position-dependent"),
    "upsample_size": (nn.Sequential(_c(3, 2, s=2), nn.Upsample(size=(20, 20))), r"'1' \(Upsample\): interpolation to a given size"),
    "interp_size": (nn.Sequential(_c(3, 2, s=2), _SizeInterp()), r"'1' \(_SizeInterp\): interpolation to a given size"),
    "upsample_1.5": (nn.Sequential(_c(3, 2, s=2), nn.Upsample(scale_factor=1.5)), r"non-integer scale \(x3/2\)"),
    "align_corners": (nn.Sequential(_c(3, 2, s=2), nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True)), r"'1' \(Upsample\): align_corners=True"),
    "net_upsampling": (nn.Sequential(_c(3, 4), nn.Upsample(scale_factor=2)), r"output stride along y is 1/2 px, not a whole number"),
    "phase_3_2": (nn.Sequential(nn.Upsample(scale_factor=2), _c(3, 2, s=3)), r"output stride along y is 3/2 px"),
    "shuffle_first": (nn.Sequential(_c(3, 8, 1), nn.PixelShuffle(2)), r"output stride along y is 1/2 px"),
    "slicing": (nn.Sequential(_c(3, 2), nn.Identity(), _Slice()), r"'2' \(_Slice\): indexing or slicing a feature map"),
    "fractional_pool": (nn.Sequential(_c(3, 2), nn.FractionalMaxPool2d(2, output_ratio=0.5)), r"'1' \(FractionalMaxPool2d\): fractional max pooling"),
    "rrelu_train": (nn.Sequential(_c(3, 2), _Train(nn.RReLU())), r"'1.m' \(RReLU\): RReLU in training mode"),
    "global_softmax": (nn.Sequential(_c(3, 2), _Softmax()), r"not spatially local: .* probe"),
    "wraparound_by_hand": (nn.Sequential(_c(3, 2), _Wrap(), _c(2, 2)), r"first-use|test image the streamed .* is off ordinary backprop"),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_refusals_name_the_module_in_one_line(name):
    trunk, match = REFUSED[name]
    assert_refused(trunk, (1, 3, 40, 36), 8 if name != "phase_3_2" else 6, match)


def test_pixel_unshuffle_on_odd_image_is_a_streaming_error():
    trunk = nn.Sequential(nn.PixelUnshuffle(2), _c(12, 12), nn.PixelShuffle(2))
    assert_refused(trunk, (1, 3, 41, 38), 8, r"41|pixel_unshuffle|input size|cannot")


def test_first_use_check_is_what_catches_a_hand_written_wrap_around():
    trunk = nn.Sequential(_c(3, 2), _Wrap(), _c(2, 2))
    errs = stream_errors(trunk, (1, 3, 24, 40), 8, check_first_use=False)
    assert errs["output"] > 1e-3  # streaming it unchecked is silently wrong: the check must bite


def test_first_use_check_runs_once_per_trunk_and_tile_phase(monkeypatch):
    from slidestream.streaming import verify

    calls = []
    real = verify._check_axis
    monkeypatch.setattr(verify, "_check_axis", lambda *a: calls.append(a[-1]) or real(*a))
    trunk = nn.Sequential(_c(3, 4, s=2), Branch(4, torch.relu)).double().eval()
    x = torch.randn(1, 3, 40, 36, dtype=torch.float64)
    for tile in (8, 8, 16, 24):  # align 2: 8, 16 and 24 have the same phase
        StreamingModule(trunk, tile)(x)
    assert calls == [0, 1]  # once per axis
    StreamingModule(nn.Sequential(_c(3, 4, s=2), Branch(4, torch.relu)).double(), 8)(x)
    assert calls == [0, 1, 0, 1]  # another trunk
    StreamingModule(nn.Sequential(_c(3, 4, s=2), nn.ReLU(), _c(4, 4)).double(), 8)(x)
    assert calls == [0, 1, 0, 1]  # only torch.nn modules: trusted to the analysis


def test_unknown_module_names_custom_blocks_not_torchvision_ones():
    from torchvision.models.resnet import BasicBlock

    from slidestream.streaming.verify import unknown_module

    assert unknown_module(nn.Sequential(_c(3, 4), BasicBlock(4, 4), nn.ReLU())) is None
    assert unknown_module(nn.Sequential(_c(3, 4), Branch(4, F.relu))) == "'1' (Branch)"


def test_check_first_use_flag_reaches_the_slide_model():
    from slidestream.models.slide import SlideSpec, build_slide_model
    from slidestream.train.slide_config import SlideTrainConfig

    assert SlideTrainConfig(data="x.csv").check_streaming is True
    spec = SlideSpec(name="resnet18", stream_until="layer1", tile_size=64)
    assert build_slide_model(spec).stream.check_first_use is True
    model = build_slide_model(spec, check_first_use=False)
    assert model.stream.check_first_use is False
    model.configure(128)
    assert model.stream.check_first_use is False
