"""Do generated digits look like digits of the class asked for? An SVC trained on the real
digits (scikit-learn) says which class each sample is; agreement with the conditioning
label is the measure. (The digits-FID of the evaluation issue is a separate, finer measure.)
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from ..data.digits import load_digits_arrays


@lru_cache(maxsize=1)
def digits_classifier():
    """An RBF SVC fitted on all 1797 real digits (0..16 pixel scale, flattened)."""
    from sklearn.svm import SVC

    images, labels = load_digits_arrays()
    return SVC(gamma=0.001, C=10.0).fit(images.reshape(len(images), -1), labels)


def held_out_accuracy(seed: int = 0) -> float:
    """Accuracy of the same classifier recipe on a 25 % held-out split of the real digits."""
    from sklearn.model_selection import train_test_split
    from sklearn.svm import SVC

    images, labels = load_digits_arrays()
    xa, xb, ya, yb = train_test_split(images.reshape(len(images), -1), labels, test_size=0.25, random_state=seed, stratify=labels)
    return float(SVC(gamma=0.001, C=10.0).fit(xa, ya).score(xb, yb))


def class_agreement(images: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of images (N, 8, 8) on the 0..16 scale that the classifier assigns to their
    conditioning label."""
    predicted = digits_classifier().predict(np.asarray(images, dtype=np.float32).reshape(len(images), -1))
    return float((predicted == np.asarray(labels)).mean())
