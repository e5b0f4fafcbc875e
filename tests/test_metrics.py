"""Sample-quality metrics: the math against closed forms and brute force, and the whole
`leandit eval` path with randomly initialised Inception weights."""

from __future__ import annotations

import json
from unittest import mock

import numpy as np
import pytest
import torch

from leandit.cli import main
from leandit.evaluate.metrics import GaussianStats, frechet_distance, inception_score, precision_recall


def _sqrtm_psd(a: torch.Tensor) -> torch.Tensor:
    values, vectors = torch.linalg.eigh(a)
    return vectors @ torch.diag(values.clamp(min=0).sqrt()) @ vectors.T


def test_frechet_distance_matches_closed_forms():
    rng = np.random.default_rng(0)
    d = 6
    # Same covariance, shifted mean: the squared shift.
    sigma = np.cov(rng.normal(size=(50, d)), rowvar=False)
    shift = rng.normal(size=d)
    a, b = GaussianStats(np.zeros(d), sigma), GaussianStats(shift, sigma)
    assert frechet_distance(a, b) == pytest.approx(float(shift @ shift), rel=1e-8)
    # Diagonal covariances: sum of (sqrt(s_a) - sqrt(s_b))^2 plus the shift.
    va, vb = rng.uniform(0.5, 2, d), rng.uniform(0.5, 2, d)
    expected = float(shift @ shift + ((np.sqrt(va) - np.sqrt(vb)) ** 2).sum())
    assert frechet_distance(GaussianStats(np.zeros(d), np.diag(va)), GaussianStats(shift, np.diag(vb))) == pytest.approx(expected)
    # General SPD matrices: tr sqrt(A B) = tr sqrt(A^1/2 B A^1/2) by eigendecomposition.
    A = torch.as_tensor(np.cov(rng.normal(size=(40, d)), rowvar=False))
    B = torch.as_tensor(np.cov(rng.normal(size=(40, d)) * 2 + 1, rowvar=False))
    root = _sqrtm_psd(A)
    independent = float(torch.trace(A) + torch.trace(B) - 2 * torch.trace(_sqrtm_psd(root @ B @ root)))
    assert frechet_distance(GaussianStats(np.zeros(d), A.numpy()), GaussianStats(np.zeros(d), B.numpy())) == pytest.approx(independent, rel=1e-6)


def test_fid_of_feature_sets_is_zero_for_identical_sets_and_the_shift_for_shifted_ones():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(500, 4))
    stats = GaussianStats.of(x)
    assert abs(frechet_distance(stats, GaussianStats.of(x.copy()))) < 1e-6
    assert frechet_distance(stats, GaussianStats.of(x + 3.0)) == pytest.approx(4 * 9.0, rel=1e-6)


def test_inception_score_of_known_distributions():
    assert inception_score(np.zeros((20, 10))) == pytest.approx(1.0)
    confident = np.full((20, 10), -50.0)
    confident[np.arange(20), np.arange(20) % 10] = 50.0
    assert inception_score(confident) == pytest.approx(10.0, rel=1e-6)
    # Splits are scored separately and averaged: two splits, each of one class only -> 1.
    halves = np.full((20, 10), -50.0)
    halves[:10, 0] = halves[10:, 1] = 50.0
    assert inception_score(halves, split_size=10) == pytest.approx(1.0)
    assert inception_score(halves) == pytest.approx(2.0, rel=1e-6)


def test_precision_recall_against_brute_force():
    rng = np.random.default_rng(2)
    real, fake = rng.normal(size=(40, 3)), rng.normal(size=(30, 3)) + 0.7

    def brute(points, manifold, k=3):
        d = np.linalg.norm(manifold[:, None] - manifold[None], axis=2)
        radii = np.sort(d, axis=1)[:, k]  # index 0 is the point itself
        return float(np.mean([(np.linalg.norm(manifold - p, axis=1) <= radii).any() for p in points]))

    precision, recall = precision_recall(fake, real)
    assert precision == pytest.approx(brute(fake, real)) and recall == pytest.approx(brute(real, fake))
    assert precision_recall(real, real) == (1.0, 1.0)
    assert precision_recall(real + 100, real) == (0.0, 0.0)


def random_inception_weights(path) -> None:
    """A weights file of the Inception architecture with random parameters (tests only)."""
    import torch_fidelity.feature_extractor_inceptionv3 as fi

    with mock.patch.object(fi, "load_state_dict_from_url", lambda *a, **k: None), \
            mock.patch.object(fi.FeatureExtractorInceptionV3, "load_state_dict", lambda self, *a, **k: None):
        torch.manual_seed(0)
        net = fi.FeatureExtractorInceptionV3("random", ["2048"])
    # Batch-norm statistics from a batch of random images, so that the random network's
    # activations neither vanish nor explode (its features must tell images apart).
    for module in net.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None
    net.train()
    with torch.no_grad():
        net(torch.randint(0, 256, (8, 3, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)))
    torch.save(net.state_dict(), path)


@pytest.fixture(scope="module")
def inception(tmp_path_factory):
    path = tmp_path_factory.mktemp("inception") / "random-inception.pth"
    random_inception_weights(path)
    return path


def _npz(path, images):
    np.savez(path, arr_0=images, arr_1=np.zeros(len(images), dtype=np.int64))
    return path


def test_eval_runs_the_whole_inception_path_and_caches_reference_features(inception, tmp_path, capsys):
    rng = np.random.default_rng(3)
    ref = _npz(tmp_path / "ref.npz", rng.integers(0, 256, (10, 32, 32, 3), dtype=np.uint8))
    same = _npz(tmp_path / "same.npz", np.load(ref)["arr_0"])
    other = _npz(tmp_path / "other.npz", rng.integers(0, 96, (10, 32, 32, 3), dtype=np.uint8))
    cache = tmp_path / "cache"
    common = ["--ref", str(ref), "--inception", str(inception), "--cache", str(cache), "--quiet"]
    assert main(["eval", str(same), *common, "--out", str(tmp_path / "same.json")]) == 0
    result = json.loads((tmp_path / "same.json").read_text())
    assert result["feature_network"].startswith("inception-v3-2015-12-05-") and result["num_samples"] == 10
    assert result["precision"] == result["recall"] == 1.0 and result["inception_score"] >= 1.0
    assert len(list(cache.glob("*.npz"))) == 1  # the reference's features, reused below
    capsys.readouterr()
    from leandit.evaluate import feature_nets

    counted = mock.patch.object(feature_nets, "extract_features", wraps=feature_nets.extract_features)
    with counted as extract:
        assert main(["eval", str(other), *common]) == 0
    assert extract.call_count == 1  # the samples only: the reference's features came from the cache
    shifted = json.loads(capsys.readouterr().out)
    # Identical sets: 0 up to the square root of a rank-9 covariance product.
    for metric in ("fid", "sfid"):
        assert shifted[metric] > 0 and abs(result[metric]) < 1e-3 * shifted[metric], metric
    assert shifted["precision"] < 1.0


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--ref", "{ref}"], "need the FID Inception weights: pass --inception PATH"),
        (["--ref", "{ref}", "--inception", "{missing}"], "weights-inception-2015-12-05-6726825d.pth"),
        (["--ref", "{ref}", "--inception", "{ref}"], "not Inception FID weights"),
        (["--ref", "{missing}"], "image file not found"),
        (["--ref", "{bad}"], "no arr_0"),
        (["--ref", "{empty}"], "N >= 1"),
    ],
)
def test_eval_refuses_missing_or_wrong_files_in_one_line(tmp_path, capsys, extra, message):
    ref = _npz(tmp_path / "ref.npz", np.zeros((4, 16, 16, 3), dtype=np.uint8))
    np.savez(tmp_path / "bad.npz", images=np.zeros(3))
    np.savez(tmp_path / "empty.npz", arr_0=np.zeros((0, 16, 16, 3), dtype=np.uint8))
    paths = {"ref": ref, "missing": tmp_path / "nope.pth", "bad": tmp_path / "bad.npz", "empty": tmp_path / "empty.npz"}
    args = [a.format(**paths) for a in extra]
    assert main(["eval", str(ref), *args, "--features", "inception", "--no-cache"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
