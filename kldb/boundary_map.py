"""The boundary map: every pair (and, optionally, every triple) of K classes of a classifier, audited in one sweep.

A map *is* a sweep (:mod:`kldb.sweep`): :func:`map_config` builds a :class:`~kldb.sweep.SweepConfig` whose class
subsets are every pair of the K classes (and every triple with ``triples=True``), with alpha 0 (prompt-only) and a few
guided alphas at one beta. :func:`run_map` runs it with :func:`~kldb.sweep.run_sweep`, so a map is resumable (rerun the
same call) and shardable under ``accelerate launch`` like any sweep, and then :func:`write_map` draws it from the run
folder's manifest records into ``<run>/map/``:

- ``median_kldb.png``, ``hit_rate.png``, ``kldb_drop.png`` and, when a validity result is given, ``validity.png``:
  K x K heatmaps, symmetric, with an empty diagonal, one cell per pair, its value written in it;
- ``map.md``, ``map.csv``, ``map.json``: every class subset, most fragile boundaries first (``map.json`` also holds
  the heatmaps' matrices);
- ``grids/<classes>.png``: per class subset, the guided images with the lowest KLDB, above the prompt-only images
  of the same seeds, with their KLDB and top-2 probabilities.

Per class subset C, the map reports one guided setting, the *chosen* one: by default the guided alpha with the lowest
median KLDB (the rule of the paper's Table 1, :func:`kldb.report.table1`: ties go to the smaller alpha); with
``alpha=`` the same alpha for every subset. Its numbers:

- **median KLDB reached**: the median KLDB of the chosen setting's images, with its bootstrap 95% interval
  (:func:`kldb.report.setting_metrics`);
- **boundary-hit rate**: the share of its images whose |C| most probable classes are exactly C and whose largest
  probability is below ``hit_threshold`` (0.6): for a pair, top-2 = the pair and neither class above 0.6
  (:func:`is_boundary_hit`); images with non-finite probabilities count as misses;
- **relative drop**: ``(prompt-only median KLDB - reached) / prompt-only median KLDB``, the report's relative KLDB
  change with the sign turned so that a larger drop is a larger number, with its bootstrap interval paired by seed;
- **validity share**: the share of its images that an independent oracle still sees as one of C. The map does not
  label images itself: pass ``validity=`` as ``{setting name: share}``, as the result of
  :func:`kldb.validity.run_validity` (or its ``validity.json``, :func:`read_validity`), or as a callable ``(run
  folder, records of one setting) -> share``; without it, the map has no validity heatmap.

**Fragility** (the order of the ranked table): a boundary is the more fragile the lower the median KLDB that guidance
reaches on it (the classifier can be brought to split its probability evenly between the classes); ties go to the
higher boundary-hit rate, then to the order of the class subsets in the map. Pairs are ranked among pairs and
triples among triples (their KLDB is on another scale), pairs first.
"""

from __future__ import annotations

import io
import itertools
import json
import logging
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from kldb.errors import KLDBInputError, KLDBInputTypeError, KLDBPathError
from kldb.io import atomic_write_bytes, atomic_write_json, atomic_write_text
from kldb.metrics import top_set_is_classes
from kldb.presets import PRESETS, QUICK_START
from kldb.report import setting_metrics, table1, to_csv
from kldb.runfolder import ImageRecord, Setting, iter_settings, read_run, run_labels
from kldb.sweep import SweepConfig, SweepResult, build_settings, check_config, check_resume, run_sweep

logger = logging.getLogger(__name__)

__all__ = [
    "FIXED_ALPHAS",
    "HEATMAPS",
    "HIT_THRESHOLD",
    "MAP_BETA",
    "MAP_DIR",
    "MAP_FIELDS",
    "MAP_SEEDS",
    "MapResult",
    "boundary_map",
    "check_map_classes",
    "default_alphas",
    "default_step_control",
    "heatmap_figure",
    "is_boundary_hit",
    "map_class_subsets",
    "map_config",
    "map_matrices",
    "map_rows",
    "map_table_markdown",
    "rank_boundaries",
    "read_group",
    "read_validity",
    "run_map",
    "write_map",
]

#: Seeds (images) per setting on the digits world: 32 per pair keeps the full 45-pair map within a CPU budget.
MAP_SEEDS = 32
#: The classifier-free guidance scale of a map: the paper's (and both presets') single-setting beta, 6.
MAP_BETA = PRESETS["digits"].beta
#: Guided alphas of a map with the paper's fixed step: 0.02 and 0.05 were the best fixed alphas on each of the four
#: pairs measured on the digits world (docs/performance.md, step-size control), and 0.2 fell 28-68 points short there.
FIXED_ALPHAS: tuple[float, ...] = (0.0, 0.02, 0.05)
#: A boundary hit: top-|C| = C and the largest probability below this.
HIT_THRESHOLD = 0.6
#: Images per row of a class subset's thumbnail grid.
GRID_IMAGES = 8
#: The map's folder inside its run folder.
MAP_DIR = "map"
#: The heatmaps: file name, title and colour map of each metric (``_r``: low values are bright, i.e. fragile).
HEATMAPS: dict[str, dict[str, str]] = {
    "median_kldb": {"file": "median_kldb.png", "title": "median KLDB reached (lower: closer to the boundary)",
                    "cmap": "viridis_r"},
    "hit_rate": {"file": "hit_rate.png", "title": "boundary-hit rate (top-2 = the pair, max p < {threshold:g})",
                 "cmap": "viridis"},
    "relative_drop": {"file": "kldb_drop.png", "title": "median KLDB drop against prompt-only", "cmap": "viridis"},
    "validity": {"file": "validity.png", "title": "validity share (an independent oracle sees one of the pair)",
                 "cmap": "viridis"},
}  # fmt: skip
#: Columns of ``map.csv`` (and keys of each row of ``map.json``), in order.
MAP_FIELDS = (
    "rank",
    "classes",
    "class_indices",
    "alpha",
    "n",
    "median_kldb",
    "median_kldb_low",
    "median_kldb_high",
    "kldb_q25",
    "kldb_q75",
    "median_kldb_prompt_only",
    "relative_drop",
    "relative_drop_low",
    "relative_drop_high",
    "n_paired",
    "hit_rate",
    "hit_rate_prompt_only",
    "validity",
    "validity_prompt_only",
    "setting",
    "setting_prompt_only",
)
FRAGILITY_RULE = (
    "most fragile first: lowest median KLDB reached by the chosen guided setting, then highest boundary-hit rate, then "
    "the order of the class subsets in the map; pairs are ranked among pairs, triples among triples"
)
_WNID = re.compile(r"^n\d{8}$")

#: A validity result: ``{setting name: share in [0, 1]}``, or a callable ``(run folder, records of one setting) ->
#: share``.
Validity = Mapping[str, float | None] | Callable[[Path, Sequence[ImageRecord]], float | None]


# ----------------------------------------------------------------------------------------------------------------------
# The map's sweep
# ----------------------------------------------------------------------------------------------------------------------


def default_step_control() -> str:
    """The map's step-size control: the quick start's (:data:`kldb.presets.QUICK_START`: backtracking)."""
    return QUICK_START["kldb_step_control"]


def default_alphas(step_control: str | None = None) -> tuple[float, ...]:
    """The map's alphas: 0 and the quick start's alpha (0.2) under a step-size control, which needs no alpha grid
    (backtracking from 0.2 came within 5 points of the best fixed alpha's drop on each subset measured on the digits
    world, and beat it on the four pairs); with the paper's fixed step (``"fixed"`` or ``None``), :data:`FIXED_ALPHAS`.

    Example:
        >>> default_alphas(None), default_alphas("backtracking")
        ((0.0, 0.02, 0.05), (0.0, 0.2))
    """
    if step_control is None or step_control == "fixed":
        return FIXED_ALPHAS
    return (0.0, float(QUICK_START["alpha"]))


def read_group(path: str | os.PathLike[str]) -> list[str | int]:
    """The classes of a group file: one class per line, as a label name or an index.

    Blank lines and ``#`` comments are skipped. A line may start with a WordNet id (``n`` and 8 digits), as in
    ImageNet's ``LOC_synset_mapping.txt``; the id is dropped and the rest of the line is the label name. So a WordNet
    group (say, the dogs) is the lines of its synsets copied out of that file. The names must match the classifier's
    labels (case-insensitively), e.g. ``tench, Tinca tinca`` for transformers' ImageNet models.

    Raises:
        KLDBPathError: if ``path`` is not a file.
        KLDBInputError: if a line holds a WordNet id without a name.
    """
    file = Path(path)
    if not file.is_file():
        raise KLDBPathError(f"Expected argument `group` to be a file with one class per line but got {str(path)!r}.")
    classes: list[str | int] = []
    for number, raw in enumerate(file.read_text(encoding="utf-8").splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        first, _, rest = line.partition(" ")
        if _WNID.match(first):
            if not rest.strip():
                raise KLDBInputError(
                    f"Expected argument `group` to give a label name after the WordNet id {first!r} on line {number} "
                    f"of {str(path)!r} but got none."
                )
            line = rest.strip()
        classes.append(int(line) if line.isdigit() else line)
    return classes


def check_map_classes(classes: Any) -> list[str | int]:
    """Check the K classes of a map: at least 2, all label names or all indices, no class twice (names compared
    case-insensitively, as the pipeline resolves them). Whether each one is a label of the classifier is checked by
    the sweep, with the pipeline's own message, before anything is written.

    Raises:
        KLDBInputTypeError: if ``classes`` is not a list of names or indices.
        KLDBInputError: if it has fewer than 2 classes, or one twice.
    """
    if isinstance(classes, (str, bytes)) or not isinstance(classes, Sequence):
        raise KLDBInputTypeError(
            f"Expected argument `classes` to be a list of at least 2 label names or indices but got {classes!r}."
        )
    items = list(classes)
    names = all(isinstance(c, str) and c.strip() for c in items)
    indices = all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in items)
    if not (names or indices):
        raise KLDBInputTypeError(
            f"Expected argument `classes` to be all label names or all indices >= 0 but got {items!r}."
        )
    if len(items) < 2:
        raise KLDBInputError(f"Expected argument `classes` to hold at least 2 classes but got {items!r}.")
    keys = [c.casefold() if isinstance(c, str) else c for c in items]
    twice = sorted({items[i] for i, k in enumerate(keys) if keys.count(k) > 1}, key=str)
    if twice:
        raise KLDBInputError(f"Expected argument `classes` to hold distinct classes but got {items!r}: {twice} twice.")
    return items


def map_class_subsets(classes: Sequence[str | int], triples: bool = False) -> list[list[str | int]]:
    """Every pair of ``classes`` in their order, then (with ``triples``) every triple.

    Example:
        >>> map_class_subsets(["a", "b", "c"], triples=True)
        [['a', 'b'], ['a', 'c'], ['b', 'c'], ['a', 'b', 'c']]
    """
    items = check_map_classes(classes)
    if triples and len(items) < 3:
        raise KLDBInputError(
            f"Expected argument `classes` to hold at least 3 classes with `triples=True` but got {items!r}."
        )
    subsets = [list(pair) for pair in itertools.combinations(items, 2)]
    if triples:
        subsets += [list(triple) for triple in itertools.combinations(items, 3)]
    return subsets


def _default_classes(pipeline: str, classifier: str | None) -> list[str]:
    if pipeline == "digits" and classifier is None:
        from kldb.digits import LABELS

        return list(LABELS)
    raise KLDBInputError(
        "Expected argument `classes` (at least 2 label names or indices of the classifier) but got None: the default, "
        f"all ten digits, is the digits world's, and this map audits pipeline {pipeline!r}"
        + (f" with classifier {classifier!r}." if classifier is not None else ".")
    )


def _check_alphas(alphas: Any) -> list[float]:
    ok = (
        isinstance(alphas, Sequence)
        and not isinstance(alphas, str)
        and all(isinstance(a, (int, float)) and not isinstance(a, bool) and math.isfinite(a) for a in alphas)
    )
    if not ok or 0 not in alphas or not any(a > 0 for a in alphas):
        raise KLDBInputError(
            "Expected argument `alphas` to hold 0 (prompt-only, the baseline of the drop) and at least one guided "
            f"alpha > 0 but got {alphas!r}."
        )
    return [float(a) for a in alphas]


def map_config(
    out_dir: str | os.PathLike[str],
    classes: Sequence[str | int] | None = None,
    *,
    triples: bool = False,
    seeds: int | Sequence[int] = MAP_SEEDS,
    alphas: Sequence[float] | None = None,
    beta: float = MAP_BETA,
    step_control: str | None = None,
    **fields: Any,
) -> SweepConfig:
    """The sweep of a boundary map: every pair (and triple) of ``classes`` x ``alphas`` x one ``beta`` x ``seeds``.

    Args:
        out_dir: the run folder (an existing run in it is resumed).
        classes: the K classes, as label names or indices; ``None`` is all ten digits on the digits world (and an
            error for any other pipeline or classifier). A group file gives them through :func:`read_group`.
        triples: also every triple of the classes.
        seeds: a number N (seeds 0 .. N-1) or the seeds themselves; image ``seed`` of every setting starts from the
            same noise.
        alphas: 0 and the guided alphas; default :func:`default_alphas` of the step-size control.
        beta: the classifier-free guidance scale.
        step_control: the pipeline's ``kldb_step_control`` for the guided settings (``"fixed"``: the paper's step);
            ``None`` is :func:`default_step_control`, the quick start's backtracking.
        **fields: any other :class:`~kldb.sweep.SweepConfig` field (``pipeline``, ``classifier``,
            ``num_inference_steps``, ``batch_size``, ``device``, ...). With ``init_images`` (a folder of real images,
            see :mod:`kldb.sweep`) every cell starts from every source, at one strength (``strengths`` of one value,
            or ``None`` for the default). ``batch_size`` defaults to the digits preset's
            (16).

    Returns:
        The checked config (:func:`kldb.sweep.check_config`).
    """
    reserved = {"out_dir", "class_subsets", "alphas", "betas", "seeds", "kldb_step_control"} & set(fields)
    if reserved:
        raise KLDBInputTypeError(
            f"Expected the map's own arguments (classes, alphas, beta, seeds, step_control) instead of the sweep fields "
            f"{sorted(reserved)}."
        )
    pipeline = fields.get("pipeline", PRESETS["digits"].pipeline)
    classifier = fields.get("classifier", PRESETS["digits"].classifier)
    classes = _default_classes(pipeline, classifier) if classes is None else classes
    if (
        isinstance(seeds, (bool, str))
        or not isinstance(seeds, (int, Sequence))
        or (isinstance(seeds, int) and seeds < 1)
    ):
        raise KLDBInputError(
            f"Expected argument `seeds` to be a positive integer or a list of seeds but got {seeds!r}."
        )
    seed_list = list(range(seeds)) if isinstance(seeds, int) else list(seeds)
    step_control = default_step_control() if step_control is None else step_control
    alpha_list = _check_alphas(list(default_alphas(step_control)) if alphas is None else alphas)
    if not isinstance(beta, (int, float)) or isinstance(beta, bool):
        raise KLDBInputTypeError(f"Expected argument `beta` to be a number but got {beta!r}.")
    fields.setdefault("batch_size", PRESETS["digits"].batch_size)
    config = SweepConfig(
        out_dir=out_dir,
        class_subsets=map_class_subsets(classes, triples),
        alphas=alpha_list,
        betas=[float(beta)],
        seeds=seed_list,
        kldb_step_control=step_control,
        **fields,
    )
    check_config(config)
    if config.init_images is not None and config.strengths is not None and len(config.strengths) > 1:
        # one map cell per class subset and alpha: its images pool the sources, at one strength
        raise KLDBInputError(
            f"Expected argument `strengths` to hold one strength for a map from `init_images` but got "
            f"{config.strengths!r}: run one map per strength."
        )
    return config


# ----------------------------------------------------------------------------------------------------------------------
# The map's numbers, from a run folder's records
# ----------------------------------------------------------------------------------------------------------------------


def is_boundary_hit(
    top_classes: Sequence[int],
    top_probabilities: Sequence[float | None],
    classes: Sequence[int],
    threshold: float = HIT_THRESHOLD,
) -> bool:
    """Whether an image lies on the boundary of ``classes``: its |C| most probable classes are exactly C and the most
    probable one has a probability below ``threshold``.

    Example:
        >>> is_boundary_hit([3, 8, 5], [0.55, 0.40, 0.02], [8, 3]), is_boundary_hit([3, 8, 5], [0.7, 0.2, 0.1], [8, 3])
        (True, False)
    """
    top = top_probabilities[0] if len(top_probabilities) else None
    if top is None or not math.isfinite(top):
        return False
    return top_set_is_classes(top_classes, classes) and top < threshold


def _share(records: Sequence[ImageRecord], threshold: float) -> float:
    return sum(is_boundary_hit(r.top_classes, r.top_probabilities, r.class_indices, threshold) for r in records) / len(
        records
    )


def _check_validity(validity: Any) -> None:
    if validity is not None and not isinstance(validity, Mapping) and not callable(validity):
        raise KLDBInputTypeError(
            "Expected argument `validity` to be None, a {setting name: share} mapping or a callable (run folder, "
            f"records) -> share but got {type(validity).__name__}."
        )


def _validity_shares(
    run: Path, groups: Mapping[str, Sequence[ImageRecord]], validity: Validity | None
) -> dict[str, float | None]:
    _check_validity(validity)
    if validity is None:
        return {}
    if isinstance(validity, Mapping):
        shares = _as_shares(validity)
        if shares is None:
            raise KLDBInputError(
                "Expected argument `validity` to be {setting name: share} or the result of kldb.validity.run_validity "
                f"but got a mapping with keys {sorted(map(str, validity))[:5]}."
            )
    else:
        shares = {setting: validity(run, list(group)) for setting, group in groups.items()}
    for setting, share in shares.items():
        ok = share is None or (
            isinstance(share, (int, float))
            and not isinstance(share, bool)
            and math.isfinite(share)
            and 0 <= share <= 1
        )
        if not ok:
            raise KLDBInputError(
                f"Expected argument `validity` to give shares in [0, 1] (or None) but got {share!r} for {setting!r}."
            )
    return {k: (None if v is None else float(v)) for k, v in shares.items()}


def _as_shares(data: Any) -> dict[str, Any] | None:
    """``{setting: share}`` from a result of :func:`kldb.validity.run_validity` (its ``settings`` rows) or from such a
    mapping itself; ``None`` for anything else."""
    if isinstance(data, Mapping) and isinstance(data.get("settings"), list):
        rows = data["settings"]
        if all(isinstance(r, Mapping) and "setting" in r and "valid_share" in r for r in rows):
            return {r["setting"]: r["valid_share"] for r in rows}
        return None
    if isinstance(data, Mapping) and all(isinstance(k, str) for k in data):
        return dict(data)
    return None


def read_validity(path: str | os.PathLike[str]) -> dict[str, float | None]:
    """A validity result from a JSON file: the ``validity.json`` that ``kldb validity`` writes (its ``settings`` rows,
    ``setting`` and ``valid_share``), or a plain object ``{setting name: share}``.

    Raises:
        KLDBPathError: if ``path`` is not a file.
        KLDBInputError: if it holds neither form.
    """
    file = Path(path)
    if not file.is_file():
        raise KLDBPathError(f"Expected argument `validity` to be a JSON file but got {str(path)!r}.")
    shares = _as_shares(json.loads(file.read_text(encoding="utf-8")))
    if shares is not None:
        return shares
    raise KLDBInputError(
        "Expected argument `validity` to be a validity.json written by `kldb validity` (settings rows with `setting` "
        f"and `valid_share`) or a JSON object {{setting name: share}} but {str(path)!r} is neither."
    )


def _negated(value: float | None) -> float | None:
    return None if value is None else -value


def map_rows(
    records: Sequence[ImageRecord],
    alpha: float | None = None,
    hit_threshold: float = HIT_THRESHOLD,
    validity: Mapping[str, float | None] | None = None,
) -> list[dict[str, Any]]:
    """One row per class subset of a map's records (one beta), in the order the subsets first appear.

    Args:
        records: the records of the map: per class subset, alpha 0 and at least one guided alpha, one beta.
        alpha: the guided alpha to report for every subset; ``None`` chooses per subset the one with the lowest median
            KLDB (:func:`kldb.report.table1`'s rule).
        hit_threshold: the largest probability below which an image with top-|C| = C is a boundary hit.
        validity: ``{setting name: share}``; settings it does not name get ``None``.

    Returns:
        Rows with the keys of :data:`MAP_FIELDS` (``rank`` is ``None`` until :func:`rank_boundaries`).
    """
    validity = validity or {}
    metrics = setting_metrics(records)  # medians, quartiles, bootstrap intervals, the paired change per setting
    groups = iter_settings(records)
    best = {tuple(t["classes"]): t["alpha_best"] for t in table1(metrics)}  # one beta: one row per class subset
    subsets: dict[tuple[int, ...], list[dict[str, Any]]] = {}
    for row in metrics:
        subsets.setdefault(tuple(row["class_indices"]), []).append(row)
    rows = []
    for indices, settings in subsets.items():
        names = settings[0]["classes"]
        baseline = next((s for s in settings if s["alpha"] == 0.0), None)
        wanted = best[tuple(names)] if alpha is None else float(alpha)
        chosen = next((s for s in settings if s["alpha"] > 0 and s["alpha"] == wanted), None)
        if baseline is None or chosen is None:
            have = sorted(s["alpha"] for s in settings)
            raise KLDBInputError(
                f"Expected the map's records of {names} to hold alpha 0 and the guided alpha "
                f"{'with the lowest median KLDB' if alpha is None else wanted} but they hold alphas {have}."
            )

        rows.append(
            {
                "rank": None,
                "classes": list(names),
                "class_indices": list(indices),
                "alpha": chosen["alpha"],
                "n": chosen["n"],
                "median_kldb": chosen["median_kldb"],
                "median_kldb_low": chosen["median_kldb_low"],
                "median_kldb_high": chosen["median_kldb_high"],
                "kldb_q25": chosen["kldb_q25"],
                "kldb_q75": chosen["kldb_q75"],
                "median_kldb_prompt_only": baseline["median_kldb"],
                # the drop is the report's relative change with the sign turned, its interval paired by seed
                "relative_drop": _negated(chosen["relative_kldb_change"]),
                "relative_drop_low": _negated(chosen["relative_kldb_change_high"]),
                "relative_drop_high": _negated(chosen["relative_kldb_change_low"]),
                "n_paired": chosen["n_paired"],
                "hit_rate": _share(groups[chosen["setting"]], hit_threshold),
                "hit_rate_prompt_only": _share(groups[baseline["setting"]], hit_threshold),
                "validity": validity.get(chosen["setting"]),
                "validity_prompt_only": validity.get(baseline["setting"]),
                "setting": chosen["setting"],
                "setting_prompt_only": baseline["setting"],
            }
        )
    return rows


def rank_boundaries(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows, most fragile first (the module docstring's rule), each with its ``rank`` (1 = most fragile) among the
    subsets of its size; pairs come before triples."""
    order = {id(row): i for i, row in enumerate(rows)}
    ranked = sorted(rows, key=lambda r: (len(r["class_indices"]), r["median_kldb"], -r["hit_rate"], order[id(r)]))
    counters: dict[int, int] = {}
    out = []
    for row in ranked:
        size = len(row["class_indices"])
        counters[size] = counters.get(size, 0) + 1
        out.append({**row, "rank": counters[size]})
    return out


def map_matrices(rows: Sequence[dict[str, Any]], class_indices: Sequence[int]) -> dict[str, list[list[float | None]]]:
    """The K x K heatmaps of the pair rows: ``median_kldb``, ``hit_rate``, ``relative_drop``, ``validity``.

    Cell ``[i][j]`` and ``[j][i]`` hold the value of the pair (``class_indices[i]``, ``class_indices[j]``); the
    diagonal and pairs without a row are ``None``.
    """
    position = {int(c): i for i, c in enumerate(class_indices)}
    size = len(class_indices)
    matrices: dict[str, list[list[float | None]]] = {m: [[None] * size for _ in range(size)] for m in HEATMAPS}
    for row in rows:
        if len(row["class_indices"]) != 2:
            continue
        i, j = (position[int(c)] for c in row["class_indices"])
        for metric, matrix in matrices.items():
            matrix[i][j] = matrix[j][i] = row[metric]
    return matrices


# ----------------------------------------------------------------------------------------------------------------------
# Drawing
# ----------------------------------------------------------------------------------------------------------------------


def format_cell(metric: str, value: float | None) -> str:
    """A heatmap cell's text: median KLDB with 2 decimals, the shares and the drop in percent; ``""`` for no value.

    Example:
        >>> format_cell("median_kldb", 0.1234), format_cell("hit_rate", 0.5), format_cell("relative_drop", -0.25)
        ('0.12', '50%', '-25%')
    """
    if value is None:
        return ""
    if metric == "median_kldb":
        return f"{value:.2f}"
    return f"{100 * value:.0f}%"


def heatmap_figure(
    matrix: Sequence[Sequence[float | None]], labels: Sequence[str], metric: str, hit_threshold: float = HIT_THRESHOLD
) -> Any:
    """A matplotlib figure of one K x K heatmap: the class names on both axes, each cell's value written in it, the
    diagonal left empty."""
    from kldb.report import _pyplot

    plt = _pyplot()
    spec = HEATMAPS[metric]
    values = np.array([[np.nan if v is None else float(v) for v in row] for row in matrix], dtype=np.float64)
    size = len(labels)
    figure, ax = plt.subplots(figsize=(1.6 + 0.62 * size, 1.2 + 0.55 * size))
    finite = values[np.isfinite(values)]
    low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    if metric in ("hit_rate", "validity"):
        low, high = 0.0, 1.0
    elif metric == "median_kldb":
        low = 0.0
    if high <= low:
        high = low + 1.0
    cmap = plt.get_cmap(spec["cmap"]).with_extremes(bad="white")
    image = ax.imshow(np.ma.masked_invalid(values), cmap=cmap, vmin=low, vmax=high)
    ax.set_xticks(range(size), labels=list(labels), rotation=45, ha="right")
    ax.set_yticks(range(size), labels=list(labels))
    fontsize = 9 if size <= 10 else 7
    for i in range(size):
        for j in range(size):
            if not np.isfinite(values[i, j]):
                continue
            r, g, b, _ = cmap((values[i, j] - low) / (high - low))
            color = "black" if 0.299 * r + 0.587 * g + 0.114 * b > 0.5 else "white"
            ax.text(j, i, format_cell(metric, values[i, j]), ha="center", va="center", color=color, fontsize=fontsize)
    ax.set_title(spec["title"].format(threshold=hit_threshold), fontsize=10)
    figure.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    return figure


def plot_heatmap(
    matrix: Sequence[Sequence[float | None]], labels: Sequence[str], metric: str, hit_threshold: float = HIT_THRESHOLD
) -> bytes:
    """:func:`heatmap_figure` as PNG bytes."""
    from kldb.report import _figure_bytes

    return _figure_bytes(heatmap_figure(matrix, labels, metric, hit_threshold))


def subset_grid(run: Path, guided: Sequence[ImageRecord], prompt_only: Sequence[ImageRecord], per_row: int) -> bytes:
    """PNG bytes: the ``per_row`` guided images with the lowest KLDB (ties: lower seed), and below them the prompt-only
    images of the same seeds, each with its KLDB, top-2 probabilities and seed."""
    import PIL.Image

    from kldb.render import captioned_grid, labelled

    chosen = sorted(guided, key=lambda r: (math.inf if r.kldb is None else r.kldb, r.seed))[:per_row]
    by_seed = {r.seed: r for r in prompt_only}
    rows = []
    for title, records in (
        (f"{' / '.join(chosen[0].classes)}, alpha = {chosen[0].alpha:g}: lowest KLDB", chosen),
        ("prompt-only, same seeds", [by_seed[r.seed] for r in chosen if r.seed in by_seed]),
    ):
        images, captions = [], []
        for r in records:
            with PIL.Image.open(run / r.file) as image:
                images.append(image.convert("RGB"))
            top = [labelled(name, p, 2) for name, p in zip(r.top_labels[:2], r.top_probabilities[:2]) if p is not None]
            captions.append([labelled("KLDB", r.kldb, 3) if r.kldb is not None else "KLDB = n/a", *top,
                             labelled("seed", r.seed)])  # fmt: skip
        if images:
            rows.append((title, images, captions))
    buffer = io.BytesIO()
    captioned_grid(rows).save(buffer, format="PNG")
    return buffer.getvalue()


def _subset_name(row: dict[str, Any]) -> str:
    setting = Setting(tuple(row["class_indices"]), tuple(row["classes"]), 0.0, 0.0)
    return setting.name.rsplit("_alpha", 1)[0]


def _number(value: float | None, percent: bool = False) -> str:
    if value is None:
        return "n/a"
    return f"{100 * value:.0f}%" if percent else f"{value:.4f}"


def _interval(low: float | None, high: float | None, percent: bool = False) -> str:
    return "" if low is None or high is None else f"[{_number(low, percent)}, {_number(high, percent)}]"


def map_table_markdown(rows: Sequence[dict[str, Any]], links: bool = False) -> str:
    """The ranked table as Markdown (``links``: a column linking each class subset's grid, as in ``map.md``)."""
    header = "| rank | classes | α | median KLDB [95% CI] | prompt-only median KLDB | drop [95% CI] | hit rate "
    header += "| prompt-only hit rate | validity |" + (" grid |" if links else "")
    lines = [header, "|---" * (10 if links else 9) + "|"]
    for row in rows:
        line = (
            f"| {row['rank']} | {' / '.join(row['classes'])} | {row['alpha']:g} | {_number(row['median_kldb'])} "
            f"{_interval(row['median_kldb_low'], row['median_kldb_high'])} | "
            f"{_number(row['median_kldb_prompt_only'])} | {_number(row['relative_drop'], True)} "
            f"{_interval(row['relative_drop_low'], row['relative_drop_high'], True)} | "
            f"{_number(row['hit_rate'], True)} | {_number(row['hit_rate_prompt_only'], True)} | "
            f"{_number(row['validity'], True)} |"
        )
        if links:
            line += f" [grid](grids/{_subset_name(row)}.png) |"
        lines.append(line)
    return "\n".join(lines) + "\n"


def _markdown(rows: Sequence[dict[str, Any]], info: dict[str, Any], heatmaps: Sequence[str]) -> str:
    subsets = f"{info['pairs']} pairs" + (f", {info['triples']} triples" if info["triples"] else "")
    control = f", step control {info['step_control']}" if info.get("step_control") else ""
    alphas = ", ".join(f"{a:g}" for a in info["alphas"])
    lines = [
        f"# Boundary map: {', '.join(info['classes'])}",
        "",
        f"{len(info['classes'])} classes, {subsets}; alphas {alphas} at beta {info['beta']:g}{control}, "
        f"{info['seeds']} seeds each. Reported per class subset: {info['alpha_choice']}. A boundary hit: top-|C| = C "
        f"and max probability < {info['hit_threshold']:g}.",
        "",
        f"Ranking: {FRAGILITY_RULE}.",
        "",
        map_table_markdown(rows, links=True),
    ]
    for metric in heatmaps:
        spec = HEATMAPS[metric]
        lines += [f"![{spec['title'].format(threshold=info['hit_threshold'])}]({spec['file']})", ""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------------
# Writing the map of a run folder, and running a map
# ----------------------------------------------------------------------------------------------------------------------


def _map_records(
    run: Path, records: list[ImageRecord], labels: Sequence[str], config: SweepConfig | None
) -> list[ImageRecord]:
    """The records of the map: those of ``config``'s grid (all of them must exist), else every pair and triple at the
    run's one beta."""
    if config is not None:
        by_key = {r.key: r for r in records}
        keys = [s.key(seed) for s in build_settings(config, labels) for seed in config.seeds]
        missing = [k for k in keys if k not in by_key]
        if missing:
            raise KLDBInputError(
                f"Expected argument `run` to hold every image of the map ({len(keys)}) but {str(run)!r} lacks "
                f"{len(missing)} (e.g. classes {list(missing[0][0])}, alpha {missing[0][1]:g}, seed {missing[0][3]}). "
                "Run the map (without --report-only) to make them."
            )
        return [by_key[k] for k in keys]
    chosen = [r for r in records if len(r.class_indices) in (2, 3)]
    betas = sorted({float(r.beta) for r in chosen})
    if len(betas) != 1:
        raise KLDBInputError(
            f"Expected argument `run` to hold pairs or triples at exactly one beta but {str(run)!r} has betas {betas}; "
            "pass `config` to choose the map's settings."
        )
    return chosen


def write_map(
    run: str | os.PathLike[str],
    config: SweepConfig | None = None,
    *,
    alpha: float | None = None,
    validity: Validity | None = None,
    per_subset: int = GRID_IMAGES,
    hit_threshold: float = HIT_THRESHOLD,
    out_dir: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """Draw the boundary map of a run folder from its manifest records (see the module docstring for what is written).

    Args:
        run: the run folder.
        config: the map's sweep (:func:`map_config`): the map covers exactly its class subsets, alphas, beta and seeds,
            and every one of its images must be in the run. ``None``: every pair and triple of the run (one beta).
        alpha: the guided alpha reported for every class subset; ``None`` chooses per subset the one with the lowest
            median KLDB.
        validity: a validity result (``{setting name: share}`` or a callable ``(run folder, records of one setting)
            -> share``); with it, ``validity.png`` is drawn. Without it, a stale ``validity.png`` is removed.
        per_subset: images per row of each class subset's thumbnail grid.
        hit_threshold: see :func:`is_boundary_hit`.
        out_dir: where to write; default ``<run>/map``.

    Returns:
        ``{"rows": ranked rows, "matrices": {...}, "classes": [...], "files": {name: path}}``.
    """
    run = Path(run)
    out = Path(out_dir) if out_dir is not None else run / MAP_DIR
    if isinstance(per_subset, bool) or not isinstance(per_subset, int) or per_subset < 1:
        raise KLDBInputError(f"Expected argument `per_subset` to be a positive integer but got {per_subset!r}.")
    if isinstance(hit_threshold, bool) or not isinstance(hit_threshold, (int, float)) or not 0 < hit_threshold <= 1:
        raise KLDBInputError(f"Expected argument `hit_threshold` to be a number in (0, 1] but got {hit_threshold!r}.")
    _check_validity(validity)
    all_records = read_run(run)
    labels = run_labels(run, all_records)
    records = _map_records(run, all_records, labels, config)
    groups = iter_settings(records)
    rows = map_rows(records, alpha, hit_threshold, _validity_shares(run, groups, validity))
    ranked = rank_boundaries(rows)
    # the K classes, in the order of the map: each class at its first appearance in the (pair) subsets
    order: dict[int, str] = {}
    for row in rows:
        for index, name in zip(row["class_indices"], row["classes"]):
            order.setdefault(int(index), name)
    indices, names = list(order), list(order.values())
    matrices = map_matrices(rows, indices)
    has_validity = any(v is not None for line in matrices["validity"] for v in line)

    files: dict[str, Path] = {}
    for metric, spec in HEATMAPS.items():
        if metric == "validity" and not has_validity:
            stale = out / spec["file"]
            if stale.exists():
                logger.info("No validity result given: removing the stale %s", stale)
                stale.unlink()
            continue
        files[spec["file"]] = atomic_write_bytes(
            out / spec["file"], plot_heatmap(matrices[metric], names, metric, hit_threshold)
        )
    for row in ranked:
        group_guided, group_baseline = groups[row["setting"]], groups[row["setting_prompt_only"]]
        name = f"grids/{_subset_name(row)}.png"
        files[name] = atomic_write_bytes(out / name, subset_grid(run, group_guided, group_baseline, per_subset))
    alphas = sorted({float(r.alpha) for r in records})
    step_control = config.kldb_step_control if config is not None else None
    info = {
        "run": str(run),
        "classes": names,
        "class_indices": indices,
        "pairs": sum(len(r["class_indices"]) == 2 for r in rows),
        "triples": sum(len(r["class_indices"]) == 3 for r in rows),
        "alphas": alphas,
        "beta": float(records[0].beta),
        "seeds": len({r.seed for r in records}),
        "step_control": step_control,
        "alpha_choice": "the guided alpha with the lowest median KLDB" if alpha is None else f"alpha = {alpha:g}",
        "hit_threshold": float(hit_threshold),
        "fragility_rule": FRAGILITY_RULE,
    }
    files["map.csv"] = atomic_write_text(out / "map.csv", to_csv(ranked, MAP_FIELDS))
    drawn = [m for m, spec in HEATMAPS.items() if spec["file"] in files]
    files["map.md"] = atomic_write_text(out / "map.md", _markdown(ranked, info, drawn))
    files["map.json"] = out / "map.json"
    document = {**info, "matrices": matrices, "rows": ranked, "files": sorted(files)}
    atomic_write_json(files["map.json"], document)
    return {"rows": ranked, "matrices": matrices, "classes": names, "class_indices": indices,
            "files": {k: str(v) for k, v in files.items()}}  # fmt: skip


@dataclass
class MapResult:
    """What a map did: its sweep (``None`` on processes other than the main one's drawing) and what it wrote."""

    run_dir: Path
    map_dir: Path
    sweep: SweepResult | None
    rows: list[dict[str, Any]] = field(default_factory=list)
    matrices: dict[str, list[list[float | None]]] = field(default_factory=dict)
    classes: list[str] = field(default_factory=list)
    files: dict[str, str] = field(default_factory=dict)


def run_map(
    config: SweepConfig,
    *,
    validity: Validity | None = None,
    alpha: float | None = None,
    per_subset: int = GRID_IMAGES,
    hit_threshold: float = HIT_THRESHOLD,
    progress: bool = True,
    state: Any = None,
    report_only: bool = False,
) -> MapResult:
    """Run (or resume) a map's sweep, then draw the map on the main process.

    Args:
        config: the map's sweep (:func:`map_config`).
        validity, alpha, per_subset, hit_threshold: see :func:`write_map`.
        progress: the sweep's progress bar.
        state: an ``accelerate.PartialState`` (see :func:`kldb.sweep.run_sweep`).
        report_only: make no image: redraw the map of a run that holds all of them (else an error says how many lack),
            made with the same image-fixing settings (else an error names the first that differs).

    Returns:
        A :class:`MapResult`; on processes other than the main one, without rows and files.
    """
    _check_alphas(config.alphas)
    if len(config.betas) != 1:
        raise KLDBInputError(f"Expected a map to have one beta (argument `beta`) but got {config.betas!r}.")
    if alpha is not None and (isinstance(alpha, bool) or alpha not in config.alphas or alpha <= 0):
        raise KLDBInputError(
            f"Expected argument `alpha` to be None or one of the map's guided alphas "
            f"{[a for a in config.alphas if a > 0]} but got {alpha!r}."
        )
    _check_validity(validity)
    if isinstance(per_subset, bool) or not isinstance(per_subset, int) or per_subset < 1:
        raise KLDBInputError(f"Expected argument `per_subset` to be a positive integer but got {per_subset!r}.")
    out = Path(config.out_dir)
    if report_only:
        check_config(config)
        check_resume(out, config)  # the run's images were made with these image-fixing settings
        result, main = None, True
    else:
        result = run_sweep(config, progress=progress, state=state)
        from accelerate import PartialState

        main = (state if state is not None else PartialState()).is_main_process
    if not main:
        return MapResult(run_dir=out, map_dir=out / MAP_DIR, sweep=result)
    drawn = write_map(out, config, alpha=alpha, validity=validity, per_subset=per_subset, hit_threshold=hit_threshold)
    return MapResult(
        run_dir=out,
        map_dir=out / MAP_DIR,
        sweep=result,
        rows=drawn["rows"],
        matrices=drawn["matrices"],
        classes=drawn["classes"],
        files=drawn["files"],
    )


def boundary_map(
    out_dir: str | os.PathLike[str],
    classes: Sequence[str | int] | None = None,
    *,
    triples: bool = False,
    seeds: int | Sequence[int] = MAP_SEEDS,
    alphas: Sequence[float] | None = None,
    beta: float = MAP_BETA,
    step_control: str | None = None,
    validity: Validity | None = None,
    alpha: float | None = None,
    per_subset: int = GRID_IMAGES,
    hit_threshold: float = HIT_THRESHOLD,
    progress: bool = True,
    state: Any = None,
    report_only: bool = False,
    **fields: Any,
) -> MapResult:
    """Map every boundary of K classes of a classifier: :func:`map_config`, then :func:`run_map`.

    Example (the digits world's full map: all ten digits, 45 pairs)::

        from kldb.boundary_map import boundary_map

        result = boundary_map("runs/digits_map")
        print(result.rows[0]["classes"], result.rows[0]["median_kldb"])  # the most fragile boundary

    Args:
        out_dir, classes, triples, seeds, alphas, beta, step_control, **fields: see :func:`map_config`.
        validity, alpha, per_subset, hit_threshold, progress, state, report_only: see :func:`run_map`.
    """
    config = map_config(
        out_dir, classes, triples=triples, seeds=seeds, alphas=alphas, beta=beta, step_control=step_control, **fields
    )
    return run_map(
        config,
        validity=validity,
        alpha=alpha,
        per_subset=per_subset,
        hit_threshold=hit_threshold,
        progress=progress,
        state=state,
        report_only=report_only,
    )
