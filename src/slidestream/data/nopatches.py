"""Slides that give no patches: name them once, say why, and turn "no patches at all" into one
clear :class:`~slidestream.errors.NoPatchesError`.

Used by ``PatchStream`` (slides whose sampler yields no location) and by the patch database
build (slides that add no patch).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

from slidestream.errors import NoPatchesError
from slidestream.sampling import AnnotationSampler, PatchSampler
from slidestream.tissue import NEAR_EMPTY, TissueMask

__all__ = ["empty_slide_reason", "no_patches_error", "warn_empty_slide"]

log = logging.getLogger(__name__)

_WARNED: set[str] = set()  # slides already named by this process


def empty_slide_reason(mask: TissueMask | None, sampler: PatchSampler) -> str:
    """Why a slide probably gave no patch, from its mask and the sampler's settings."""
    if mask is not None and mask.fraction < NEAR_EMPTY:
        return (
            f"its tissue mask is empty ({100 * mask.fraction:.3f}% tissue, method "
            f"{mask.method!r}): a blank slide, or try tissue method 'hsv'"
        )
    size = f"{sampler.size} px" + (f" at {sampler.mpp} µm/px" if sampler.mpp else "")
    why = (
        f"no {size} patch has min_tissue={sampler.min_tissue:g} of tissue "
        f"({100 * mask.fraction:.1f}% of the slide is tissue)"
        if mask is not None
        else f"no {size} patch has min_tissue={sampler.min_tissue:g} of tissue"
    )
    if isinstance(sampler, AnnotationSampler):
        why += f", or no annotated area holds one (min_overlap={sampler.min_overlap:g})"
    return why + ": lower min_tissue, or use a smaller size or mpp"


def warn_empty_slide(
    path: str | os.PathLike[str], mask: TissueMask | None, sampler: PatchSampler
) -> None:
    """Log once per slide and process that ``path`` gave no patch, and why."""
    key = str(path)
    if key in _WARNED:
        return
    _WARNED.add(key)
    log.warning("%s gives no patches: %s", path, empty_slide_reason(mask, sampler))


def no_patches_error(
    slides: Sequence[str | os.PathLike[str]],
    sampler: PatchSampler,
    *,
    total: int | None = None,
    failed: int = 0,
) -> NoPatchesError:
    """The error for a cohort where no slide gave a patch: names up to five ``slides`` (of
    ``total``) and the likely causes."""
    names = [os.path.basename(str(s)) for s in slides]
    total = len(names) + failed if total is None else total
    more = max(len(names) - 5, 0) + max(total - failed - len(names), 0)  # others: other workers
    shown = ", ".join(names[:5]) + (f" and {more} more" if more else "")
    size = f"{sampler.size} px" + (f" at {sampler.mpp} µm/px" if sampler.mpp else "")
    return NoPatchesError(
        f"no patches from any of {total} slides (no patch location in: {shown or 'none'}"
        f"{f'; {failed} failed to open or read' if failed else ''}); likely causes: empty tissue "
        f"masks (blank slides, or try tissue method 'hsv'), min_tissue={sampler.min_tissue:g} "
        f"too high, or {size} patches larger than the tissue pieces; the warnings above say "
        f"which for each slide"
    )
