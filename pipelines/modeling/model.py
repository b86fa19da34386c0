"""The ``train`` stage: the gradient-boosted click model, the rule baseline, the model card."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import joblib
import numpy as np
import pandas as pd
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.metrics import log_loss, roc_auc_score
from threadpoolctl import threadpool_limits

from pipelines.core import timings
from pipelines.core.domain import SURFACES
from pipelines.core.settings import TrainSettings
from pipelines.features.definitions import FeatureSet
from pipelines.modeling.sampling import apply_negative_rate


def fit_model(
    train: pd.DataFrame, feature_set: FeatureSet, params: TrainSettings, seed: int
) -> HistGradientBoostingClassifier:
    """Fit the click model on the training split (categorical request features native)."""
    X = train[feature_set.names]
    model = HistGradientBoostingClassifier(
        max_iter=params.max_iter,
        learning_rate=params.learning_rate,
        max_leaf_nodes=params.max_leaf_nodes,
        min_samples_leaf=params.min_samples_leaf,
        l2_regularization=params.l2_regularization,
        categorical_features=[feature_set.names.index(c) for c in feature_set.categorical],
        early_stopping=False,
        random_state=seed,
    )
    # One OpenMP thread: the histogram sums, and so the trees, depend on how rows are split
    # across threads; fixed at one, the model is the same on any machine and any setting of
    # OMP_NUM_THREADS (a stage output must be a pure function of its deps and params).
    with threadpool_limits(limits=1, user_api="openmp"):
        model.fit(X.to_numpy(dtype=np.float64), train["clicked"].to_numpy())
    return model


def predict(model: HistGradientBoostingClassifier, X: np.ndarray) -> np.ndarray:
    """Click probability for a feature matrix in feature-set column order."""
    return model.predict_proba(X)[:, 1]


@dataclass
class RuleBaseline:
    """Smoothed item x surface click-through prior: the last tier of the fallback chain.

    item x surface CTR is shrunk towards the surface CTR, which is shrunk towards
    the global CTR; an unknown item gets its surface's rate.
    """

    global_ctr: float
    surface_ctr: dict[str, float]
    item_surface_ctr: dict[str, float]
    strength: float = 50.0

    @classmethod
    def fit(
        cls, train: pd.DataFrame, strength: float = 50.0, negative_rate: float = 1.0
    ) -> RuleBaseline:
        """``negative_rate``: share of the non-clicks ``train`` kept (a sample); each kept
        one stands for ``1 / negative_rate`` impressions."""

        def counted(frame: pd.DataFrame) -> pd.DataFrame:
            frame["count"] = frame["sum"] + (frame["count"] - frame["sum"]) / negative_rate
            return frame

        clicks = float(train["clicked"].sum())
        global_ctr = clicks / (clicks + (len(train) - clicks) / negative_rate)
        by_s = counted(train.groupby("surface", observed=True)["clicked"].agg(["sum", "count"]))
        surface_ctr = {
            s: float(
                (by_s.loc[s, "sum"] + strength * global_ctr) / (by_s.loc[s, "count"] + strength)
            )
            if s in by_s.index
            else global_ctr
            for s in SURFACES
        }
        by_is = counted(
            train.groupby(["item_id", "surface"], observed=True)["clicked"].agg(["sum", "count"])
        )
        prior = np.array([surface_ctr[s] for s in by_is.index.get_level_values(1)])
        rate = (by_is["sum"].to_numpy() + strength * prior) / (by_is["count"].to_numpy() + strength)
        keys = [f"{i}|{s}" for i, s in by_is.index]
        return cls(
            global_ctr,
            surface_ctr,
            dict(zip(keys, np.round(rate, 6).tolist(), strict=True)),
            strength,
        )

    def predict(
        self, item_id: Sequence[str] | np.ndarray, surface: Sequence[str] | np.ndarray
    ) -> np.ndarray:
        out = np.empty(len(item_id), dtype=np.float64)
        for k, (i, s) in enumerate(zip(item_id, surface, strict=True)):
            out[k] = self.item_surface_ctr.get(f"{i}|{s}", self.surface_ctr.get(s, self.global_ctr))
        return out

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), sort_keys=True))

    @classmethod
    def load(cls, path: Path) -> RuleBaseline:
        return cls(**json.loads(path.read_text()))


def train_stage(
    train: pd.DataFrame,
    valid: pd.DataFrame,
    feature_set: FeatureSet,
    params: TrainSettings,
    seed: int,
    dataset_meta: dict[str, Any],
    data_hashes: dict[str, str | None],
    out_dir: Path,
    sample: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Fit model and baseline, write ``model.joblib``, ``baseline.json`` and the model card.

    ``sample`` is the record of how ``train`` was read (``read_training_rows``); a negative
    sample's rate is corrected for in the model and the baseline."""
    from pipelines.core.io import atomic_dir, write_json

    sample = sample or {"kind": "none", "rows": len(train)}
    rate = float(sample.get("negative_rate", 1.0))
    started = time.perf_counter()
    model = fit_model(train, feature_set, params, seed)
    if rate != 1.0:
        apply_negative_rate(model, rate)
    timings.record("fit_seconds", time.perf_counter() - started)  # not in the card: not a result
    baseline = RuleBaseline.fit(train, negative_rate=rate)
    p_valid = predict(model, valid[feature_set.names].to_numpy(dtype=np.float64))
    y_valid = valid["clicked"].to_numpy()
    valid_metrics = {
        "auc": round(float(roc_auc_score(y_valid, p_valid)), 5),
        "log_loss": round(float(log_loss(y_valid, p_valid, labels=[0, 1])), 5),
        "baseline_auc": round(
            float(
                roc_auc_score(
                    y_valid,
                    baseline.predict(valid["item_id"].to_numpy(), valid["surface"].to_numpy()),
                )
            ),
            5,
        ),
    }
    card = {
        "model": "HistGradientBoostingClassifier (scikit-learn)",
        "task": "probability that an impression is clicked",
        "feature_set": feature_set.name,
        "features": feature_set.names,
        "categorical_features": list(feature_set.categorical),
        "params": {**params.model_dump(exclude={"out_dir"}), "seed": seed},
        "training_window": {
            "start": dataset_meta["windows"]["train_start"],
            "end": dataset_meta["windows"]["valid_start"],
        },
        "validation_window": {
            "start": dataset_meta["windows"]["valid_start"],
            "end": dataset_meta["windows"]["test_start"],
        },
        "rows": {"train": len(train), "valid": len(valid)},
        "training_sample": sample,
        "click_rate_train": round(baseline.global_ctr, 6),
        "valid_metrics": valid_metrics,
        "data_hashes": data_hashes,
        "iterations": int(model.n_iter_),
    }
    with atomic_dir(out_dir) as tmp:
        joblib.dump(model, tmp / "model.joblib")
        baseline.save(tmp / "baseline.json")
        write_json(tmp / "model_card.json", card)
        (tmp / "model_card.md").write_text(model_card_markdown(card))
    return card


def model_card_markdown(card: dict[str, Any]) -> str:
    """Render a model card dict as markdown for reviewers."""
    rows = "\n".join(f"| `{k}` | {v} |" for k, v in card["params"].items())
    hashes = "\n".join(f"| {k} | `{v}` |" for k, v in card["data_hashes"].items())
    vm = card["valid_metrics"]
    sample = card.get("training_sample") or {"kind": "none"}
    if sample["kind"] == "negative_downsampling":
        read = (
            f"* Training rows: a sample of {sample['rows_before']:,}: every click and "
            f"{sample['negative_rate']:.4g} of the non-clicks on every day (over "
            f"`train.max_train_rows` = {sample['max_train_rows']:,}); probabilities "
            "corrected by log(rate) on the logit\n"
        )
    else:
        read = "* Training rows: the whole training window\n"
    return (
        f"# Model card: {card['model']}\n\n{card['task'].capitalize()}.\n\n"
        f"* Feature set: `{card['feature_set']}` ({len(card['features'])} features)\n"
        f"* Training window: {card['training_window']['start']} to {card['training_window']['end']}"
        f" ({card['rows']['train']} rows)\n"
        f"{read}"
        f"* Validation: AUC {vm['auc']}, log loss {vm['log_loss']} "
        f"(rule baseline AUC {vm['baseline_auc']})\n\n"
        f"## Hyperparameters\n\n| param | value |\n|---|---|\n{rows}\n\n"
        f"## Data hashes\n\n| input | md5 |\n|---|---|\n{hashes}\n"
    )


def load_model(
    model_dir: Path,
) -> tuple[HistGradientBoostingClassifier, RuleBaseline, dict[str, Any]]:
    """Load model, baseline and card from a ``train`` output folder."""
    model = joblib.load(model_dir / "model.joblib")
    baseline = RuleBaseline.load(model_dir / "baseline.json")
    card = json.loads((model_dir / "model_card.json").read_text())
    return model, baseline, card
