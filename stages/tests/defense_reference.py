"""torchvision reference for stages/src/nn/defense.rs (the test-time defence's augmentation).

Not run by cargo. Prints the numbers pinned in
`nn::defense::tests::matches_torchvision_values_and_gradients`:

    python stages/tests/defense_reference.py

For three fixed draws (crop box, flip, jitter order and factors, grayscale) it applies
torchvision's tensor transforms to a deterministic batch (u8-quantised, so channel ties occur)
and prints, per draw, sum(out), sum(w * out) and, for the gradient g of sum(w * out) wrt the
input, sum(g), sum(g * v) and max |g|, in f64 with the factors rounded to f32 as our draws hold
them (torchvision's `adjust_hue` itself runs in float32 and converts back, so these numbers are
float32-accurate). Needs torch and torchvision only.
"""

import math
import struct

import torch
import torchvision.transforms.functional as F
from torchvision.transforms import InterpolationMode

B, C, H, W = 2, 3, 32, 32
N = B * C * H * W

x0 = torch.tensor(
    [round(255 * (0.5 + 0.45 * math.sin(0.37 * k + 0.3))) / 255 for k in range(N)],
    dtype=torch.float64,
).reshape(B, C, H, W)
w = torch.tensor([math.cos(0.11 * k) for k in range(N)], dtype=torch.float64).reshape(B, C, H, W)
v = torch.tensor([math.sin(0.07 * k) for k in range(N)], dtype=torch.float64).reshape(B, C, H, W)

# (top, left, height, width), flip, order (0 brightness, 1 contrast, 2 saturation, 3 hue),
# (brightness, contrast, saturation, hue), grayscale
DRAWS = [
    ((3, 5, 20, 24), True, [3, 0, 2, 1], (1.3, 0.7, 1.5, 0.12), False),
    ((0, 0, 32, 32), False, [0, 1, 2, 3], (0.6, 1.6, 0.3, -0.18), True),
    ((10, 2, 9, 13), False, [2, 3, 1, 0], (1.0, 1.2, 1.0, 0.05), False),
]


def f32(t):
    """The value as our draws hold it (f32)."""
    return struct.unpack("f", struct.pack("f", t))[0]


def apply(x, draw):
    (top, left, h, wd), flip, order, factors, gray = draw
    b, c, s, hue = (f32(t) for t in factors)
    y = F.resized_crop(x, top, left, h, wd, [32, 32], InterpolationMode.BILINEAR, antialias=False)
    if flip:
        y = F.hflip(y)
    for op in order:
        if op == 0:
            y = F.adjust_brightness(y, b)
        elif op == 1:
            y = F.adjust_contrast(y, c)
        elif op == 2:
            y = F.adjust_saturation(y, s)
        else:
            y = F.adjust_hue(y, hue)
    if gray:
        y = F.rgb_to_grayscale(y, num_output_channels=3)
    return y


for i, d in enumerate(DRAWS):
    x = x0.clone().requires_grad_(True)
    y = apply(x, d)
    obj = (y * w).sum()
    obj.backward()
    g = x.grad
    print(
        f"draw {i}: sum {y.sum().item():.10f} weighted {obj.item():.10f} "
        f"grad_sum {g.sum().item():.10f} grad_v {(g * v).sum().item():.10f} "
        f"grad_max {g.abs().max().item():.10f}"
    )

# channel ties: r = g = 0.6 maximal, b = 0.2, hue + 0.1; the gradient of the largest output
# channel goes to the first maximal input channel only (pinned in
# `nn::defense::tests::channel_ties_take_torchs_gradient`)
x = torch.tensor([0.6, 0.6, 0.2], dtype=torch.float64).reshape(1, 3, 1, 1).requires_grad_(True)
F.adjust_hue(x, 0.1).max(dim=1).values.sum().backward()
print("tie gradient", x.grad.flatten().tolist())

# (L1x) as R-MAO's `constrastive_loss_func` computes it ([Q54]): V = 4 views of B = 3 images,
# rows view-major, F.normalize'd; the positives of an anchor are the other views of its image
# in index order, the cross-entropy targets the first of them; tau = 0.2. Pinned in
# `nn::defense::tests::l1x_matches_r_mao_with_four_views`.
V, Bz, D = 4, 3, 5
z = torch.tensor(
    [math.sin(0.9 * k + 0.2) for k in range(V * Bz * D)], dtype=torch.float64
).reshape(V * Bz, D)
z = torch.nn.functional.normalize(z, dim=1)
ids = torch.cat([torch.arange(Bz) for _ in range(V)])
same = ids.unsqueeze(0) == ids.unsqueeze(1)
off = ~torch.eye(V * Bz, dtype=torch.bool)
sim = (z @ z.T)[off].view(V * Bz, -1)
same = same[off].view(V * Bz, -1)
logits = torch.cat([sim[same].view(V * Bz, -1), sim[~same].view(V * Bz, -1)], dim=1) / 0.2
loss = torch.nn.functional.cross_entropy(logits, torch.zeros(V * Bz, dtype=torch.long))
print(f"l1x {loss.item():.12f}")
