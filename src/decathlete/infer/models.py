"""Which trained model a prediction uses: the fold folders of a work folder or model folder, the folds that finished
training, and the recipe they were trained with (inference settings overridable, nothing else)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from decathlete.planning.plans import Plans
from decathlete.recipes.base import Recipe, RecipeError, get_recipe, saved_recipe, validate


def resolve_fold_dirs(
    model: str | Path, configuration: str, folds: Sequence[int] | str | None, recipe: str | None = None
) -> list[Path]:
    """The fold folders of a model: ``model`` is a work folder or a ``models/<config>/<recipe>`` folder.

    Args:
        model: ``WORKDIR`` (holding ``models/<configuration>/<recipe>/fold_<k>``) or the folder of ``fold_<k>``.
        configuration: configuration name (work folders only).
        folds: fold numbers; ``"all"`` or None = every ``fold_<k>`` present.
        recipe: recipe name (work folders only); None = the plans' recipe, or the only one trained.

    Raises:
        FileNotFoundError: no such model or fold. ValueError: several recipes trained and none chosen.
    """
    root = Path(model)
    base = root
    if not list(root.glob("fold_*")):
        trained = root / "models" / configuration
        names = sorted(d.name for d in trained.iterdir() if d.is_dir()) if trained.is_dir() else []
        if not names:
            raise FileNotFoundError(
                f"{root} holds no trained '{configuration}' model: expected "
                f"{trained}/<recipe>/fold_<k> (`decathlete train`) or a folder of fold_<k>"
            )
        if recipe is None:
            planned = Plans.load(root / "plans.json").recipe if (root / "plans.json").is_file() else None
            if planned not in names and len(names) > 1:
                raise ValueError(f"{trained} holds several recipes ({', '.join(names)}); choose one with recipe=")
            recipe = planned if planned in names else names[0]
        elif recipe not in names:
            raise FileNotFoundError(f"no recipe '{recipe}' was trained under {trained}: it holds {', '.join(names)}")
        base = trained / recipe
    if folds is None or folds == "all":
        found = sorted((d for d in base.glob("fold_*") if d.is_dir()), key=lambda d: int(d.name.split("_")[1]))
    else:
        found = [base / f"fold_{int(k)}" for k in folds]
    missing = [str(d) for d in found if not d.is_dir()]
    if not found or missing:
        raise FileNotFoundError(f"missing fold folders under {base}: {', '.join(missing) or 'none trained'}")
    return found


def trained_folds(fold_dirs: Sequence[Path], checkpoint: str) -> tuple[list[Path], list[str]]:
    """The fold folders holding ``checkpoint``, and the names of those that do not (their training unfinished).

    Raises:
        FileNotFoundError: when none holds it.
    """
    done = [d for d in fold_dirs if (d / checkpoint).is_file()]
    if not done:
        raise FileNotFoundError(f"no fold under {fold_dirs[0].parent} holds {checkpoint} (is training finished? "
                                f"`--checkpoint checkpoint_latest.pth` uses the latest one)")
    return done, [d.name for d in fold_dirs if d not in done]


def model_recipe(fold_dirs: Sequence[Path], plans: Plans, overrides: Sequence[str] = ()) -> Recipe:
    """The recipe the folds were trained with (their ``recipe.json``; for older folders without one, the plans'),
    with ``inference.*`` overrides only: everything else is what the model learned with.

    Raises:
        RecipeError: folds trained with different networks or inference settings, or an override outside
            ``inference``.
    """
    outside = [o for o in overrides if not o.strip().startswith("inference.")]
    if outside:
        raise RecipeError(f"a trained model can only change inference.* settings, not {', '.join(outside)}")
    recipes = [saved_recipe(d) for d in fold_dirs]
    if recipes[0] is None:
        recipes[0] = Recipe.from_dict(plans.recipe_settings) if plans.recipe_settings else get_recipe(plans.recipe)
    for d, other in zip(fold_dirs[1:], recipes[1:]):
        if other is not None and recipes[0].differences(other, ("net", "regions", "inference")):
            raise RecipeError(f"{d} was trained with another network or inference settings than {fold_dirs[0]}")
    return validate(recipes[0].with_overrides(overrides))
