"""The validation split: held-out training groups that a run looks at after every epoch.

A manifest's ``val`` split is carved from its training videos **by group** (UCF-101's ``_gNN_``: the clips
of one group share actor and scene, so a group in two splits would let the validation figures see the
training videos), per class: ``round(groups x fraction)`` of each class's groups, at least one and never
all of them. The groups are ranked by a stable hash of (class, group), so the same videos give the same
split on every machine, and a video without a group is a group of its own. A class with a single training
group cannot be held out by group: its clips are held out instead (a clip of the same scene as training
clips, so that class's validation figures are optimistic), and the manifest lists such classes
(``val_by_clip``) and says so in its ``split_rule``. The test split is never read or changed.

Carving again (a refresh that added training videos, another ``val_fraction``) keeps the groups that are
already held out while the class needs as many, so a model's validation videos stay its validation
videos from one manifest version to the next. The fraction is recorded in the manifest
(``val_fraction``) and in its ``split_rule``.
"""

from __future__ import annotations

import hashlib
import re

from essp.datasets.manifest import Manifest
from essp.errors import EsspError

VAL_SPLIT = "val"
DEFAULT_VAL_FRACTION = 0.1
MAX_VAL_FRACTION = 0.5
_GROUP = re.compile(r"_g(\d+)_", re.IGNORECASE)
_RULE = re.compile(r"(; )?validation: [^;]*")


def video_group(video_id: str) -> str:
    """The group a video belongs to: "<Class>/g<NN>" from a UCF-101 name, else the video's own id."""
    class_name, _, name = video_id.rpartition("/")
    match = _GROUP.search(name)
    return f"{class_name}/g{int(match.group(1))}" if match else video_id


def check_fraction(fraction: float) -> float:
    if not 0 < fraction <= MAX_VAL_FRACTION:
        raise EsspError(f"val_fraction {fraction!r}: must be above 0 and at most {MAX_VAL_FRACTION} (the share of "
                        "each class's training groups held out for validation)")
    return float(fraction)


def _rank(group: str) -> str:
    return hashlib.sha256(f"val:{group}".encode()).hexdigest()


def carve_validation(manifest: Manifest, fraction: float = DEFAULT_VAL_FRACTION, *,
                     previous: Manifest | None = None) -> Manifest:
    """A copy of ``manifest`` (same version) whose ``train`` and ``val`` splits are the training pool (train
    and val) re-divided by group with ``fraction``; see the module's doc. Test and other splits are kept.

    ``previous`` (default: ``manifest`` itself) is the version whose validation split is kept: carved again
    with the same fraction, every one of its validation videos still in the pool stays (a quarantine or a
    deleted video moves nothing else) and only new videos are assigned; with another fraction its held-out
    groups come first."""
    fraction = check_fraction(fraction)
    if "train" not in manifest.splits:
        raise EsspError(f"manifest {manifest.ref} has no train split to carve a validation split from")
    previous = manifest if previous is None else previous
    was_val = set(previous.splits.get(VAL_SPLIT, []))
    same = previous.val_fraction is not None and abs(previous.val_fraction - fraction) < 1e-12
    pool = [*manifest.splits["train"], *manifest.splits.get(VAL_SPLIT, [])]
    held_before = {video_group(i) for i in was_val}
    labels = {v.id: v.label for v in manifest.videos}
    groups_of_class: dict[int, dict[str, list[str]]] = {}
    for video_id in pool:
        groups_of_class.setdefault(labels.get(video_id, -1), {}).setdefault(video_group(video_id), []).append(video_id)
    held: set[str] = set()  # video ids
    by_clip: list[str] = []
    for label, groups in sorted(groups_of_class.items()):
        name = manifest.classes[label] if 0 <= label < len(manifest.classes) else str(label)
        # a class held out by clip stays so (carved again with the same fraction), so that its clips stay put
        single = (len(groups) == 1 and any(len(ids) >= 2 for ids in groups.values())) or (
            same and name in previous.val_by_clip)
        if not single:
            units, before = dict(groups), held_before
        else:  # one training group: held out by clip (it shares its scene with the training clips; said)
            units, before = {i: [i] for ids in groups.values() for i in ids}, was_val
            by_clip.append(name)
        target = min(max(round(len(units) * fraction), 1), len(units) - 1) if len(units) >= 2 else 0
        # units held out before come first, then the others by their stable rank
        ranked = sorted(units, key=lambda u: (u not in before, _rank(u)))
        chosen = set(ranked[:target]) | ({u for u in units if u in before} if same else set())
        held.update(i for unit in chosen for i in units[unit])
    val = sorted(i for i in pool if i in held)
    train = [i for i in manifest.splits["train"] if i not in held]
    train += sorted(i for i in manifest.splits.get(VAL_SPLIT, []) if i not in held)
    rule = _RULE.sub("", manifest.split_rule).strip("; ")
    note = f"validation: {fraction:g} of each class's training groups"
    if by_clip:
        note += f", by clip in {len(by_clip)} class(es) with one training group ({', '.join(by_clip[:5])})"
    return manifest.model_copy(update={
        "splits": {**manifest.splits, "train": train, VAL_SPLIT: val}, "val_fraction": fraction,
        "val_by_clip": by_clip, "split_rule": f"{rule}; {note}" if rule else note,
    }, deep=True)


def needs_carving(manifest: Manifest, fraction: float | None) -> bool:
    """Whether ``manifest`` lacks a validation split, or has one of another fraction than ``fraction``
    (None: any fraction will do)."""
    if VAL_SPLIT not in manifest.splits or manifest.val_fraction is None:
        return True
    return fraction is not None and abs(manifest.val_fraction - fraction) > 1e-12
