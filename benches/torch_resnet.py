"""Time the same ResNet-18 (CIFAR stem) hot paths in PyTorch, for the ratio against `pipe bench nn`.

    pip install torch torchvision --index-url <a CPU wheel index>   # or plain `pip install torch torchvision`
    python benches/torch_resnet.py            # widths 16 and 64, batch 64, 2 threads

Same definitions as stages/src/nn/bench.rs: eval forward of backbone + linear classifier;
train step = train-mode forward, cross-entropy, backward, SGD (momentum 0.9, Nesterov, wd 5e-4);
PGD step = one l_inf step (eval-mode forward, backward to the input only, sign step, projections)
on frozen weights (requires_grad False). Median of `--reps` runs after one warm-up.
"""
import argparse
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


class Block(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class ResNet18(nn.Module):
    def __init__(self, w, classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, w, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(w)
        layers, cin = [], w
        for i, c in enumerate([w, 2 * w, 4 * w, 8 * w]):
            stride = 1 if i == 0 else 2
            layers.append(nn.Sequential(Block(cin, c, stride), Block(c, c, 1)))
            cin = c
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(8 * w, classes)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        return self.fc(self.layers(x).mean((2, 3)))


def timed(reps, f):
    f()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        f()
        ts.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(ts)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--widths", default="16,64")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    for w in [int(s) for s in a.widths.split(",")]:
        m = ResNet18(w)
        x = torch.rand(a.batch, 3, 32, 32)
        y = torch.randint(0, 10, (a.batch,))
        opt = torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4)

        def fwd():
            m.eval()
            with torch.no_grad():
                m(x).sum().item()

        def train():
            m.train()
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(m(x), y).backward()
            opt.step()

        def pgd():
            m.eval()
            for p in m.parameters():
                p.requires_grad_(False)
            d = torch.zeros_like(x, requires_grad=True)
            F.cross_entropy(m(x + d), y, reduction="none").sum().backward()
            with torch.no_grad():
                d2 = (d + 2 / 255 * d.grad.sign()).clamp(-8 / 255, 8 / 255)
                adv = (x + d2).clamp(0, 1)
            adv.sum().item()
            for p in m.parameters():
                p.requires_grad_(True)

        print(f"torch resnet18 width {w:>3} batch {a.batch}: forward {timed(a.reps, fwd):8.1f} ms | "
              f"train step {timed(a.reps, train):8.1f} ms | PGD step {timed(a.reps, pgd):8.1f} ms "
              f"({a.threads} threads, torch {torch.__version__})")


if __name__ == "__main__":
    main()
