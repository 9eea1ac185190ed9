"""Prediction with a cascade stage (``3d_cascade_fullres``): its previous stage (``3d_lowres``) predicts the case
first, and that label map, brought onto the cascade's preprocessed grid exactly as in training
(`decathlete.preprocess.pipeline.labels_on_preprocessed_grid`), joins the image one-hot per foreground label
(`decathlete.data.cascade`).

nnU-Net asks its user to predict the low-resolution stage into a folder and to hand that folder to the cascade's
prediction; here ``predict -c 3d_cascade_fullres`` does both, with the same folds and inference settings for both
stages, and without the previous stage's postprocessing (its cross-validation predictions, which the cascade
trained on, had none). The previous stage is the work folder's model of the same recipe:
``models/<previous stage>/<recipe>`` beside ``models/3d_cascade_fullres/<recipe>``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from decathlete.infer.models import model_base
from decathlete.infer.predictor import Predictor, load_predictor
from decathlete.planning.plans import Plans
from decathlete.preprocess.pipeline import PreprocessedCase, labels_on_preprocessed_grid


def is_cascade(model: str | Path, configuration: str, recipe: str | None = None) -> bool:
    """Whether the trained ``configuration`` of ``model`` is a cascade stage (False when there is no such model:
    `Predictor` then says what is missing)."""
    try:
        base = model_base(Path(model), configuration, recipe)
    except (FileNotFoundError, ValueError):
        return False
    plans = next((d / "plans.json" for d in sorted(base.glob("fold_*")) if (d / "plans.json").is_file()), None)
    if plans is None:
        return False
    config = Plans.load(plans).configurations.get(configuration)
    return bool(config is not None and config.previous_stage)


class CascadePredictor(Predictor):
    """A cascade stage's `Predictor`: it runs its previous stage's model (module docstring) for every case.

    Args:
        model, configuration, folds: as `Predictor`; the previous stage predicts with the same ``folds``.
        predictor_kwargs: `Predictor`'s other arguments, for both stages (the previous stage never postprocesses).

    Raises:
        FileNotFoundError: the previous stage's model is not beside the cascade's, naming where it was looked for.
    """

    def __init__(self, model: str | Path, configuration: str = "3d_cascade_fullres",
                 folds: Sequence[int | str] | int | str | None = None, **predictor_kwargs: Any) -> None:
        super().__init__(model, configuration, folds, **predictor_kwargs)
        previous = self.config.previous_stage
        if not previous:
            raise ValueError(f"'{configuration}' is no cascade stage: predict it with Predictor")
        recipe_dir = self.fold_dirs[0].parent
        previous_model = recipe_dir.parent.parent / previous / recipe_dir.name
        if not previous_model.is_dir():
            raise FileNotFoundError(f"the cascade predicts with its previous stage {previous}, expected in "
                                    f"{previous_model} (beside {recipe_dir}); train it there, or keep the work "
                                    "folder's layout when moving a model")
        self.previous = load_predictor(previous_model, previous, folds,
                                       **{**predictor_kwargs, "postprocess": False, "recipe": None})
        self.previous_values = self.labels.foreground_values

    def network_input(self, case: PreprocessedCase, image_paths: Sequence[str | Path] | str | Path,
                      progress: bool = False) -> np.ndarray:
        """The image and, one-hot per foreground label, the previous stage's prediction of it on the same grid."""
        label, _, _ = self.previous._predict(image_paths, case.properties["case_id"], False, progress=progress)
        grid = labels_on_preprocessed_grid(label, case.properties)
        onehot = np.stack([grid == v for v in self.previous_values]).astype(np.float32)
        return np.concatenate([case.data, onehot])

    def run_description(self) -> dict[str, Any]:
        """This model's description and its previous stage's: another low-resolution model is another result."""
        return {**super().run_description(), "previous_stage": self.previous.run_description()}
