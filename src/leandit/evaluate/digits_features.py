"""The feature network of the digits metrics: a small CNN trained on the embedded 8x8 digits,
shipped in assets/digits-features/ and rebuilt exactly by

    python -m leandit.evaluate.digits_features --out src/leandit/assets/digits-features

It sees images exactly as samples arrive (uint8 after the [-1, 1] -> 0..255 mapping of
`leandit sample`), trains on a stratified 75 % of the digits and reports its accuracy on the
other 25 %. Its features give "digits-FID", "digits-sFID", "digits-IS" and digits
precision/recall: comparable among digits models only, never with Inception numbers.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn import functional as F

from ..data.digits import load_digits_arrays, to_model_range

ASSET = Path(__file__).resolve().parents[1] / "assets" / "digits-features"
WEIGHTS = "model.safetensors"


class DigitsFeatures(nn.Module):
    """uint8 (N, 8, 8, C) -> {"pool": (N, 128), "spatial": (N, 256), "logits": (N, 10)}."""

    name = "digits-cnn-v1"

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.conv3 = nn.Conv2d(64, 128, 3, stride=2, padding=1)
        self.fc = nn.Linear(128, 10)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        x = images.permute(0, 3, 1, 2).float()  # (N, C, 8, 8)
        if x.shape[1] == 3:  # RGB digits: back to one channel
            x = x.mean(dim=1, keepdim=True)
        if x.shape[-2:] != (8, 8):
            raise ValueError(f"the digits feature network takes 8 x 8 images, got {tuple(x.shape[-2:])}")
        x = x / 127.5 - 1.0
        h1 = F.gelu(self.conv1(x))  # (N, 32, 8, 8)
        h2 = F.gelu(self.conv2(h1))  # (N, 64, 8, 8)
        h3 = F.gelu(self.conv3(h2))  # (N, 128, 4, 4)
        pool = h3.mean(dim=(2, 3))  # (N, 128)
        spatial = h2[:, :4].permute(0, 2, 3, 1).flatten(1)  # (N, 8*8*4)
        return {"pool": pool, "spatial": spatial, "logits": self.fc(pool)}


def digits_as_uint8() -> tuple[np.ndarray, np.ndarray]:
    """The real digits as samples arrive: uint8 (1797, 8, 8, 1), and their labels."""
    images, labels = load_digits_arrays()
    x = to_model_range(images)  # (N, 1, 8, 8) in [-1, 1]
    return ((x + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy(), labels


def split(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    from sklearn.model_selection import train_test_split

    images, labels = digits_as_uint8()
    return train_test_split(images, labels, test_size=0.25, random_state=seed, stratify=labels)


@torch.no_grad()
def accuracy(net: DigitsFeatures, images: np.ndarray, labels: np.ndarray) -> float:
    net.eval()
    predicted = net(torch.from_numpy(images))["logits"].argmax(dim=1).numpy()
    return float((predicted == labels).mean())


def train(seed: int = 0, epochs: int = 80, batch_size: int = 64, lr: float = 2e-3) -> tuple[DigitsFeatures, float]:
    """Train on 75 % of the digits with one-pixel random shifts; returns the network and its
    accuracy on the held-out 25 %. Deterministic for a seed on one thread."""
    train_x, test_x, train_y, test_y = split(seed)
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = DigitsFeatures()
    optimizer = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * int(np.ceil(len(train_x) / batch_size))
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    x_all, y_all = torch.from_numpy(train_x), torch.from_numpy(train_y)
    for _ in range(epochs):
        net.train()
        order = torch.randperm(len(x_all), generator=gen)
        for start in range(0, len(order), batch_size):
            index = order[start : start + batch_size]
            x = x_all[index]  # (B, 8, 8, 1) uint8
            shift = torch.randint(-1, 2, (2,), generator=gen).tolist()
            x = torch.roll(x, shifts=shift, dims=(1, 2))
            loss = F.cross_entropy(net(x)["logits"], y_all[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    return net.eval(), accuracy(net, test_x, test_y)


def load_digits_features(folder: str | Path = ASSET) -> DigitsFeatures:
    path = Path(folder) / WEIGHTS
    if not path.is_file():
        raise FileNotFoundError(f"the digits feature network is missing ({path}); rebuild it with "
                                "'python -m leandit.evaluate.digits_features --out src/leandit/assets/digits-features'")
    net = DigitsFeatures()
    net.load_state_dict(load_file(str(path)))
    return net.eval().requires_grad_(False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ASSET)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=80)
    args = parser.parse_args()
    torch.set_num_threads(1)
    net, test_accuracy = train(args.seed, args.epochs)
    args.out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(args.out / WEIGHTS))
    (args.out / "info.json").write_text(json.dumps({"name": DigitsFeatures.name, "seed": args.seed, "epochs": args.epochs,
                                                    "held_out_accuracy": test_accuracy, "held_out_images": 450}, indent=2) + "\n")
    print(f"held-out accuracy {test_accuracy:.4f}; wrote {args.out}")


if __name__ == "__main__":
    main()
