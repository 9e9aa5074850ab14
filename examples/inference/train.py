"""Train the inference example's model at image build time and pickle it with its facts.

Usage: python3 train.py OUTPUT.pkl

The data set is scikit-learn's bundled iris data (150 flowers, 4 measurements in cm,
3 species): nothing is downloaded, so the build needs no network beyond Debian's mirror.
"""

import datetime
import pickle
import sys

# Installed in the image (Debian's python3-sklearn), not in the platform's venv.
import sklearn  # type: ignore[import-not-found]
from sklearn import datasets, ensemble, model_selection


def main(output: str) -> None:
    iris = datasets.load_iris()
    # A held-out quarter says how well the model generalises, not just how well it
    # remembers; stratified so that each species is in both parts.
    x_train, x_test, y_train, y_test = model_selection.train_test_split(
        iris.data, iris.target, test_size=0.25, random_state=0, stratify=iris.target
    )
    model = ensemble.RandomForestClassifier(n_estimators=50, random_state=0)
    model.fit(x_train, y_train)
    bundle = {
        "model": model,
        "name": "iris-random-forest",
        "classes": [str(c) for c in iris.target_names],
        "features": [str(f) for f in iris.feature_names],
        "accuracy": {
            "train": round(float(model.score(x_train, y_train)), 4),
            "test": round(float(model.score(x_test, y_test)), 4),
        },
        "samples": {"train": len(x_train), "test": len(x_test)},
        "trained_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "sklearn_version": sklearn.__version__,
    }
    with open(output, "wb") as f:
        pickle.dump(bundle, f, protocol=pickle.HIGHEST_PROTOCOL)
    print(f"trained {bundle['name']}: accuracy {bundle['accuracy']}, saved to {output}")


if __name__ == "__main__":
    main(sys.argv[1])
