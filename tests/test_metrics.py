"""Sample-quality metrics: the math against closed forms and brute force, and the whole
`leandit eval` path with randomly initialised Inception weights."""

from __future__ import annotations

import json
from unittest import mock

import numpy as np
import pytest
import torch

from leandit.cli import main
from leandit.evaluate.metrics import GaussianStats, all_metrics, frechet_distance, inception_score, precision_recall


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


@pytest.mark.slow  # a random Inception-v3 at 299 x 299 on 20 images
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


# -- the ADM evaluator's definitions, pinned ---------------------------------------------------


def test_inception_score_uses_adm_splits_of_5000_including_the_last_partial_one(monkeypatch):
    # 12,000 samples -> splits of 5000, 5000 and 2000; each split is confident and balanced
    # over 10, 5 and 2 classes: scores 10, 5 and 2, averaged with equal weight.
    logits = np.full((12000, 10), -50.0)
    classes = np.concatenate([np.arange(5000) % 10, np.arange(5000) % 5, np.arange(2000) % 2])
    logits[np.arange(12000), classes] = 50.0
    expected = (10 + 5 + 2) / 3
    assert inception_score(logits) == pytest.approx(expected, rel=1e-9)
    # all_metrics scores with the same splits (its k-NN part, slow at this size, is stubbed)
    from leandit.evaluate import metrics

    monkeypatch.setattr(metrics, "precision_recall", lambda *a, **k: (0.0, 0.0))
    pool = np.random.default_rng(0).normal(size=(12000, 2))
    features = {"pool": pool, "spatial": pool, "logits": logits}
    assert all_metrics(features, features)["inception_score"] == pytest.approx(expected, rel=1e-9)


def _brute_coverage(points: np.ndarray, manifold: np.ndarray, k: int) -> float:
    """Share of points within the k-th-nearest-neighbour radius (self excluded) of some manifold point."""
    sq = lambda a, b: (a**2).sum(1)[:, None] - 2 * a @ b.T + (b**2).sum(1)[None]
    radii = np.sort(sq(manifold, manifold), axis=1)[:, k]  # column 0 is the point itself
    return float((sq(points, manifold) <= radii[None]).any(axis=1).mean())


def test_precision_recall_use_k_3_and_match_brute_force_past_the_batch_size():
    rng = np.random.default_rng(5)
    # More points than the 1024-row batches; clusters make the answer depend on k.
    centres = rng.normal(size=(40, 16)) * 3
    reference = centres[rng.integers(0, 40, 2500)] + rng.normal(size=(2500, 16))
    samples = centres[rng.integers(0, 20, 1300)] * 1.1 + rng.normal(size=(1300, 16)) * 1.3
    brute = {k: (_brute_coverage(samples, reference, k), _brute_coverage(reference, samples, k)) for k in (2, 3, 4)}
    assert brute[2] != brute[3] != brute[4]  # the data tells k apart
    assert precision_recall(samples, reference) == pytest.approx(brute[3], abs=1e-12)
    features = lambda pool: {"pool": pool, "spatial": pool[:, :4], "logits": np.zeros((len(pool), 3))}
    metrics = all_metrics(features(samples), features(reference))
    assert (metrics["precision"], metrics["recall"]) == pytest.approx(brute[3], abs=1e-12)


def test_fid_uses_the_pooled_and_sfid_the_spatial_features():
    rng = np.random.default_rng(6)
    a = {"pool": rng.normal(size=(300, 5)), "spatial": rng.normal(size=(300, 3)), "logits": rng.normal(size=(300, 4))}
    b = {"pool": rng.normal(size=(300, 5)) + 1, "spatial": rng.normal(size=(300, 3)) * 2, "logits": rng.normal(size=(300, 4))}
    metrics = all_metrics(a, b)
    assert metrics["fid"] == pytest.approx(frechet_distance(GaussianStats.of(a["pool"]), GaussianStats.of(b["pool"])))
    assert metrics["sfid"] == pytest.approx(frechet_distance(GaussianStats.of(a["spatial"]), GaussianStats.of(b["spatial"])))
    assert metrics["inception_score"] == pytest.approx(inception_score(a["logits"]))


def test_inception_features_are_the_adm_ones(inception):
    """pool_3 (2048), the unbiased logits (pool @ W^T: no bias, as ADM's softmax) and sFID's
    mixed_6/conv = Mixed_6d.branch1x1 (after its ReLU), first 7 channels, 17 x 17, (H, W, C)."""
    from leandit.evaluate.feature_nets import InceptionFeatures

    net = InceptionFeatures(inception)
    hooked = [name for name, m in net.net.named_modules() if m._forward_hooks]
    assert hooked == ["Mixed_6d.branch1x1"]
    caught = {}
    net.net.Mixed_6d.branch1x1.register_forward_hook(lambda m, a, o: caught.update(out=o.detach().clone()))
    images = np.random.default_rng(7).integers(0, 256, (2, 48, 40, 3), dtype=np.uint8)
    features = net(torch.from_numpy(images))
    assert features["pool"].shape == (2, 2048) and features["logits"].shape == (2, 1008)
    assert caught["out"].shape == (2, 192, 17, 17)
    torch.testing.assert_close(features["spatial"], caught["out"][:, :7].permute(0, 2, 3, 1).reshape(2, 2023))
    assert (caught["out"] >= 0).all()  # after the ReLU
    torch.testing.assert_close(features["logits"], features["pool"] @ net.net.fc.weight.T, rtol=1e-4, atol=1e-4)
    assert net.net.fc.bias.abs().max() > 1e-3  # so the biased logits would differ
    gray = net(torch.from_numpy(images[..., :1]))
    rgb = net(torch.from_numpy(np.repeat(images[..., :1], 3, axis=-1)))
    torch.testing.assert_close(gray["pool"], rgb["pool"])
