"""`leandit eval`: FID, sFID, Inception Score, precision and recall of a sample file against
reference images, as the ADM evaluator defines them."""

from __future__ import annotations

import argparse
import json
import time
import zipfile
from pathlib import Path

import numpy as np

from ..evaluate.digits_features import digits_as_uint8, load_digits_features
from ..evaluate.feature_nets import InceptionFeatures, cached_features, read_images
from ..evaluate.metrics import all_metrics
from ..files import write_text_atomically
from ..train.distributed import resolve_device
from .common import log

DEFAULT_CACHE = Path.home() / ".cache" / "leandit" / "features"


def add_parser(sub) -> None:
    p = sub.add_parser(
        "eval",
        help="FID, sFID, IS, precision and recall of samples against reference images (ADM evaluator definitions)",
        description="Compare SAMPLES.npz (arr_0 = N x H x W x C uint8, e.g. from `leandit sample`) with reference images. "
        "With Inception features (the standard): FID and IS on pool_3/logits, sFID on the spatial mixed_6/conv "
        "features, precision/recall by the k-NN manifold (k = 3). For 8 x 8 digits the embedded digits feature network "
        "gives digits-FID etc. Reference features are computed once and cached.",
    )
    p.add_argument("samples", type=Path, help="sample file (.npz, arr_0 = N x H x W x C uint8)")
    p.add_argument("--ref", required=True, help="reference images: an .npz in the same layout (e.g. ADM's VIRTUAL_imagenet256_labeled.npz), "
                   "or 'digits' for the 1797 real digits")
    p.add_argument("--features", choices=("auto", "inception", "digits"), default="auto",
                   help="feature network; auto = digits for 8 x 8 images, else inception (default auto)")
    p.add_argument("--inception", type=Path, help="local Inception FID weights file (torch-fidelity's weights-inception-2015-12-05-6726825d.pth)")
    p.add_argument("--k", type=int, default=3, help="neighbours of the precision/recall manifold (default 3)")
    p.add_argument("--batch-size", type=int, default=64, help="images per feature batch (default 64)")
    p.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help=f"folder of cached reference features (default {DEFAULT_CACHE})")
    p.add_argument("--no-cache", action="store_true", help="do not read or write cached reference features")
    p.add_argument("--out", type=Path, help="write the metrics as JSON here (default: print only)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(run=run)


# Below these sample counts FID is strongly biased upwards (digits-FID 12.6 at N = 40 against
# 1.04 at N = 1500 for the same teacher): compare models only at equal N.
RELIABLE_N = {"digits": 1000, "inception": 10000}


def _check_npz(path: Path, what: str) -> None:
    """An ADM sample file is an .npz archive; say so before a .npy or another file is read."""
    if path.is_file() and not zipfile.is_zipfile(path):
        hint = " (a .npy holds one array: write numpy.savez(FILE.npz, arr_0=images))" if path.suffix == ".npy" else ""
        raise ValueError(f"{what} {path} is not an .npz archive{hint}; pass an .npz with arr_0 = N x H x W x C uint8")


def _class_agreement(path: Path, images: np.ndarray) -> float | None:
    """Digit samples with their labels (arr_1): the share an SVC trained on the real digits
    puts in the class asked for (as the demo reports)."""
    if images.shape[1:] != (8, 8, 1):
        return None
    with np.load(path) as data:
        labels = data["arr_1"] if "arr_1" in data else None
    if labels is None or len(labels) != len(images) or labels.min() < 0 or labels.max() > 9:
        return None
    from ..evaluate.digits import class_agreement

    return class_agreement(images[..., 0].astype(np.float32) * (16 / 255), labels)


def run(args: argparse.Namespace) -> int:
    if args.k < 1 or args.batch_size < 1:
        raise ValueError("--k and --batch-size must be at least 1")
    _check_npz(args.samples, "SAMPLES")
    if args.ref != "digits":
        _check_npz(Path(args.ref), "--ref")
    if args.out is not None and args.out.is_dir():
        raise ValueError(f"--out {args.out} is a folder: pass a file name such as {args.out / 'metrics.json'}")
    samples = read_images(args.samples)
    if args.ref == "digits":
        reference, _ = digits_as_uint8()
        ref_path = None
    else:
        ref_path = Path(args.ref)
        reference = read_images(ref_path)
    if samples.shape[1:3] != reference.shape[1:3]:
        log(f"note: samples are {samples.shape[1]}x{samples.shape[2]}, references {reference.shape[1]}x{reference.shape[2]}")
    kind = args.features
    if kind == "auto":
        kind = "digits" if samples.shape[1:3] == (8, 8) else "inception"
    if kind == "inception":
        if args.inception is None:
            raise ValueError("Inception metrics need the FID Inception weights: pass --inception PATH "
                             "(weights-inception-2015-12-05-6726825d.pth from torch-fidelity's v0.2.0 release)")
        net = InceptionFeatures(args.inception)
        prefix = ""
    else:
        net = load_digits_features()
        prefix = "digits_"
    if len(samples) < RELIABLE_N[kind]:
        log(f"warning: {len(samples)} samples: FID is biased upwards below about {RELIABLE_N[kind]:,} ({kind} features); "
            "compare models only at the same number of samples")
    device = resolve_device(args.device)
    net.to(device)
    options = {"batch_size": args.batch_size, "device": device, "progress": not args.quiet}
    started = time.perf_counter()
    sample_features = cached_features(net, net.name, args.samples, samples, None, **options)
    cache = None if args.no_cache or ref_path is None else args.cache
    reference_features = cached_features(net, net.name, ref_path, reference, cache, **options)
    metrics = {f"{prefix}{name}": value for name, value in all_metrics(sample_features, reference_features, args.k).items()}
    agreement = _class_agreement(args.samples, samples) if args.ref == "digits" else None
    result = {
        "samples": str(args.samples), "num_samples": len(samples), "reference": args.ref, "num_reference": len(reference),
        "feature_network": net.name, "k": args.k, **metrics,
        **({"class_agreement": agreement} if agreement is not None else {}),
        "seconds": round(time.perf_counter() - started, 2),
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        write_text_atomically(args.out, text + "\n")
    return 0
