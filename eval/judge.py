"""The judge of generated digits, fixed before any generation: a classifier trained on the real
training split (scikit-learn's MLPClassifier on pixels), whose hidden layer is the feature space
of the Frechet distance.

    accuracy(images, labels)        the share of images classified as their conditioning label
    frechet_distance(a, b)          ||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)) of the
                                    two sets' hidden features (the FID formula, in this judge's space)
"""

from __future__ import annotations

import warnings

import numpy as np


def frechet_distance(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """The Frechet distance between Gaussians fitted to two feature sets [N, F] (>= 0; 0 for one set)."""
    from scipy import linalg

    mu_a, mu_b = features_a.mean(axis=0), features_b.mean(axis=0)
    cov_a, cov_b = np.cov(features_a, rowvar=False), np.cov(features_b, rowvar=False)
    with warnings.catch_warnings():  # fewer samples than features: singular, handled below
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        root = linalg.sqrtm(cov_a @ cov_b)
        if not np.isfinite(root).all():  # offset the diagonals, as the FID reference does
            offset = np.eye(len(cov_a)) * 1e-6
            root = linalg.sqrtm((cov_a + offset) @ (cov_b + offset))
    distance = np.sum((mu_a - mu_b) ** 2) + np.trace(cov_a) + np.trace(cov_b) - 2.0 * np.trace(np.real(root))
    return float(max(distance, 0.0))


class Judge:
    """A pixel MLP classifier of [N, H, W] images in [0, 1]; `fit` on real training images only."""

    def __init__(self, hidden: int = 128, seed: int = 0):
        from sklearn.neural_network import MLPClassifier

        self.classifier = MLPClassifier(hidden_layer_sizes=(hidden,), alpha=1e-3, max_iter=400, random_state=seed)

    def fit(self, images: np.ndarray, labels: np.ndarray) -> Judge:
        import warnings

        from sklearn.exceptions import ConvergenceWarning

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            self.classifier.fit(_flat(images), labels)
        return self

    def predict(self, images: np.ndarray) -> np.ndarray:
        return self.classifier.predict(_flat(images))

    def accuracy(self, images: np.ndarray, labels: np.ndarray) -> float:
        return float(np.mean(self.predict(images) == np.asarray(labels)))

    def features(self, images: np.ndarray) -> np.ndarray:
        """[N, hidden]: the classifier's hidden layer (ReLU) for each image."""
        weights, bias = self.classifier.coefs_[0], self.classifier.intercepts_[0]
        return np.maximum(_flat(images) @ weights + bias, 0.0)

    def frechet_distance(self, images_a: np.ndarray, images_b: np.ndarray) -> float:
        return frechet_distance(self.features(images_a), self.features(images_b))


def _flat(images: np.ndarray) -> np.ndarray:
    return np.asarray(images, np.float64).reshape(len(images), -1)
