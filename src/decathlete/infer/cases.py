"""The cases of a folder to predict: which files belong to which case, and where their predictions go.

Input folders come in two layouts, told apart from the names alone (`discover_cases`): nnU-Net's
``<case>_<4-digit channel><ending>`` and one file per case (MSD-style names); a sub-folder of files is a DICOM
series. Predictions keep the input's file ending and never go into the input folder (`check_output_folder`).
"""

from __future__ import annotations

import re
from pathlib import Path

from decathlete.io.datasets import strip_image_suffix
from decathlete.io.images import SUPPORTED_SUFFIXES

_CHANNEL_FILE = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")  # nnU-Net: <case>_0000.nii.gz, <case>_0001 ...


def check_output_folder(input_dir: Path, output_dir: Path) -> None:
    """Refuse an output folder that is, or lies inside, the input folder (predictions would be read as images)."""
    inp, out = Path(input_dir).resolve(), Path(output_dir).resolve()
    if not inp.is_dir():
        raise FileNotFoundError(f"input folder {input_dir} does not exist")
    if out == inp or inp in out.parents:
        where = "is the input folder" if out == inp else f"lies inside the input folder {input_dir}"
        raise ValueError(
            f"output folder {output_dir} {where}: predictions would be mixed with the images (and read "
            "as cases by the next run); choose a folder outside it"
        )


def _split_suffix(path: Path) -> tuple[str, str] | None:
    """(case id, ending as written) of a supported image file name, else None."""
    stem, suffix = strip_image_suffix(path.name)
    return (stem, suffix) if suffix.lower() in SUPPORTED_SUFFIXES else None


def channel_files(n_channels: int) -> str:
    """How many channels a model takes, with their nnU-Net file suffixes."""
    if n_channels == 1:
        return "1 channel (one file per case, or <case>_0000)"
    return f"{n_channels} channels (<case>_0000 .. <case>_{n_channels - 1:04d})"


def output_ending(image: Path) -> str:
    """The input's own file ending; ``.nii.gz`` for a DICOM series (a folder)."""
    split = _split_suffix(image)
    return ".nii.gz" if split is None or image.is_dir() else split[1]


def discover_cases(folder: str | Path, n_channels: int) -> dict[str, list[Path]]:
    """Cases of an input folder: case id -> image files in channel order.

    nnU-Net layout when EVERY image is named ``<case>_<4 digits><ending>`` and every case has exactly channels
    ``0000 .. n_channels - 1``. Channel files numbered from ``_0000`` whose count disagrees with the model (``_0000`` +
    ``_0001`` for a one-channel model) are an error naming the cases. Otherwise one file per case (its name without
    suffix is the case id), so MSD-style names such as ``hippocampus_0001.nii.gz`` of a one-channel model are cases.
    A sub-folder holding files is a DICOM series (one single-channel case named after the folder, written as
    ``.nii.gz``). Hidden files and folders (the temporaries of atomic writes) are ignored.

    Raises:
        FileNotFoundError: no images. ValueError: incomplete channel files, or two files with the same case id.
    """
    folder = Path(folder)
    files, series = {}, {}
    for path in sorted(folder.iterdir()):
        split = _split_suffix(path)
        if path.name.startswith("."):
            continue
        if split is not None and path.is_file():
            files[path] = split[0]
        elif path.is_dir() and any(f.is_file() for f in path.iterdir()):
            series[path.name] = [path]
    if series:
        if n_channels != 1 or files:
            raise ValueError(f"{folder}: DICOM series folders ({', '.join(series)}) can only be predicted by a "
                             "one-channel model, in a folder of series only; put image files in another folder")
        return series
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(SUPPORTED_SUFFIXES)}) or DICOM series folders in {folder}")
    matches = {p: _CHANNEL_FILE.match(stem) for p, stem in files.items()}
    if all(matches.values()):
        groups: dict[str, dict[int, Path]] = {}
        for path, m in matches.items():
            groups.setdefault(m["case"], {})[int(m["channel"])] = path
        wanted = list(range(n_channels))
        if all(sorted(g) == wanted for g in groups.values()):
            return {cid: [g[c] for c in wanted] for cid, g in sorted(groups.items())}
        # nnU-Net numbers channels from _0000 on: groups that do so are channel files even when their count is wrong
        # (MSD-style case numbers such as case_0001, case_0002 ... are not: they do not start at _0000)
        if n_channels > 1 or all(sorted(g) == list(range(len(g))) for g in groups.values()):
            bad = [f"case '{cid}' has {', '.join(f'_{c:04d}' for c in sorted(g))}"
                   for cid, g in sorted(groups.items()) if sorted(g) != wanted]
            raise ValueError(
                f"{folder}: the model takes {channel_files(n_channels)}, but {'; '.join(bad)}. Give each case exactly "
                "those channel files; separate one-channel cases named <name>_<4 digits> need their own _0000 "
                "suffix (e.g. case_0001_0000.nii.gz)"
            )
    cases: dict[str, list[Path]] = {}
    for path, stem in files.items():
        if stem in cases:
            raise ValueError(f"{folder}: two images for case '{stem}': {cases[stem][0].name} and {path.name}")
        cases[stem] = [path]
    return cases
