"""Predict label maps for raw images with a trained model, written on the input's exact grid.

Per case: preprocess exactly as in training (`decathlete.preprocess.pipeline.preprocess_case` with the plan's
configuration and the plan's ``transpose_forward``) -> sliding window with mirroring TTA per fold -> fold ensemble
-> inverse preprocessing (resample back to the cropped original grid, un-crop, transpose back: nnU-Net's reverse
order) -> write with the geometry read from the input.

Ensembling and inversion, and where they differ from nnU-Net v2:

* Within a fold, mirroring TTA and overlapping tiles average LOGITS, as nnU-Net does.
* Across folds we average softmax (sigmoid for region-based models) PROBABILITIES. nnU-Net v2 averages the folds'
  logits (``predict_logits_from_preprocessed_data`` sums them and divides); nnU-Net v1 averaged softmax.
  Probabilities are bounded, so one overconfident fold cannot outvote the others by the size of its logits, and
  their mean is itself a distribution that can be resampled and saved as it is.
* Inversion back to the input's grid: `decathlete.infer.inversion`.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from decathlete import registry
from decathlete.data.folds import EVERY, parse_folds
from decathlete.devices import memory_format, resolve_device
from decathlete.infer.cases import check_output_folder, discover_cases
from decathlete.infer.efficiency import EfficiencyMeter, phase
from decathlete.infer.inversion import invert_preprocessing
from decathlete.infer.models import check_trained, model_recipe, resolve_fold_dirs, trained_folds
from decathlete.infer.outputs import write_predictions
from decathlete.infer.postprocess import apply_postprocessing, load_postprocessing
from decathlete.infer.provenance import file_digest
from decathlete.infer.sliding_window import sliding_window_predict
from decathlete.io.checkpoint import FINAL, load_checkpoint
from decathlete.io.images import Geometry
from decathlete.labels import LabelScheme
from decathlete.nets.base import set_deep_supervision
from decathlete.planning.plans import Plans
from decathlete.preprocess.pipeline import PreprocessedCase, preprocess_case
from decathlete.recipes import build


class Predictor:
    """A trained model (one or several folds) ready to segment raw images.

    Args:
        model: work folder or ``models/<config>/<recipe>`` folder (see `resolve_fold_dirs`).
        configuration: ``3d_fullres``, ``2d``, ``3d_lowres``.
        folds: folds to ensemble: fold numbers and/or ``"all"`` (the ``fold_all`` model, trained on every case);
            ``"every"`` or None (the default, as nnU-Net's folds 0-4) = every finished cross-validation fold: each
            ``fold_<k>`` holding ``checkpoint``; a fold folder without it (training unfinished) is left out and named
            in ``skipped_folds``; ``fold_all`` is used only when named. Named folds must all hold it.
        checkpoint: checkpoint file name in each fold folder.
        device: ``auto``, ``cpu``, ``cuda``, ``cuda:1`` ...
        tta: mirroring test-time augmentation (None: the recipe's ``inference.tta``, on by default).
        step: sliding-window tile distance as a fraction of the patch (None: the recipe's ``inference.step``).
        recipe: recipe folder in a work folder (None: the plans' recipe or the only one).
        overrides: ``inference.*`` overrides of the model's recipe (``inference.tile_weighting=constant`` ...).
        mirror_axes: override the TTA axes (patch axes, 0 = z in 3D); ignored without ``tta``.
        batch_tiles: tiles per forward pass (None: automatic).
        postprocess: apply the model's ``postprocessing.json`` (written by ``decathlete crossval``) when there is one.
        whole_volume: run images a little larger than the patch as one forward pass when that computes fewer voxels
            than the overlapping tiles (see `decathlete.infer.sliding_window.whole_volume_patch`); False: always
            tile, as nnU-Net does.
    """

    def __init__(self, model: str | Path, configuration: str = "3d_fullres",
                 folds: Sequence[int | str] | int | str | None = None, checkpoint: str = FINAL, device: str = "auto",
                 tta: bool | None = None, step: float | None = None, recipe: str | None = None, *,
                 overrides: Sequence[str] = (),
                 mirror_axes: Sequence[int] | None = None, batch_tiles: int | None = None, postprocess: bool = True,
                 whole_volume: bool = True) -> None:  # fmt: skip
        if step is not None and not 0 < step <= 1:  # before any model is loaded, not once per case
            raise ValueError(f"--step must lie in (0, 1] (the tile distance as a fraction of the patch; 0.5 = half "
                             f"overlap), got {step}")
        self.fold_dirs = resolve_fold_dirs(model, configuration, folds, recipe)
        if parse_folds(folds) == EVERY:
            self.fold_dirs, self.skipped_folds = trained_folds(self.fold_dirs, checkpoint, configuration)
        else:
            check_trained(self.fold_dirs, checkpoint, configuration)
            self.skipped_folds = []
        self.plans = Plans.load(self.fold_dirs[0] / "plans.json")
        self.config, self.config_name = self.plans.configuration(configuration), configuration
        for d in self.fold_dirs[1:]:
            other = Plans.load(d / "plans.json")
            if (asdict(other.configuration(configuration)) != asdict(self.config)
                    or other.transpose_forward != self.plans.transpose_forward):
                raise ValueError(f"{d} was trained with a different '{configuration}' plan than {self.fold_dirs[0]}")
        for d in self.fold_dirs:  # the network, loss or tile weighting may come from the user's package
            run = d / "run.json"
            for package in json.loads(run.read_text()).get("plugins", []) if run.is_file() else []:
                registry.load_plugin(package)
        self.recipe = model_recipe(self.fold_dirs, self.plans, overrides)
        inference = self.recipe.inference
        self.device = resolve_device(device)
        self.step = inference.step if step is None else step
        self.batch_tiles = batch_tiles
        self.divisor = [math.prod(s[a] for s in self.config.strides) for a in range(len(self.config.patch_size))]
        self.whole_volume = whole_volume
        self.tile_weights = build.build_tile_weights(self.recipe)
        axes = build.mirror_axes(self.recipe, self.config) if mirror_axes is None else tuple(mirror_axes)
        self.mirror_axes = axes if (inference.tta if tta is None else tta) else ()
        self.labels = LabelScheme.from_dataset(self.plans.dataset)
        self.region_based, self.class_values = self.labels.region_based, self.labels.output_values
        self.n_channels = len(self.plans.dataset["channel_names"])
        self.num_classes = self.labels.num_outputs
        # Preprocessing reads exactly the JSON the training cache was made from (the plan's transposition included).
        self.preprocessing = self.plans.preprocessing_config(configuration)
        self.checkpoint = checkpoint
        self.networks = [self._load(d, checkpoint) for d in self.fold_dirs]
        self.postprocessing = load_postprocessing(self.fold_dirs[0].parent) if postprocess else None

    def _load(self, fold_dir: Path, checkpoint: str) -> torch.nn.Module:
        state = load_checkpoint(fold_dir / checkpoint)
        net = build.build_network(self.config, self.plans)
        net.load_state_dict(state["model"])
        set_deep_supervision(net, False)  # only the full-resolution head is used: skip the others
        return net.to(self.device, memory_format=memory_format(self.device, self.config.spatial_dims)).eval()

    def tile_size(self, shape: Sequence[int]) -> list[int]:
        """The sliding-window tile for an image of ``shape`` (z, y, x): the training patch, or with the recipe's
        ``inference.max_tile`` the image's size rounded up to the network's divisibility, capped there."""
        patch, cap = list(self.config.patch_size), self.recipe.inference.max_tile
        if cap is None:
            return patch
        if len(patch) == 2:  # a 2D network sees the in-plane axes
            axis = int(self.config.resampling.get("slice_axis", 0))
            shape = [n for a, n in enumerate(shape) if a != axis]
        return [max(p, min(-(-int(n) // d) * d, int(c) // d * d))
                for n, p, c, d in zip(shape, patch, cap, self.divisor)]

    def _sliding_window(self, net: torch.nn.Module, image: torch.Tensor, progress: bool = False,
                        desc: str = "") -> torch.Tensor:
        axis = int(self.config.resampling.get("slice_axis", 0))
        tile = self.tile_size(image.shape[1:])
        run = partial(sliding_window_predict, net, image, tile, self.num_classes, self.step,
                      self.batch_tiles, self.mirror_axes, self.device, slice_axis=axis,
                      whole_volume_divisor=self.divisor if self.whole_volume else None,
                      tile_weights=self.tile_weights, progress=progress, desc=desc)  # fmt: skip
        if self.device.type == "cuda":
            try:
                return run(accumulate_device=self.device)
            except torch.OutOfMemoryError:  # as nnU-Net: retry with the volume on the CPU, the tiles on the GPU
                torch.cuda.empty_cache()
                warnings.warn("volume too large for the GPU: accumulating on the CPU (slower)", stacklevel=2)
        return run(accumulate_device="cpu")

    @torch.inference_mode()
    def predict_probabilities(self, data: np.ndarray, progress: bool = False) -> np.ndarray:
        """Fold-averaged probabilities ``(K, z, y, x)`` float32 of a preprocessed image ``(C, z, y, x)``;
        ``progress``: a bar per fold over its sliding-window tiles."""
        image = torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32))
        total = None
        for net, fold_dir in zip(self.networks, self.fold_dirs):
            probs = self.labels.activate_(self._sliding_window(net, image, progress, fold_dir.name)).cpu()
            total = probs if total is None else total.add_(probs)
        assert total is not None
        return total.div_(len(self.networks)).numpy()

    def _predict(
        self, image_paths: Sequence[str | Path] | str | Path, case_id: str | None, return_probabilities: bool,
        seconds: dict[str, float] | None = None, progress: bool = False,
    ) -> tuple[np.ndarray, np.ndarray | None, Geometry]:
        with phase(seconds, "preprocess"):
            case = preprocess_case(image_paths, None, self.preprocessing, case_id=case_id)
        if case.data.shape[0] != self.n_channels:
            raise ValueError(
                f"{case.properties['case_id']}: {case.data.shape[0]} channel(s), the model expects "
                f"{self.n_channels} ({', '.join(map(str, self.plans.dataset['channel_names'].values()))})"
            )
        with phase(seconds, "network"):
            probabilities = self.predict_probabilities(self.network_input(case, image_paths, progress), progress)
        del case.data
        with phase(seconds, "export"):
            label, full = invert_preprocessing(
                probabilities, case.properties, self.class_values, self.region_based, return_probabilities
            )
            label = apply_postprocessing(label, self.postprocessing)
        return label, full, Geometry.from_dict(case.properties["geometry"])

    def network_input(self, case: PreprocessedCase, image_paths: Sequence[str | Path] | str | Path,
                      progress: bool = False) -> np.ndarray:
        """What the networks see of a preprocessed case: its image (a cascade stage adds its previous stage's
        prediction, `decathlete.infer.cascade`, with its own progress bars when ``progress``)."""
        return case.data

    def run_description(self) -> dict[str, Any]:
        """What makes this run's label maps what they are (`decathlete.infer.provenance`): the weights by content,
        so a model folder that was moved or copied is still the same model."""
        return {"folds": [d.name for d in self.fold_dirs], "checkpoints": [
                    file_digest(d / self.checkpoint) for d in self.fold_dirs], "configuration": self.config_name,
                "inference": self.recipe.to_dict()["inference"], "mirror_axes": list(self.mirror_axes),
                "step": self.step, "whole_volume": self.whole_volume, "postprocessing": self.postprocessing}

    def efficiency_meter(self) -> EfficiencyMeter:
        """A meter of this model's per-case cost (`decathlete.infer.efficiency`)."""
        def make() -> torch.nn.Module:
            net = build.build_network(self.config, self.plans)
            set_deep_supervision(net, False)
            return net

        return EfficiencyMeter(self.networks, make, build.input_channels(self.config, self.plans),
                               self.config.patch_size, self.device)

    def predict_case(self, image_paths: Sequence[str | Path] | str | Path, return_probabilities: bool = False,
                     case_id: str | None = None) -> tuple[np.ndarray, np.ndarray | None]:  # fmt: skip
        """Segment one case.

        Args:
            image_paths: one (multi-channel) image file, or one file per channel in the dataset's channel order.
            return_probabilities: also return the probabilities on the original grid.
            case_id: name used in messages (default: the first file's name without suffix).

        Returns:
            ``(label map (z, y, x) on the input's grid, float16 probabilities (K, z, y, x) or None)``.
        """
        label, full, _ = self._predict(image_paths, case_id, return_probabilities)
        return label, full

    def predict_folder(self, input_dir: str | Path, output_dir: str | Path, *, overwrite: bool = False,
                       save_probabilities: bool = False, progress: bool = True,
                       on_conflict: str = "refuse") -> dict[str, Any]:  # fmt: skip
        """Segment every case of ``input_dir`` into ``output_dir/<case><ending>`` (resumable).

        A case whose output this model with these settings already wrote is skipped unless ``overwrite``; one that
        another model or other settings wrote is refused (``FileExistsError`` naming what differs). Files are
        written atomically (label last), so an interrupted run leaves no file that looks complete and the next run
        redoes exactly the unfinished cases.

        Args:
            input_dir: images, one file per case or nnU-Net ``<case>_0000<ending>`` channel files.
            output_dir: destination, outside ``input_dir`` (created).
            overwrite: predict cases whose output exists again.
            save_probabilities: also write ``<case>.npz`` with float16 ``probabilities`` (K, z, y, x) on the
                input grid and ``class_values`` (the label, or region order, of each channel).
            progress: show a progress bar over the cases, and one (not kept) over each case's sliding-window tiles.
            on_conflict: ``"refuse"`` outputs another model or other settings made, or predict them ``"redo"``.

        Returns:
            ``{"n_cases", "n_done", "n_skipped", "seconds", "model", "folds", "skipped_folds", "case_seconds",
            "outputs", "efficiency"}`` (outputs: case id -> file; model: the folder of the fold folders; folds: the
            fold folders ensembled (``fold_all`` only when asked for); skipped_folds: unfinished ones left out;
            efficiency: the ``efficiency.json`` written, None when no case was predicted). ``OUT/provenance.json``
            records which run made each output, with the model folder and the folds used and left out.

        Raises:
            ValueError: ``output_dir`` is or lies inside ``input_dir``. RuntimeError: after the other cases are
            done, listing the cases that failed.
        """
        input_dir, output_dir = Path(input_dir), Path(output_dir)
        check_output_folder(input_dir, output_dir)
        cases = discover_cases(input_dir, self.n_channels)
        return self.predict_cases(cases, output_dir, overwrite=overwrite, save_probabilities=save_probabilities,
                                  progress=progress, on_conflict=on_conflict)

    def predict_cases(self, cases: Mapping[str, Sequence[Path]], output_dir: str | Path, *, overwrite: bool = False,
                      save_probabilities: bool = False, progress: bool = True,
                      on_conflict: str = "refuse") -> dict[str, Any]:  # fmt: skip
        """`predict_folder` for given cases: case id -> image file(s) (one per channel, in channel order).

        An output another model or other settings made (`decathlete.infer.provenance`) is refused (``on_conflict``
        ``"refuse"``, with the fix) or predicted again (``"redo"``, for folders the caller owns).
        """
        done = write_predictions(
            cases, output_dir, self._predict, description=self.run_description(),
            context={"model": str(self.fold_dirs[0].parent), "skipped_folds": self.skipped_folds},
            class_values=self.class_values, meter=self.efficiency_meter(), about=dict(
                model=str(self.fold_dirs[0].parent), configuration=self.config_name, recipe=self.recipe.name,
                folds=[d.name for d in self.fold_dirs], mirror_axes=list(self.mirror_axes)),
            overwrite=overwrite, save_probabilities=save_probabilities, progress=progress, on_conflict=on_conflict)
        return {**{k: done[k] for k in ("n_cases", "n_done", "n_skipped", "seconds")},
                "model": str(self.fold_dirs[0].parent), "folds": [d.name for d in self.fold_dirs],
                "skipped_folds": self.skipped_folds,
                **{k: done[k] for k in ("case_seconds", "outputs", "efficiency")}}


def predict_folder(input_dir: str | Path, output_dir: str | Path, model: str | Path, configuration: str = "3d_fullres",
                   folds: Sequence[int | str] | int | str | None = None, *, overwrite: bool = False,
                   save_probabilities: bool = False, progress: bool = True, on_conflict: str = "refuse",
                   **predictor_kwargs: Any) -> dict[str, Any]:  # fmt: skip
    """`load_predictor` (``predictor_kwargs``: checkpoint, device, tta, step, recipe ...) +
    `Predictor.predict_folder`."""
    predictor = load_predictor(model, configuration, folds, **predictor_kwargs)
    return predictor.predict_folder(input_dir, output_dir, overwrite=overwrite, save_probabilities=save_probabilities,
                                    progress=progress, on_conflict=on_conflict)


def load_predictor(model: str | Path, configuration: str = "3d_fullres",
                   folds: Sequence[int | str] | int | str | None = None, **predictor_kwargs: Any) -> Predictor:
    """The predictor of a trained configuration (`Predictor`'s arguments); every caller builds one here, so a
    configuration that needs more than its own networks (a cascade stage) gets the predictor that provides it."""
    from decathlete.infer.cascade import CascadePredictor, is_cascade

    kind = CascadePredictor if is_cascade(model, configuration, predictor_kwargs.get("recipe")) else Predictor
    return kind(model, configuration, folds, **predictor_kwargs)

