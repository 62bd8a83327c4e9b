"""scikit-learn's mini-batch pipeline on segstream's stream, and the ratio of the two rates.

Rows are the model-space vectors (50 features) of each timed event's user, in stream order, as
`segstream bench pipeline --vectors-out` wrote them. scikit-learn runs models only:
MiniBatchKMeans(k = segstream's default 6, and the issue's reference k = 16 on 32 columns) and
SGDRegressor, partial_fit per batch of 1024 rows. The regression target is a fixed linear function
of the row plus noise (the models' speed does not depend on it).
"""

import json
import sys
import time

import numpy as np
from sklearn.cluster import MiniBatchKMeans
from sklearn.linear_model import SGDRegressor

BATCH = 1024


def rate(x: np.ndarray, k: int) -> float:
    rng = np.random.default_rng(7)
    y = x @ rng.normal(size=x.shape[1]) + rng.normal(scale=0.1, size=x.shape[0])
    km = MiniBatchKMeans(n_clusters=k, batch_size=BATCH, random_state=0, n_init=1)
    sgd = SGDRegressor(random_state=0)
    # The first batch seeds k-means (k-means++ on it), as segstream seeds on its sample.
    km.partial_fit(x[:BATCH])
    started = time.perf_counter()
    for i in range(0, x.shape[0], BATCH):
        xb, yb = x[i : i + BATCH], y[i : i + BATCH]
        km.partial_fit(xb)
        sgd.partial_fit(xb, yb)
    return x.shape[0] / (time.perf_counter() - started)


def main() -> None:
    vectors, report = sys.argv[1], sys.argv[2]
    x = np.fromfile(vectors, dtype="<f8").reshape(-1, 50)
    seg = json.load(open(report))
    ours = seg["events_per_second"]
    print(f"rows: {x.shape[0]} (d = 50), segstream threads: {seg['threads']}")
    print(f"segstream (decode + features + k-means + SGD + changes): {ours:,.0f} events/s")
    for k, d in ((6, 50), (16, 32)):
        theirs = rate(np.ascontiguousarray(x[:, :d]), k)
        print(
            f"scikit-learn MiniBatchKMeans(k={k}) + SGDRegressor, d={d}, models only: "
            f"{theirs:,.0f} rows/s -> segstream / scikit-learn = {ours / theirs:.2f}x"
        )


if __name__ == "__main__":
    main()
