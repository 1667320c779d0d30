"""Patient-level splits: a patient never appears in two splits."""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Mapping

import numpy as np

from slidestream.errors import ConfigError
from slidestream.sampling.cohort import SlideEntry

__all__ = ["parse_split", "split_by_patient"]


def parse_split(text: str) -> dict[str, float]:
    """``"train=0.7,val=0.15,test=0.15"`` → ``{"train": 0.7, ...}`` (fractions summing to 1)."""
    out: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = part.partition("=")
        try:
            out[name.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep or not name.strip() or out[name.strip()] < 0:
            raise ConfigError(f"split must look like train=0.7,val=0.15,test=0.15, got {text!r}")
    if not out or abs(sum(out.values()) - 1.0) > 1e-6:
        raise ConfigError(f"split fractions must sum to 1, got {text!r}")
    return out


def split_by_patient(
    slides: list[SlideEntry], fractions: Mapping[str, float], seed: int = 0
) -> dict[str, list[SlideEntry]]:
    """Assign whole patients to splits in the given proportions, stratified by label.

    A patient's label is the most common label of its slides; patients of each label are
    shuffled with ``seed`` and cut by the cumulative fractions. Slides whose cohort ``split``
    column names one of the requested splits keep it (all slides of their patient follow).
    """
    if not fractions:
        raise ConfigError("no splits given")
    by_patient: dict[str, list[SlideEntry]] = defaultdict(list)
    for s in slides:
        by_patient[s.patient_id].append(s)
    out: dict[str, list[SlideEntry]] = {name: [] for name in fractions}
    strata: dict[str | None, list[str]] = defaultdict(list)
    for patient, entries in sorted(by_patient.items()):
        fixed = next((e.split for e in entries if e.split in fractions), None)
        if fixed is not None:
            out[fixed].extend(entries)
            continue
        label = Counter(e.label for e in entries).most_common(1)[0][0]
        strata[label].append(patient)
    rng = np.random.default_rng(seed)
    names = list(fractions)
    cum = np.cumsum([fractions[n] for n in names])
    for label in sorted(strata, key=str):
        patients = [strata[label][i] for i in rng.permutation(len(strata[label]))]
        bounds = np.rint(cum * len(patients)).astype(int)
        start = 0
        for name, stop in zip(names, bounds, strict=True):
            for p in patients[start:stop]:
                out[name].extend(by_patient[p])
            start = stop
    return out
