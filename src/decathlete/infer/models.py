"""Which trained model a prediction uses: the fold folders of a work folder or model folder, the folds that finished
training, and the recipe they were trained with (inference settings overridable, nothing else)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from decathlete.data.folds import ALL, EVERY, fold_name, fold_of, parse_folds
from decathlete.io.checkpoint import FINAL, LATEST
from decathlete.planning.plans import Plans
from decathlete.recipes.base import Recipe, RecipeError, get_recipe, saved_recipe, validate


def resolve_fold_dirs(
    model: str | Path, configuration: str, folds: Sequence[int | str] | int | str | None, recipe: str | None = None
) -> list[Path]:
    """The fold folders of a model: ``model`` is a work folder or a ``models/<config>/<recipe>`` folder.

    Args:
        model: ``WORKDIR`` (holding ``models/<configuration>/<recipe>/fold_<k>``) or the folder of ``fold_<k>``.
        configuration: configuration name (work folders only).
        folds: fold numbers and/or ``"all"`` (the ``fold_all`` model); ``"every"`` or None = every cross-validation
            fold present (``fold_<k>``; ``fold_all`` only when named, as nnU-Net's auto-detection).
        recipe: recipe name (work folders only); None = the plans' recipe, or the only one trained.

    Raises:
        FileNotFoundError: no such model or fold (naming the command that trains it). ValueError: several recipes
            trained and none chosen, or a word that is no fold.
    """
    base = model_base(Path(model), configuration, recipe)
    spec = parse_folds(folds)
    numbered = sorted((d for d in base.glob("fold_*") if d.is_dir() and isinstance(fold_of(d.name), int)),
                      key=lambda d: fold_of(d.name))
    fold_all = base / fold_name(ALL)
    present = numbered + ([fold_all] if fold_all.is_dir() else [])
    if spec == EVERY:
        if not numbered:
            only_all = ", only fold_all (one model trained on every case): name it with `-f all`" if present else ""
            raise FileNotFoundError(f"{base} holds no cross-validation fold (fold_<k>){only_all}")
        return numbered
    found = [base / fold_name(k) for k in spec]
    missing = [d for d in found if not d.is_dir()]
    if missing:
        holds = ", ".join(d.name for d in present) or "no fold"
        raise FileNotFoundError(f"{base} has no {', '.join(d.name for d in missing)} (it holds {holds}); train it "
                                f"with `{train_command(missing[0], configuration)}`")
    return found


def model_base(root: Path, configuration: str, recipe: str | None) -> Path:
    """The folder of the ``fold_*`` folders: ``root`` itself, or the recipe's under ``root/models/<config>``."""
    if list(root.glob("fold_*")):
        return root
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
    return trained / recipe


def trained_folds(fold_dirs: Sequence[Path], checkpoint: str, configuration: str,
                  offer_fold_all: bool = True) -> tuple[list[Path], list[str]]:
    """The fold folders holding ``checkpoint``, and the names of those that do not (their training unfinished).

    Raises:
        FileNotFoundError: when none holds it, saying for each fold why and what to do (with ``offer_fold_all``,
            naming a finished ``fold_all`` as the other way).
    """
    done = [d for d in fold_dirs if (d / checkpoint).is_file()]
    if not done:
        base = fold_dirs[0].parent
        offer = offer_fold_all and (base / fold_name(ALL) / checkpoint).is_file() and \
            all(fold_of(d.name) != ALL for d in fold_dirs)
        other = "; or use the model trained on every case: `-f all`" if offer else ""
        raise FileNotFoundError(f"no fold under {base} holds {checkpoint}: "
                                f"{unfinished(fold_dirs, checkpoint, configuration)}{other}")
    return done, [d.name for d in fold_dirs if d not in done]


def check_trained(fold_dirs: Sequence[Path], checkpoint: str, configuration: str) -> None:
    """Every named fold must hold ``checkpoint``.

    Raises:
        FileNotFoundError: naming each fold without it, that its training did not finish, and the fixes.
    """
    missing = [d for d in fold_dirs if not (d / checkpoint).is_file()]
    if missing:
        raise FileNotFoundError(unfinished(missing, checkpoint, configuration))


def unfinished(fold_dirs: Sequence[Path], checkpoint: str, configuration: str) -> str:
    """Why each of these fold folders lacks ``checkpoint`` (its training did not finish) and what to do."""
    parts = []
    for d in fold_dirs:
        command = train_command(d, configuration)
        if (d / FINAL).is_file():  # training finished: the checkpoint's name is what is wrong
            held = ", ".join(sorted(p.name for p in d.glob("*.pth")))
            parts.append(f"{d} holds no {checkpoint} (it holds {held}); choose one of those with --checkpoint")
        elif (d / LATEST).is_file():
            fixes = [f"finish it with `{command} --resume`"]
            if checkpoint != LATEST:
                fixes.append(f"use its latest weights with `--checkpoint {LATEST}`")
            parts.append(f"fold {fold_of(d.name)}'s training did not finish ({d} has no {checkpoint}); "
                         + ", or ".join(fixes))
        else:  # a crash before the first epoch ended, or a folder an older version left: train starts it anew
            parts.append(f"fold {fold_of(d.name)}'s training did not finish ({d} holds no checkpoint: it stopped "
                         f"before its first epoch ended); train it again with `{command}`")
    return "; ".join(parts)


def train_command(fold_dir: Path, configuration: str) -> str:
    """The ``decathlete train`` command that writes ``fold_dir`` (``-o`` when it is not a work folder's)."""
    base, fold = fold_dir.parent, fold_of(fold_dir.name)
    workdir = base.parent.parent.parent
    if base.parent.name == configuration and base.parent.parent.name == "models" and \
            (workdir / "plans.json").is_file():
        planned = Plans.load(workdir / "plans.json").recipe
        return f"decathlete train {workdir} -c {configuration} -f {fold}" + \
            ("" if base.name == planned else f" --recipe {base.name}")
    return f"decathlete train WORKDIR -c {configuration} -f {fold} -o {base}"


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
