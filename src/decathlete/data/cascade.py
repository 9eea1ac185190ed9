"""nnU-Net's cascade: a full-resolution stage (``3d_cascade_fullres``) that also sees what its previous, coarser
stage (``3d_lowres``) predicted, as one more input channel per foreground label (one-hot).

Training data. The previous stage's ``decathlete crossval`` predicts every training case with the fold that held it
out (``models/<previous>/<recipe>/fold_<k>/validation/<case>``, on the raw image's grid); `prepare_previous_stage`
brings each of those label maps onto the cascade's preprocessed grid with the very function prediction uses
(`decathlete.preprocess.pipeline.labels_on_preprocessed_grid`) and stores it beside them
(``predicted_next_stage/<data identifier>/<case>.npy``), redoing a case only when its prediction changed. nnU-Net
resamples the previous stage's probabilities there instead, and its prediction then takes the other route; here
training sees exactly what prediction will feed the network. The sampler reads the stored map as the label's second
channel, so the spatial augmentation moves it with the label (nearest neighbour).

`previous_stage_channels` then turns that channel into the one-hot input channels, with nnU-Net's cascade
augmentations so the network learns not to copy the previous stage: with probability 0.4 per sample every channel
is dilated, eroded, opened or closed with a ball of radius 1-8 voxels; with probability 0.2 per sample every
channel loses one random connected component among those covering less than 15% of the patch. Both run on the CPU
with SciPy's exact Euclidean distance transform (a ball of radius r dilates where the distance to the mask is at
most r) and connected-components-3d; torch has neither, and a ball's structuring element of up to 17^3 voxels
would make a convolution far slower than the distance transform's linear time.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import cc3d
import numpy as np
import torch
from scipy import ndimage

from decathlete.data.folds import fold_of
from decathlete.data.splits import fold_split
from decathlete.io.atomic import write_atomic, write_json_atomic
from decathlete.io.images import SUPPORTED_SUFFIXES, read_label
from decathlete.planning.plans import Configuration, Plans
from decathlete.preprocess import cache
from decathlete.preprocess.pipeline import labels_on_preprocessed_grid

NEXT_STAGE_DIR = "predicted_next_stage"
P_MORPHOLOGY = 0.4  # nnU-Net: ApplyRandomBinaryOperatorTransform, per sample
BALL_RADIUS = (1.0, 8.0)
P_REMOVE_COMPONENT = 0.2  # nnU-Net: RemoveRandomConnectedComponentFromOneHotEncodingTransform, per sample
MAX_REMOVED_SHARE = 0.15  # of the patch: larger components are never removed


def previous_stage_model(workdir: str | Path, config: Configuration, recipe: str) -> Path:
    """The folder of the previous stage's folds for a cascade trained with ``recipe`` in ``workdir``."""
    if not config.previous_stage:
        raise ValueError("this configuration is no cascade stage: it has no previous stage")
    return Path(workdir) / "models" / config.previous_stage / recipe


def next_stage_folder(previous_model: Path, data_identifier: str) -> Path:
    """Where the previous stage's predictions lie on the cascade's preprocessed grid (``<case>.npy``)."""
    return previous_model / NEXT_STAGE_DIR / data_identifier


def crossval_predictions(workdir: str | Path, plans: Plans, previous_model: Path) -> dict[str, Path]:
    """Case id -> the previous stage's cross-validation prediction of it, made by the fold that held it out."""
    found: dict[str, Path] = {}
    for fold_dir in sorted(previous_model.glob("fold_*")):
        fold = fold_of(fold_dir.name)
        if not isinstance(fold, int) or not (fold_dir / "validation").is_dir():  # fold_all holds no case out
            continue
        for cid in fold_split(workdir, plans, fold)["val"]:
            files = [fold_dir / "validation" / f"{cid}{s}" for s in SUPPORTED_SUFFIXES]
            present = [f for f in files if f.is_file()]
            if present:
                found[cid] = present[0]
    return found


def prepare_previous_stage(workdir: str | Path, plans: Plans, config: Configuration, recipe: str,
                           case_ids: Sequence[str], write: bool = True) -> Path:
    """The folder of ``case_ids``' previous-stage label maps on the cascade's preprocessed grid, written where missing
    or older than their cross-validation prediction (module docstring); ``write=False`` only checks that every case
    has a prediction (the other ranks of a distributed run, while rank 0 writes).

    Raises:
        FileNotFoundError: a case without a cross-validation prediction of the previous stage, or not preprocessed,
            naming the commands that make them.
    """
    workdir = Path(workdir)
    model = previous_stage_model(workdir, config, recipe)
    predictions = crossval_predictions(workdir, plans, model)
    missing = [cid for cid in case_ids if cid not in predictions]
    if missing:
        prev = config.previous_stage
        raise FileNotFoundError(
            f"the cascade takes {prev}'s cross-validation predictions of every case it trains and validates on, and "
            f"{len(missing)} are missing (e.g. {missing[0]}) under {model}: train every fold of {prev} "
            f"(`decathlete train {workdir} -c {prev} -f every`) and predict their held-out cases "
            f"(`decathlete crossval {workdir} -c {prev}`)")
    cache_dir = workdir / "preprocessed" / config.data_identifier
    out = next_stage_folder(model, config.data_identifier)
    for cid in case_ids if write else ():
        _convert(predictions[cid], cache_dir, cid, out)
    return out


def _stamp(source: Path) -> dict[str, object]:
    stat = source.stat()
    return {"source": str(source), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _convert(source: Path, cache_dir: Path, case_id: str, out: Path) -> None:
    """``source`` (a label file on the raw grid) on the case's preprocessed grid as ``out/<case>.npy``, unless the
    one there was made from this very file."""
    target, record = out / f"{case_id}.npy", out / f"{case_id}.json"
    stamp = _stamp(source)
    if target.is_file() and record.is_file() and _read_json(record) == stamp:
        return
    properties = cache.read_properties(cache_dir, case_id)
    if properties is None:
        raise FileNotFoundError(f"{case_id} is not preprocessed in {cache_dir}: run `decathlete preprocess "
                                f"{cache_dir.parent.parent} -c {cache_dir.name}` first")
    seg, _ = read_label(source)
    grid = labels_on_preprocessed_grid(seg, properties)

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # a file object: numpy would append ".npy" to a temporary's name
            np.save(f, grid)

    write_atomic(target, write)
    write_json_atomic(record, stamp)  # last: a map without its record is made again


def _read_json(path: Path) -> object:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def open_previous_stage(folder: str | Path, case_id: str) -> np.ndarray:
    """A case's previous-stage label map on the preprocessed grid, memory-mapped (the sampler reads windows of it)."""
    path = Path(folder) / f"{case_id}.npy"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: the cascade's trainer writes it from the previous stage's "
                                "cross-validation predictions")
    return np.load(path, mmap_mode="r")


def previous_stage_channels(image: torch.Tensor, previous: torch.Tensor, values: Sequence[int],
                            generator: torch.Generator | None = None) -> torch.Tensor:
    """The network input of a cascade batch: ``image`` with the previous stage's labels ``previous`` ``(B, 1, ...)``
    appended one-hot, a channel per foreground label value in ``values``; with ``generator``, nnU-Net's cascade
    augmentations on those channels (module docstring)."""
    onehot = torch.cat([previous == v for v in values], 1)
    if generator is not None:
        onehot = _augment(onehot, generator)
    return torch.cat([image, onehot.to(image.dtype)], 1)


def _augment(onehot: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random morphology, then random component removal, per sample and channel; every number is drawn whatever
    the data, so a batch's augmentation depends on the generator alone."""
    b, c = onehot.shape[:2]
    morph, op, radius, remove, pick = (torch.rand(shape, generator=generator) for shape in
                                       ((b,), (b, c), (b, c), (b,), (b, c)))
    if not ((morph < P_MORPHOLOGY).any() or (remove < P_REMOVE_COMPONENT).any()):
        return onehot
    masks = onehot.cpu().numpy().copy()
    for i in range(b):
        for k in range(c):
            if morph[i] < P_MORPHOLOGY:
                r = BALL_RADIUS[0] + float(radius[i, k]) * (BALL_RADIUS[1] - BALL_RADIUS[0])
                masks[i, k] = binary_operation(masks[i, k], int(op[i, k] * 4), r)
            if remove[i] < P_REMOVE_COMPONENT:
                masks[i, k] = remove_component(masks[i, k], float(pick[i, k]))
    return torch.from_numpy(masks).to(onehot.device)


def binary_operation(mask: np.ndarray, which: int, radius: float) -> np.ndarray:
    """Dilation (0), erosion (1), opening (2) or closing (3) of ``mask`` by a ball of ``radius`` voxels. As
    scikit-image's, erosion does not eat in from the array's border (outside counts as foreground there)."""
    if not mask.any() or mask.all():
        return mask
    steps = {0: "d", 1: "e", 2: "ed", 3: "de"}[which]
    for step in steps:
        if step == "d":
            mask = ndimage.distance_transform_edt(~mask) <= radius
        elif mask.any():
            mask = ndimage.distance_transform_edt(mask) > radius
        if not mask.any() or mask.all():
            break
    return mask


def remove_component(mask: np.ndarray, pick: float) -> np.ndarray:
    """``mask`` without one of its connected components (full connectivity) smaller than ``MAX_REMOVED_SHARE`` of
    the array, the ``pick``-th quantile of them (``pick`` in [0, 1)); unchanged when there is none."""
    if not mask.any():
        return mask
    components = cc3d.connected_components(np.ascontiguousarray(mask, dtype=np.uint8),
                                           connectivity=26 if mask.ndim == 3 else 8)
    sizes = np.bincount(components.ravel())[1:]
    small = np.flatnonzero(sizes < MAX_REMOVED_SHARE * mask.size) + 1
    if not len(small):
        return mask
    return mask & (components != small[min(int(pick * len(small)), len(small) - 1)])


__all__ = ["NEXT_STAGE_DIR", "crossval_predictions", "next_stage_folder", "open_previous_stage",
           "prepare_previous_stage", "previous_stage_channels", "previous_stage_model"]
