"""One internal description for raw datasets in the MSD and the nnU-Net v2 layout.

``load_dataset`` = ``parse_dataset`` (dataset.json and folder listings; no image is opened) +
``validation.structural_problems`` (ids, paths, file existence, label declarations, splits), raising
``DatasetError`` with every problem. Header and voxel checks live in ``decathlete.io.validation``.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from decathlete.io.images import SUPPORTED_SUFFIXES
from decathlete.io.validation import DatasetError, Problem, structural_problems

LabelValue = int | tuple[int, ...]
_MSD_ENTRY = '{"image": "./imagesTr/x.nii.gz", "label": "./labelsTr/x.nii.gz"}'


@dataclass(frozen=True)
class Case:
    """One case: its image file(s) and, for training cases, its label file.

    Attributes:
        id: Case identifier (file name without suffix / channel index).
        images: One 4D file (MSD multi-channel) or one file per channel (nnU-Net ``_0000`` ...).
        label: Label file, ``None`` for unlabelled (test) cases.
    """

    id: str
    images: tuple[Path, ...]
    label: Path | None = None


@dataclass(frozen=True)
class DatasetDescription:
    """Layout-independent description of a raw dataset.

    Attributes:
        name: Dataset name (dataset.json ``name``, else the folder name).
        root: Absolute dataset folder.
        layout: ``"msd"`` or ``"nnunetv2"``.
        channel_names: Channel (modality) names; the index is the channel.
        labels: Name -> value as declared. For region-based nnU-Net datasets a value may be a tuple of
            label values (the region), exactly as in dataset.json; plain datasets only hold ints. The name
            ``"ignore"`` (either layout) is nnU-Net v2's ignore label.
        regions: Region name -> label values (every non-background entry) for region-based datasets, else None.
        regions_class_order: nnU-Net ``regions_class_order`` (one label value per region), else None.
        file_ending: Image file suffix, e.g. ``".nii.gz"``.
        training: Labelled cases.
        test: Unlabelled cases (MSD ``test`` list / nnU-Net ``imagesTs``), possibly empty.
        splits: Folds from an optional ``splits.json`` next to dataset.json, else None.
    """

    name: str
    root: Path
    layout: str
    channel_names: tuple[str, ...]
    labels: dict[str, LabelValue]
    regions: dict[str, tuple[int, ...]] | None
    regions_class_order: tuple[int, ...] | None
    file_ending: str
    training: tuple[Case, ...]
    test: tuple[Case, ...]
    splits: list[dict[str, list[str]]] | None = None

    @property
    def num_channels(self) -> int:
        """Number of input channels."""
        return len(self.channel_names)

    @property
    def label_values(self) -> tuple[int, ...]:
        """Sorted integer values a label file may contain (region members and the ignore label included)."""
        return tuple(sorted({x for v in self.labels.values() for x in (v if isinstance(v, tuple) else (v,))}))

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form; case paths are stored relative to ``root`` when inside it."""

        def rel(p: Path) -> str:
            try:
                return p.relative_to(self.root).as_posix()
            except ValueError:
                return str(p)

        def case(c: Case) -> dict[str, Any]:
            return {
                "id": c.id,
                "images": [rel(p) for p in c.images],
                "label": None if c.label is None else rel(c.label),
            }

        return {
            "name": self.name,
            "root": str(self.root),
            "layout": self.layout,
            "channel_names": list(self.channel_names),
            "labels": {k: list(v) if isinstance(v, tuple) else v for k, v in self.labels.items()},
            "regions": None if self.regions is None else {k: list(v) for k, v in self.regions.items()},
            "regions_class_order": None if self.regions_class_order is None else list(self.regions_class_order),
            "file_ending": self.file_ending,
            "training": [case(c) for c in self.training],
            "test": [case(c) for c in self.test],
            "splits": self.splits,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DatasetDescription:
        """Inverse of :meth:`to_dict`."""
        root = Path(d["root"])

        def case(c: dict[str, Any]) -> Case:
            label = None if c.get("label") is None else root / c["label"]
            return Case(id=c["id"], images=tuple(root / p for p in c["images"]), label=label)

        regions, rco = d.get("regions"), d.get("regions_class_order")
        return cls(
            name=d["name"],
            root=root,
            layout=d["layout"],
            channel_names=tuple(d["channel_names"]),
            labels={k: tuple(v) if isinstance(v, list) else int(v) for k, v in d["labels"].items()},
            regions=None if regions is None else {k: tuple(v) for k, v in regions.items()},
            regions_class_order=None if rco is None else tuple(rco),
            file_ending=d["file_ending"],
            training=tuple(case(c) for c in d["training"]),
            test=tuple(case(c) for c in d.get("test", [])),
            splits=d.get("splits"),
        )


def strip_image_suffix(name: str) -> tuple[str, str]:
    """Split a file name into (stem, suffix), knowing that ``.nii.gz`` is one suffix."""
    lower = name.lower()
    for s in SUPPORTED_SUFFIXES:
        if lower.endswith(s):
            return name[: -len(s)], name[-len(s) :]
    return Path(name).stem, Path(name).suffix


def _entry_path(root: Path, entry: str) -> Path:
    # Neither normalised nor resolved: '../' stays visible in messages and path_escape_reason judges it.
    p = Path(entry.strip())
    return p if p.is_absolute() else root / p


# ---------------------------------------------------------------------------------------------------- parsing


def _read_json(path: Path, what: str) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise DatasetError([Problem(None, f"cannot read {what} {path}: {e}", "check the file permissions")]) from e
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        msg = f"{what} {path} is not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}"
        fix = f"correct the JSON syntax at line {e.lineno} (a trailing comma or a missing quote is typical)"
        raise DatasetError([Problem(None, msg, fix)]) from e


def _channels(spec: Any, key: str, problems: list[Problem]) -> tuple[str, ...]:
    if not isinstance(spec, dict):
        problems.append(Problem(None, f'\'{key}\' must be an object like {{"0": "CT"}}', f"rewrite '{key}'"))
        return ()
    try:
        items = sorted((int(k), str(v)) for k, v in spec.items())
    except ValueError:
        problems.append(Problem(None, f"'{key}' keys must be channel indices, got {list(spec)}", 'use "0", "1", ...'))
        return ()
    if (keys := [i for i, _ in items]) != list(range(len(items))):
        problems.append(Problem(None, f"'{key}' keys {keys} are not 0..{len(items) - 1}", "number channels from 0"))
    return tuple(v for _, v in items)


def _msd_labels(spec: Any, problems: list[Problem]) -> dict[str, LabelValue]:
    labels: dict[str, LabelValue] = {}
    if not isinstance(spec, dict):
        problems.append(Problem(None, "'labels' must be an object value -> name", 'write e.g. {"0": "background"}'))
        return labels
    for k, name in spec.items():
        try:
            value = int(k)
        except ValueError:
            problems.append(Problem(None, f"label key '{k}' is not an integer", 'MSD labels map "value": "name"'))
            continue
        if name in labels:
            problems.append(Problem(None, f"label name '{name}' is used for {labels[name]} and {value}", "rename one"))
        labels[str(name)] = value
    return labels


def _nnunet_labels(spec: Any, problems: list[Problem]) -> dict[str, LabelValue]:
    labels: dict[str, LabelValue] = {}
    if not isinstance(spec, dict):
        problems.append(Problem(None, "'labels' must be an object name -> value", 'write e.g. {"background": 0}'))
        return labels
    for name, v in spec.items():
        if isinstance(v, int) and not isinstance(v, bool):
            labels[name] = v
        elif isinstance(v, list) and v and all(isinstance(x, int) and not isinstance(x, bool) for x in v):
            labels[name] = tuple(v)
        else:
            msg = f"label '{name}' has value {v!r}; expected an integer or a list of integers (region)"
            problems.append(Problem(None, msg, "fix the value in dataset.json 'labels'"))
    return labels


def _load_splits(root: Path, problems: list[Problem]) -> list[dict[str, list[str]]] | None:
    path = root / "splits.json"
    if not path.is_file():
        return None
    data = _read_json(path, "splits.json")
    ok = isinstance(data, list) and all(
        isinstance(f, dict)
        and isinstance(f.get("train"), list)
        and isinstance(f.get("val"), list)
        and all(isinstance(i, str) for i in f["train"] + f["val"])
        for f in data
    )
    if not ok:
        fix = 'write a list of folds: [{"train": ["case_a", ...], "val": ["case_b", ...]}, ...]'
        problems.append(Problem(None, "splits.json does not have the nnU-Net format", fix))
        return None
    return [{"train": list(f["train"]), "val": list(f["val"])} for f in data]


def _parse_msd(root: Path, meta: dict[str, Any], problems: list[Problem]) -> dict[str, Any]:
    channel_names = _channels(meta["modality"], "modality", problems)

    def images_for(p: Path) -> tuple[Path, ...]:
        # nnU-Net v1 style: dataset.json lists x.nii.gz but the files are x_0000.nii.gz, x_0001.nii.gz ...
        stem, suffix = strip_image_suffix(p.name)
        per_channel = [p.with_name(f"{stem}_{i:04d}{suffix}") for i in range(max(len(channel_names), 1))]
        if not os.path.lexists(p) and os.path.lexists(per_channel[0]):
            return tuple(per_channel)
        return (p,)

    def case_of(entry: Any, where: str, labelled: bool) -> Case | None:
        image = entry.get("image") if isinstance(entry, dict) else entry
        if not isinstance(image, str) or not image.strip():
            fix = _MSD_ENTRY if labelled else '"./imagesTs/x.nii.gz"'
            problems.append(Problem(None, f"malformed '{where}' entry {entry!r}", f"write entries as {fix}"))
            return None
        label = entry.get("label") if labelled and isinstance(entry, dict) else None
        label_path = _entry_path(root, label) if isinstance(label, str) and label.strip() else None
        path = _entry_path(root, image)
        return Case(id=strip_image_suffix(path.name)[0], images=images_for(path), label=label_path)

    training = meta["training"] if isinstance(meta["training"], list) else []
    test = meta.get("test") or []
    if not isinstance(test, list):
        problems.append(Problem(None, "'test' must be a list of image paths", 'write "test": ["./imagesTs/x.nii.gz"]'))
        test = []
    tr = [c for e in training if (c := case_of(e, "training", True)) is not None]
    ts = [c for e in test if (c := case_of(e, "test", False)) is not None]
    ending = strip_image_suffix(tr[0].images[0].name)[1] if tr else ".nii.gz"
    labels = _msd_labels(meta["labels"], problems)
    return {"channel_names": channel_names, "labels": labels, "regions": None, "rco": None, "file_ending": ending,
            "training": tr, "test": ts}  # fmt: skip


def _group_channel_files(folder: Path, ending: str, problems: list[Problem]) -> dict[str, dict[int, Path]]:
    pattern = re.compile(rf"^(?P<case>.+)_(?P<ch>\d{{4}}){re.escape(ending)}$")
    cases: dict[str, dict[int, Path]] = {}
    if not folder.is_dir():
        return cases
    for f in sorted(folder.iterdir()):
        if f.name.startswith("."):
            continue  # .DS_Store and editor droppings are not data
        m = pattern.match(f.name)
        if m:
            cases.setdefault(m["case"], {})[int(m["ch"])] = f
        elif f.name.endswith(ending) or strip_image_suffix(f.name)[1].lower() in SUPPORTED_SUFFIXES:
            msg = f"{folder.name}/{f.name} does not follow the <case>_<XXXX>{ending} channel file naming"
            problems.append(Problem(None, msg, f"rename it to <case>_0000{ending} (one file per channel) or remove it"))
    return cases


def _parse_nnunet(root: Path, meta: dict[str, Any], problems: list[Problem]) -> dict[str, Any]:
    channel_names = _channels(meta["channel_names"], "channel_names", problems)
    ending = str(meta["file_ending"])
    labels = _nnunet_labels(meta["labels"], problems)
    rco = meta.get("regions_class_order")
    regions = None
    # The ignore label is no region (nnU-Net v2 skips it too); validation refuses a list for it.
    if rco is not None or any(isinstance(v, tuple) for k, v in labels.items() if k != "ignore"):
        regions = {k: v if isinstance(v, tuple) else (v,) for k, v in labels.items() if v != 0 and k != "ignore"}
        if not (isinstance(rco, list) and all(isinstance(x, int) for x in rco)):
            fix = "add 'regions_class_order': one label value per region, in the order of 'labels'"
            problems.append(Problem(None, f"region-based labels need a list 'regions_class_order', got {rco!r}", fix))
            rco = None

    def cases(folder: str, labelled: bool) -> list[Case]:
        found = _group_channel_files(root / folder, ending, problems)
        out = []
        for cid, chans in found.items():
            extra = sorted(set(chans) - set(range(len(channel_names))))
            if extra:
                msg = f"has channel files {extra} in {folder} but dataset.json declares {len(channel_names)} channels"
                problems.append(Problem(cid, msg, "remove the extra files or declare the channels in 'channel_names'"))
            # Expected paths for every declared channel: missing ones are reported by structural_problems.
            images = tuple(chans.get(i, root / folder / f"{cid}_{i:04d}{ending}") for i in range(len(channel_names)))
            label = root / "labelsTr" / f"{cid}{ending}" if labelled else None
            out.append(Case(id=cid, images=images or tuple(chans.values()), label=label))
        return out

    training = cases("imagesTr", True)
    known = {c.id for c in training}
    if (root / "labelsTr").is_dir():
        for f in sorted((root / "labelsTr").iterdir()):
            if f.name.endswith(ending) and f.name[: -len(ending)] not in known:
                msg = f"label labelsTr/{f.name} has no image files imagesTr/{f.name[: -len(ending)]}_0000{ending}"
                problems.append(Problem(f.name[: -len(ending)], msg, "add the image files or remove the label"))
    n_decl = meta.get("numTraining")
    if isinstance(n_decl, int) and training and n_decl != len(training):
        msg = f"dataset.json says numTraining={n_decl} but imagesTr holds {len(training)} cases"
        problems.append(Problem(None, msg, f"set numTraining to {len(training)} or add/remove cases"))
    return {"channel_names": channel_names, "labels": labels, "regions": regions,
            "rco": None if rco is None else tuple(rco), "file_ending": ending,
            "training": training, "test": cases("imagesTs", False)}  # fmt: skip


def parse_dataset(root: str | Path) -> tuple[DatasetDescription, list[Problem]]:
    """Read dataset.json (and, for nnU-Net v2, the folder listing) into a description; opens no image.

    Args:
        root: Dataset folder containing dataset.json.

    Returns:
        The description and the problems found while parsing that the description cannot represent
        (malformed entries, unpaired nnU-Net files, ...). Run :func:`structural_problems` for the rest.

    Raises:
        DatasetError: For problems that leave nothing to describe (no/invalid dataset.json, missing keys,
            no training cases).
    """
    root = Path(os.path.realpath(Path(root).expanduser()))
    path = root / "dataset.json"
    if not path.is_file():
        fix = "point to the folder that contains dataset.json (MSD or nnU-Net v2 layout), or write one"
        raise DatasetError([Problem(None, f"no dataset.json in {root}", fix)])
    meta = _read_json(path, "dataset.json")
    if not isinstance(meta, dict):
        raise DatasetError([Problem(None, "dataset.json must contain a JSON object", "see the MSD/nnU-Net format")])
    layout = "nnunetv2" if "channel_names" in meta or "file_ending" in meta else "msd"
    required = ["channel_names", "file_ending"] if layout == "nnunetv2" else ["modality", "training"]
    required.append("labels")
    missing = [k for k in required if k not in meta]
    if missing:
        fix = f"add {', '.join(repr(k) for k in missing)} to dataset.json ({layout} layout detected from its keys)"
        raise DatasetError([Problem(None, f"dataset.json lacks required key(s) {missing}", fix)])
    problems: list[Problem] = []
    parsed = (_parse_nnunet if layout == "nnunetv2" else _parse_msd)(root, meta, problems)
    if not parsed["training"]:
        where = "imagesTr/<case>_0000" + str(meta.get("file_ending")) if layout == "nnunetv2" else "'training'"
        fix = f"add labelled cases ({where}); a dataset needs at least one training case"
        raise DatasetError([*problems, Problem(None, "the training list is empty", fix)])
    desc = DatasetDescription(
        name=str(meta.get("name") or root.name),
        root=root,
        layout=layout,
        channel_names=parsed["channel_names"],
        labels=parsed["labels"],
        regions=parsed["regions"],
        regions_class_order=parsed["rco"],
        file_ending=parsed["file_ending"],
        training=tuple(parsed["training"]),
        test=tuple(parsed["test"]),
        splits=_load_splits(root, problems),
    )
    return desc, problems


def load_dataset(root: str | Path) -> DatasetDescription:
    """Load a raw dataset (MSD or nnU-Net v2 layout, detected from dataset.json's keys).

    Only dataset.json, splits.json and the folder listings are read; images are not opened (see
    :func:`decathlete.io.validation.check_dataset` for voxel-level checks).

    Args:
        root: Dataset folder containing dataset.json.

    Returns:
        The dataset description.

    Raises:
        DatasetError: Listing every structural problem (bad dataset.json, duplicate ids, files leaving the
            dataset folder or missing, unpaired nnU-Net files, unknown ids in splits.json, ...).
    """
    desc, problems = parse_dataset(root)
    problems += structural_problems(desc)
    if problems:
        raise DatasetError(problems, root=desc.root)
    return desc
