"""Ensembles of configurations: average several configurations' probabilities per case, then one label map.

``decathlete predict -c 2d 3d_fullres`` (nnU-Net v2's ``nnUNetv2_ensemble`` on the fly): every configuration's
predictor (built by `load_predictor`, with the same folds, checkpoint, TTA and step options) predicts the case's
probabilities on the input grid; their mean becomes the label map the way one predictor makes it (softmax: the
label of the most probable channel, the first of equal maxima; regions: each region above 0.5 painted in
``regions_class_order``, later over earlier). The postprocessing is the ensemble's own, chosen on the
cross-validation by `decathlete.selection` into ``WORKDIR/ensembles/<A>+<B>/postprocessing.json``; a member's
``postprocessing.json`` was chosen for its own label maps and is not applied. Averaging happens on the input grid,
after each configuration has inverted its own preprocessing (configurations resample to different grids), as
nnU-Net ensembles the probabilities its predictors export.

Output folders behave as for one configuration (`decathlete.infer.outputs`): resumable, atomic, with provenance
(the members' identities and the ensemble's postprocessing) and ``efficiency.json`` (the members' costs added up).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from decathlete.infer.cases import check_output_folder, discover_cases
from decathlete.infer.efficiency import EfficiencyMeter, phase
from decathlete.infer.outputs import write_predictions
from decathlete.infer.postprocess import FILENAME, apply_postprocessing, load_postprocessing
from decathlete.infer.predictor import load_predictor
from decathlete.io.images import Geometry
from decathlete.metrics.efficiency import PHASES

ENSEMBLES = "ensembles"  # WORKDIR/ensembles/<A>+<B>/: an ensemble's cross-validation and postprocessing.json


def ensemble_name(configurations: Sequence[str]) -> str:
    """``2d+3d_fullres``: the folder name of an ensemble, in the order given."""
    return "+".join(configurations)


def ensemble_folder(workdir: str | Path, configurations: Sequence[str]) -> Path | None:
    """The existing ``WORKDIR/ensembles/<A>+<B>`` folder of these configurations, in whatever order it was named."""
    root, wanted = Path(workdir) / ENSEMBLES, sorted(configurations)
    if root.is_dir():
        for folder in sorted(root.iterdir()):
            if folder.is_dir() and sorted(folder.name.split("+")) == wanted:
                return folder
    return None


def label_map(probabilities: np.ndarray, class_values: Sequence[int], region_based: bool) -> np.ndarray:
    """The label map ``(z, y, x)`` of probabilities ``(K, z, y, x)``, as `decathlete.infer.predictor` makes it.

    Softmax: the label of the most probable channel (the first of equal maxima, as ``np.argmax``). Regions: channel
    k's label painted where its probability exceeds 0.5, in channel (``regions_class_order``) order.
    """
    dtype = np.uint8 if min(class_values) >= 0 and max(class_values) <= 255 else np.int16
    if not region_based:
        return np.asarray(class_values, dtype=dtype)[np.argmax(probabilities, axis=0)]
    label = np.zeros(probabilities.shape[1:], dtype=dtype)
    for k, value in enumerate(class_values):
        label[probabilities[k] > 0.5] = value
    return label


class EnsembleMeter:
    """The cost of a case through every member: the members' meters nested, their inputs and FLOPs added up."""

    def __init__(self, meters: Mapping[str, EfficiencyMeter]) -> None:
        self.meters = dict(meters)

    @contextmanager
    def case(self, record: dict[str, Any]) -> Iterator[dict[str, float]]:
        """As `EfficiencyMeter.case`: yields the phase seconds (the members fill them), fills ``record`` on exit."""
        seconds: dict[str, float] = dict.fromkeys(PHASES, 0.0)
        parts: dict[str, dict[str, Any]] = {name: {} for name in self.meters}
        with ExitStack() as stack:
            for name, meter in self.meters.items():
                stack.enter_context(meter.case(parts[name]))
            yield seconds
        rows = list(parts.values())
        flops = [r["flops"] for r in rows]
        record.update({"seconds": rows[0]["seconds"], **{f"{k}_seconds": round(v, 4) for k, v in seconds.items()},
                       "peak_memory_mib": max(r["peak_memory_mib"] for r in rows),
                       "patches": sum(r["patches"] for r in rows),
                       "input_shapes": {name: r["input_shapes"] for name, r in parts.items()},
                       "flops": None if None in flops else sum(flops)})

    def run_record(self, **about: Any) -> dict[str, Any]:
        """The first member's device record, parameters and networks summed, FLOPs of one patch of each member."""
        members = {name: meter.run_record() for name, meter in self.meters.items()}
        first, flops = next(iter(members.values())), [m["flops_per_patch"] for m in members.values()]
        return {**{k: first[k] for k in ("device", "torch_threads", "memory_kind")},
                "parameters": sum(m["parameters"] for m in members.values()),
                "networks": sum(m["networks"] for m in members.values()),
                "flops_per_patch": None if None in flops else sum(flops), "members": members, **about}


class EnsemblePredictor:
    """Several configurations of one work folder, their probabilities averaged (module docstring).

    Args:
        workdir: the work folder (``WORKDIR/models/<config>/<recipe>/fold_<k>``); a single model folder holds one
            configuration only, so it is refused.
        configurations: two or more configuration names, each given once.
        folds: the folds of every member (`decathlete.infer.predictor.Predictor`).
        postprocess: apply the ensemble's ``postprocessing.json`` when `decathlete.selection` wrote one.
        predictor_kwargs: checkpoint, device, tta, step, recipe, overrides, whole_volume ...: for every member.

    Raises:
        ValueError: fewer than two configurations, one given twice, a model folder instead of a work folder, or
            members whose outputs mean different labels.

    A member is whatever `load_predictor` returns for its configuration; the ensemble uses its ``_predict`` (label,
    probabilities on the input grid, geometry), ``run_description``, ``efficiency_meter``, ``class_values``,
    ``region_based``, ``n_channels``, ``fold_dirs`` and ``skipped_folds``, as `decathlete.infer.predictor.Predictor`
    has them.
    """

    def __init__(self, workdir: str | Path, configurations: Sequence[str],
                 folds: Sequence[int | str] | int | str | None = None, *, postprocess: bool = True,
                 **predictor_kwargs: Any) -> None:  # fmt: skip
        self.workdir, self.configurations = Path(workdir), list(configurations)
        _check_members(self.workdir, self.configurations)
        self.members = [load_predictor(self.workdir, c, folds, postprocess=False, **predictor_kwargs)
                        for c in self.configurations]
        first = self.members[0]
        for name, other in zip(self.configurations[1:], self.members[1:]):
            if (other.class_values, other.region_based, other.n_channels) != \
                    (first.class_values, first.region_based, first.n_channels):
                raise ValueError(f"{name} and {self.configurations[0]} output different labels or take different "
                                 "channels: they cannot be ensembled")
        self.class_values, self.region_based, self.n_channels = first.class_values, first.region_based, \
            first.n_channels
        self.recipes = {c: m.fold_dirs[0].parent.name for c, m in zip(self.configurations, self.members)}
        self.postprocessing, self.postprocessing_file, self.postprocessing_note = self._postprocessing(postprocess)

    def _postprocessing(self, postprocess: bool) -> tuple[dict[str, Any] | None, str | None, str]:
        """The ensemble's ``postprocessing.json``, its path and a note saying which, or (None, None, why none)."""
        if not postprocess:
            return None, None, "none (--no-postprocessing)"
        folder = ensemble_folder(self.workdir, self.configurations)
        spec = load_postprocessing(folder) if folder is not None else None
        if spec is None:
            where = self.workdir / ENSEMBLES / ensemble_name(self.configurations) / FILENAME
            return None, None, f"none: no {where} (`decathlete best {self.workdir}` writes it when this ensemble wins)"
        path = folder / FILENAME
        if spec.get("recipes", self.recipes) != self.recipes:
            return None, None, f"none: {path} was chosen for the recipes {spec['recipes']}, not {self.recipes}"
        return spec, str(path), str(path)

    @property
    def folds(self) -> list[str]:
        return [f"{c}/{d.name}" for c, m in zip(self.configurations, self.members) for d in m.fold_dirs]

    @property
    def skipped_folds(self) -> list[str]:
        return [f"{c}/{name}" for c, m in zip(self.configurations, self.members) for name in m.skipped_folds]

    def _predict(self, image_paths: Sequence[Path], case_id: str | None, return_probabilities: bool,
                 seconds: dict[str, float] | None = None, progress: bool = False,
                 ) -> tuple[np.ndarray, np.ndarray | None, Geometry]:  # fmt: skip
        """Each member's probabilities on the input grid, averaged in float32, then the label map."""
        total, geometry = None, None
        for name, member in zip(self.configurations, self.members):
            _, probabilities, grid = member._predict(image_paths, case_id, True, seconds, progress)
            if geometry is not None and (diffs := geometry.same_grid(grid)):
                raise ValueError(f"{case_id}: {name} wrote another grid than {self.configurations[0]}: {diffs}")
            geometry = grid
            p = probabilities.astype(np.float32)
            total = p if total is None else np.add(total, p, out=total)
        assert total is not None and geometry is not None
        mean = np.divide(total, len(self.members), out=total)
        with phase(seconds, "export"):
            label = apply_postprocessing(label_map(mean, self.class_values, self.region_based), self.postprocessing)
        return label, mean.astype(np.float16) if return_probabilities else None, geometry

    def run_description(self) -> dict[str, Any]:
        """The provenance identity: every member's, and the ensemble's postprocessing."""
        return {"ensemble": {c: m.run_description() for c, m in zip(self.configurations, self.members)},
                "postprocessing": self.postprocessing}

    def predict_folder(self, input_dir: str | Path, output_dir: str | Path, *, overwrite: bool = False,
                       save_probabilities: bool = False, progress: bool = True,
                       on_conflict: str = "refuse") -> dict[str, Any]:  # fmt: skip
        """As `Predictor.predict_folder`, with the averaged probabilities."""
        input_dir, output_dir = Path(input_dir), Path(output_dir)
        check_output_folder(input_dir, output_dir)
        return self.predict_cases(discover_cases(input_dir, self.n_channels), output_dir, overwrite=overwrite,
                                  save_probabilities=save_probabilities, progress=progress, on_conflict=on_conflict)

    def predict_cases(self, cases: Mapping[str, Sequence[Path]], output_dir: str | Path, *, overwrite: bool = False,
                      save_probabilities: bool = False, progress: bool = True,
                      on_conflict: str = "refuse") -> dict[str, Any]:  # fmt: skip
        """As `Predictor.predict_cases`; the result names the configurations, folds as ``<config>/fold_<k>``, the
        postprocessing file applied (or None) and ``postprocessing_note`` saying which or why none."""
        meter = EnsembleMeter({c: m.efficiency_meter() for c, m in zip(self.configurations, self.members)})
        members = [{"configuration": c, "model": str(m.fold_dirs[0].parent), "folds": [d.name for d in m.fold_dirs],
                    "skipped_folds": m.skipped_folds} for c, m in zip(self.configurations, self.members)]
        done = write_predictions(
            cases, output_dir, self._predict, description=self.run_description(),
            context={"model": str(self.workdir), "skipped_folds": self.skipped_folds}, class_values=self.class_values,
            meter=meter, about={"model": str(self.workdir), "configurations": self.configurations,
                                "recipes": self.recipes, "folds": self.folds},
            overwrite=overwrite, save_probabilities=save_probabilities, progress=progress, on_conflict=on_conflict)
        return {**{k: done[k] for k in ("n_cases", "n_done", "n_skipped", "seconds")}, "model": str(self.workdir),
                "configurations": self.configurations, "folds": self.folds, "skipped_folds": self.skipped_folds,
                "members": members, "postprocessing": self.postprocessing_file,
                "postprocessing_note": self.postprocessing_note,
                **{k: done[k] for k in ("case_seconds", "outputs", "efficiency")}}


def _check_members(workdir: Path, configurations: Sequence[str]) -> None:
    """Two or more distinct configurations of a work folder (a folder of ``fold_<k>`` is one configuration)."""
    if len(configurations) < 2:
        raise ValueError(f"an ensemble needs two or more configurations, got {list(configurations)}")
    if twice := sorted({c for c in configurations if list(configurations).count(c) > 1}):
        raise ValueError(f"configuration {', '.join(twice)} given twice in -c")
    if list(workdir.glob("fold_*")):
        raise ValueError(f"{workdir} is one configuration's model folder; predicting with several configurations "
                         f"(-c {' '.join(configurations)}) needs the work folder as -m (it holds models/<config>/)")


def predict_ensemble_folder(input_dir: str | Path, output_dir: str | Path, model: str | Path,
                            configurations: Sequence[str], folds: Sequence[int | str] | int | str | None = None, *,
                            overwrite: bool = False, save_probabilities: bool = False, progress: bool = True,
                            on_conflict: str = "refuse", **predictor_kwargs: Any) -> dict[str, Any]:  # fmt: skip
    """`EnsemblePredictor` (``predictor_kwargs``: postprocess, checkpoint, device, tta, step, recipe ...) +
    `EnsemblePredictor.predict_folder`."""
    predictor = EnsemblePredictor(model, configurations, folds, **predictor_kwargs)
    return predictor.predict_folder(input_dir, output_dir, overwrite=overwrite, save_probabilities=save_probabilities,
                                    progress=progress, on_conflict=on_conflict)
