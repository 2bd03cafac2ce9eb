"""A hand-made sweep folder whose selection on validation is known by hand (tests/test_report.py).

Run folders as arcsim writes them (config.yaml, summary.json, rounds.jsonl with validation and test
accuracy), made without training so that every number is chosen: in one group the point kept on
validation is not the best on test, in another two points tie on validation.

    .venv/bin/python tests/selection_sweep.py /tmp/selection-sweep
    .venv/bin/arcsim report /tmp/selection-sweep --select validation
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

# One group's known answer: lr = 0.1 is kept on validation (its worst attack 0.60 beats lr = 0.2's 0.55),
# although lr = 0.2 is better on test (0.85 against 0.50): the report must give 0.50, not 0.85.
# {(lr, attack): {seed: {round: (validation accuracy, test accuracy)}}}, evaluations after rounds 2 and 4.
KEY_GROUP = {
    (0.1, "alie"): {1: {2: (0.6, 0.4), 4: (0.8, 0.6)}, 2: {2: (0.8, 0.6), 4: (0.6, 0.4)}},  # 0.70 (not 0.80), 0.50
    (0.1, "sign_flip"): {seed: {2: (0.5, 0.55), 4: (0.6, 0.5)} for seed in (1, 2)},  # 0.60, 0.55
    (0.2, "alie"): {seed: {2: (0.7, 0.8), 4: (0.8, 0.9)} for seed in (1, 2)},  # 0.80, 0.90
    (0.2, "sign_flip"): {seed: {2: (0.55, 0.85), 4: (0.5, 0.8)} for seed in (1, 2)},  # 0.55, 0.85
}
# A tie on validation (0.70 both): the first point in ascending order (lr = 0.1) is kept, test 0.60 not 0.65.
TIE_GROUP = {
    (lr, attack): {seed: {2: (0.7, test), 4: (0.6, test)} for seed in (1, 2)}
    for lr, test in ((0.1, 0.6), (0.2, 0.65))
    for attack in ("alie", "sign_flip")
}
SELECTION_BASE = {
    "task": "synthetic",
    "model": "mlp",
    "num_honest": 4,
    "rounds": 4,
    "eval_every": 2,
    "validation_fraction": 0.2,
}
HETEROGENEITY = ({"partitioner": "extreme"}, {"partitioner": "dirichlet", "alpha": 0.5})
PIPELINES = (
    {"pipeline": "nnm > cwtm"},
    {"pipeline": "static_clip > nnm > cwtm", "pipeline_params": {"c": 2}},
    {"pipeline": "arc > nnm > cwtm"},
)


def write_run(folder: Path, curve: dict[int, tuple[float, float | None]], **values: object) -> None:
    """A completed run folder as arcsim writes it (config.yaml, summary.json, rounds.jsonl)."""
    from arcsim.config import from_dict

    config = from_dict({**SELECTION_BASE, **values})
    records = []
    for r in range(config.rounds):
        validation, test = curve.get(r + 1, (None, None))
        records.append(
            {
                "round": r,
                "lr": config.lr,
                "received_honest": config.num_honest,
                "received_byzantine": config.num_byzantine,
                "aggregated": True,
                "skip_reason": None,
                "clip_threshold": 1.5 if config.pipeline.startswith("arc") else None,
                "clipped_honest": 0,
                "clipped_byzantine": config.num_byzantine,
                "aggregate_error": 0.01,
                "aggregate_norm": 0.1,
                "train_loss": 2.0,
                "accuracy": test,
                "test_loss": None if test is None else 1.0,
                "validation_accuracy": validation,
                "validation_loss": None if validation is None else 1.0,
                "round_seconds": 0.01,
                "aggregation_seconds": 0.001,
                "stage_seconds": {},
                "eval_seconds": None if test is None else 0.001,
                "clipped_rows": 0,
            }
        )
    tests = [t for _, t in curve.values() if t is not None]
    summary = {
        "config": config.to_dict(),
        "engine": "inproc",
        "status": "completed",
        "rounds_completed": config.rounds,
        "final_accuracy": tests[-1] if tests else None,
        "max_accuracy": max(tests, default=None),
        "final_params_sha256": "0" * 64,
        "num_parameters": 1,
        "run_settings": None,
        "wall_seconds": 0.0,
    }
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(config.to_yaml())
    (folder / "summary.json").write_text(json.dumps(summary, indent=2))
    (folder / "rounds.jsonl").write_text("".join(json.dumps(record) + "\n" for record in records))


def _group_curves(heterogeneity: int, f: int, pipeline: int) -> dict:
    """The hand-made answers for two groups; elsewhere flat curves where lr = 0.2 wins on both sets."""
    if (heterogeneity, f, pipeline) == (0, 1, 0):
        return KEY_GROUP
    if (heterogeneity, f, pipeline) == (0, 1, 2):
        return TIE_GROUP
    level = 0.3 + 0.1 * pipeline + 0.2 * heterogeneity - 0.05 * f
    return {
        (lr, attack): {seed: {2: (level + bonus, level + bonus / 2), 4: (level, level)} for seed in (1, 2)}
        for lr, bonus in ((0.1, 0.0), (0.2, 0.02))
        for attack in ("alie", "sign_flip")
    }


def write_selection_sweep(out: Path) -> Path:
    """2 heterogeneities x f in {1, 3} x 3 pipelines x lr in {0.1, 0.2} x 2 attacks x 2 seeds: 96 run folders."""
    for h, heterogeneity in enumerate(HETEROGENEITY):
        for f in (1, 3):
            for p, pipeline in enumerate(PIPELINES):
                for (lr, attack), seeds in _group_curves(h, f, p).items():
                    for seed, curve in seeds.items():
                        name = f"h{h}-f{f}-p{p}-lr{lr}-{attack}-s{seed}"
                        values = {**heterogeneity, **pipeline, "num_byzantine": f, "attack": attack}
                        write_run(out / name, curve, **values, lr=lr, seed=seed)
    return out


if __name__ == "__main__":
    if len(sys.argv) != 2 or Path(sys.argv[1]).exists():
        sys.exit("usage: python tests/selection_sweep.py NEW_FOLDER (a folder that does not exist yet)")
    print(f"wrote {len(list(write_selection_sweep(Path(sys.argv[1])).iterdir()))} run folders in {sys.argv[1]}")
