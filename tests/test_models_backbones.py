"""split_model: trunk + head equals the torchvision model; trunks stream exactly."""

from __future__ import annotations

import ast
import pathlib

import pytest
import torch
import torchvision
from torch import nn

from slidestream.errors import ConfigError
from slidestream.models import MODEL_NAMES, split_model, stage_names
from slidestream.streaming import StreamingModule
from slidestream.streaming.check import randomize_norms

torch.set_num_threads(1)
SRC = pathlib.Path(__file__).resolve().parents[1] / "src" / "slidestream"


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_trunk_then_head_equals_model(name):
    torch.manual_seed(0)
    trunk, head = split_model(name)
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(weights=None).eval()
    trunk.eval()
    head.eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(head(trunk(x)), model(x), atol=1e-6)


def test_trunk_norms_stay_frozen_but_trainable():
    trunk, head = split_model("resnet18", stream_until="layer2")
    trunk.train()
    bns = [m for m in trunk.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and not any(m.training for m in bns)
    assert all(p.requires_grad for p in trunk.parameters())
    assert any(isinstance(m, nn.BatchNorm2d) for m in head.modules())  # layer3/4 stay in the head


# (model, stream_until, tile px): shallow slices keep the float64 comparison fast.
SLICES = [
    ("resnet18", "layer1", 16),
    ("resnet50", "layer1", 16),
    ("densenet121", "transition1", 16),
    ("mobilenet_v2", "features.4", 16),
    ("convnext_tiny", "features.1", 16),
]


@pytest.mark.parametrize(("name", "until", "tile"), SLICES)
def test_streamed_trunk_slices_are_exact(name, until, tile):
    torch.manual_seed(0)
    trunk, _ = split_model(name, stream_until=until)
    trunk = trunk.double()
    randomize_norms(trunk)
    x = torch.randn(2, 3, 75, 59, dtype=torch.float64, requires_grad=True)
    ref = trunk(x)
    w = torch.randn_like(ref)
    (ref * w).sum().backward()
    ref_grads = [p.grad.clone() for p in trunk.parameters()]
    ref_x = x.grad.clone()
    trunk.zero_grad(set_to_none=True)
    x.grad = None
    out = StreamingModule(trunk, tile)(x)
    (out * w).sum().backward()
    rel = lambda a, b: ((a - b).abs().max() / b.abs().max()).item()  # noqa: E731
    assert rel(out, ref) <= 1e-10
    assert rel(x.grad, ref_x) <= 1e-10
    for p, g in zip(trunk.parameters(), ref_grads, strict=True):
        assert rel(p.grad, g) <= 1e-10


def test_weights_from_local_file(tmp_path):
    torch.manual_seed(1)
    model = torchvision.models.resnet18(weights=None)
    path = tmp_path / "r18.pt"
    torch.save(model.state_dict(), path)
    trunk, head = split_model("resnet18", weights=str(path), num_classes=3)
    assert torch.equal(trunk.conv1.weight, model.conv1.weight)
    assert head[-1].out_features == 3
    torch.save({"bogus": torch.zeros(1)}, tmp_path / "bad.pt")
    with pytest.raises(ConfigError, match=r"lack \d+ keys the model needs"):
        split_model("resnet18", weights=str(tmp_path / "bad.pt"))


def test_one_weights_loader_drops_the_declared_head_and_reports_keys(tmp_path, caplog):
    from slidestream.models import create_classifier, load_weights

    torch.manual_seed(2)
    src = create_classifier("resnet18", 5)  # e.g. a patch model trained on 5 classes
    state = {f"module.{k}": v for k, v in src.state_dict().items()}  # saved from DDP
    state["module.extra.weight"] = torch.zeros(1)
    path = tmp_path / "ddp.pt"
    torch.save({"state_dict": state}, path)
    model = create_classifier("resnet18", 2, weights=str(path))  # head dropped by its name
    assert torch.equal(model.layer4[1].conv2.weight, src.layer4[1].conv2.weight)
    assert model.fc.out_features == 2 and not torch.equal(model.fc.weight[:2], src.fc.weight[:2])
    fresh = create_classifier("resnet18", 5)
    with caplog.at_level("WARNING"):
        report = load_weights(fresh, path)  # same head: nothing dropped, the extra key reported
    assert report.dropped == [] and report.unexpected == ["extra.weight"]
    assert torch.equal(fresh.fc.weight, src.fc.weight) and "unexpected" in caplog.text
    with pytest.raises(ConfigError, match="shapes differ at"):
        load_weights(create_classifier("resnet18", 2), path)  # head kept: 5 vs 2 classes
    with pytest.raises(ConfigError, match="lack"):
        create_classifier("densenet121", 2, weights=str(path))


def test_torchvision_weights_name_from_the_hub_cache(tmp_path, monkeypatch):
    """No download: a weights name loads from the torch hub cache when the file is there."""
    from torchvision.models import ResNet18_Weights

    torch.manual_seed(3)
    cached = torchvision.models.resnet18(weights=None)
    folder = tmp_path / "hub" / "checkpoints"
    folder.mkdir(parents=True)
    url = ResNet18_Weights.IMAGENET1K_V1.url
    torch.save(cached.state_dict(), folder / url.rsplit("/", 1)[-1])
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    trunk, _ = split_model("resnet18", weights="IMAGENET1K_V1")
    assert torch.equal(trunk.conv1.weight, cached.conv1.weight)
    trunk, _ = split_model("resnet18", weights="ResNet18_Weights.IMAGENET1K_V1")
    assert torch.equal(trunk.layer1[0].conv1.weight, cached.layer1[0].conv1.weight)


def test_errors_name_the_choices():
    with pytest.raises(ConfigError, match="unknown model 'vgg11'; choose one of resnet18"):
        split_model("vgg11")
    with pytest.raises(ConfigError, match="stream_until must be one of"):
        split_model("resnet18", stream_until="layer9")
    with pytest.raises(ConfigError, match="unknown weights"):
        split_model("resnet18", weights="NO_SUCH_WEIGHTS")
    assert stage_names("resnet34")[-1] == "layer4"


def _imports(path: pathlib.Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


@pytest.mark.parametrize(
    ("package", "allowed"),
    [
        ("streaming", ("slidestream.errors", "slidestream._version", "slidestream.streaming")),
        (
            "models",
            (
                "slidestream.errors",
                "slidestream._version",
                "slidestream.models",
                "slidestream.streaming",
                "slidestream.data.functional",
            ),
        ),
    ],
)
def test_layer_rule(package, allowed):
    for path in (SRC / package).glob("*.py"):
        for name in _imports(path):
            if name.startswith("slidestream"):
                assert name.startswith(allowed), f"{path.name} imports {name}"
