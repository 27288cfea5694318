"""PyTorch reference for stages/src/nn/{resnet,heads,checkpoint}.rs (issue 4).

Not run by cargo. Reproduces the numbers pinned in the Rust tests:

    # 1. parameter counts and torchvision's state_dict keys
    python stages/tests/nn_resnet_reference.py counts

    # 2. checkpoint compatibility: the Rust side writes a seeded width-64 encoder, its outputs and
    #    its state after one train-mode forward; torch loads the checkpoint with strict=True into
    #    torchvision's resnet18 (CIFAR stem) + R-CF's heads and recomputes everything.
    PIPE_TORCH_REF_DIR=/tmp/ref cargo test -p pipe-stages --lib \
        nn::checkpoint::tests::write_torch_reference_files -- --ignored
    python stages/tests/nn_resnet_reference.py compare /tmp/ref

Needs torch and torchvision only (the safetensors files are parsed by hand below).
"""

import json
import struct
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torchvision.models.resnet import BasicBlock

DTYPES = {"F32": torch.float32, "F64": torch.float64, "I64": torch.int64}


def read_safetensors(path):
    with open(path, "rb") as f:
        data = f.read()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        a, b = info["data_offsets"]
        buf = bytearray(data[8 + n + a : 8 + n + b])
        t = torch.frombuffer(buf, dtype=DTYPES[info["dtype"]]) if buf else torch.empty(0)
        out[name] = t.reshape(info["shape"]).clone()
    return out


def cifar_resnet18(w):
    """torchvision's resnet18 with the CIFAR stem (3x3 conv1, no max-pool), no fc, width w."""
    m = torchvision.models.resnet18()
    m.inplanes = w
    m.conv1 = nn.Conv2d(3, w, 3, 1, 1, bias=False)
    m.bn1 = nn.BatchNorm2d(w)
    m.maxpool = nn.Identity()
    m.layer1 = m._make_layer(BasicBlock, w, 2)
    m.layer2 = m._make_layer(BasicBlock, 2 * w, 2, stride=2)
    m.layer3 = m._make_layer(BasicBlock, 4 * w, 2, stride=2)
    m.layer4 = m._make_layer(BasicBlock, 8 * w, 2, stride=2)
    m.fc = nn.Identity()
    return m


class Encoder(nn.Module):
    """R-CF's encoder layout: encoder (backbone) + pre_feature + projection."""

    def __init__(self, hidden, z_dim):
        super().__init__()
        # Exactly the brief's construction at width 64: torchvision's resnet18, conv1 replaced.
        self.encoder = torchvision.models.resnet18()
        self.encoder.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.encoder.maxpool = nn.Identity()
        self.encoder.fc = nn.Identity()
        self.pre_feature = nn.Sequential(nn.Linear(512, hidden), nn.BatchNorm1d(hidden), nn.ReLU())
        self.projection = nn.Sequential(
            nn.Linear(hidden, hidden), nn.BatchNorm1d(hidden), nn.ReLU(), nn.Linear(hidden, z_dim)
        )

    def forward(self, x):
        h = self.pre_feature(self.encoder(x))
        return h, F.normalize(self.projection(h), dim=1)


def make_input(b, hw, phase):
    i = torch.arange(b * 3 * hw * hw, dtype=torch.float64)
    return (0.5 + 0.5 * torch.sin(0.37 * i + phase)).float().reshape(b, 3, hw, hw)


def counts():
    for w in (64, 16, 8):
        m = cifar_resnet18(w)
        print(w, sum(p.numel() for p in m.parameters()), len(m.state_dict()))
    print(list(cifar_resnet18(8).state_dict().keys()))


def summary(name, t):
    t = t.double()
    print(f"{name}: row sums {t.sum(1).tolist()}")
    print(f"{name}: row sq sums {(t * t).sum(1).tolist()}")
    print(f"{name}: [0, :4] {t[0, :4].tolist()}  [-1, -4:] {t[-1, -4:].tolist()}")


def compare(ref_dir):
    torch.set_grad_enabled(False)
    ckpt0 = read_safetensors(f"{ref_dir}/init.safetensors")
    hidden, z_dim = ckpt0["projection.3.weight"].shape[1], ckpt0["projection.3.weight"].shape[0]
    model = Encoder(hidden, z_dim)
    # THE compatibility test: strict load of the encoder alone (prefix stripped) into
    # torchvision's resnet18, then of the whole checkpoint into R-CF's layout.
    sd = {k[len("encoder.") :]: v for k, v in ckpt0.items() if k.startswith("encoder.")}
    print("encoder-only strict load:", model.encoder.load_state_dict(sd, strict=True))
    print("full strict load:", model.load_state_dict(ckpt0, strict=True))
    # Without num_batches_tracked torch still accepts a strict load (it fills in 0).
    sd_no_nbt = {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}
    print("strict load without num_batches_tracked:", cifar_resnet18(64).load_state_dict(sd_no_nbt, strict=True))

    x1, x2 = make_input(4, 32, 0.0), make_input(3, 32, 1.0)
    model.train()
    h1, z1 = model(x1)
    model.eval()
    h2, z2 = model(x2)
    f2 = model.encoder(x2)

    ours = read_safetensors(f"{ref_dir}/outputs.safetensors")
    for name, t in [("h1", h1), ("z1", z1), ("h2", h2), ("z2", z2), ("f2", f2)]:
        d = (ours[name] - t).abs().max().item()
        rel = d / t.abs().max().item()
        print(f"max |ours - torch| {name} {tuple(t.shape)}: {d:.3e} (relative to max {rel:.3e})")
    summary("h1", h1)
    summary("z1", z1)
    summary("h2", h2)
    summary("z2", z2)

    # State after the train forward: running stats and num_batches_tracked.
    ckpt1 = read_safetensors(f"{ref_dir}/after_train.safetensors")
    state = model.state_dict()
    worst = max(
        ((ckpt1[k].double() - v.double()).abs().max().item(), k)
        for k, v in state.items()
        if "running" in k
    )
    print("max |running stat diff| (name):", worst)
    nbt = {k: int(v) for k, v in state.items() if k.endswith("num_batches_tracked")}
    ok = all(int(ckpt1[k]) == v for k, v in nbt.items())
    print("num_batches_tracked equal:", ok, set(nbt.values()))
    for k in ["encoder.layer4.1.bn2.running_mean", "projection.1.running_var"]:
        print(k, state[k][:4].tolist())


if __name__ == "__main__":
    if sys.argv[1] == "counts":
        counts()
    else:
        compare(sys.argv[2])
