"""Shared, session-scoped fixtures: built once, treated as read-only by the tests."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def test_processor():
    """The factory ``LlavaProcessor`` of the "test" size (56 px images, 16 visual tokens)."""
    from sts_train.factory import build_processor

    return build_processor("test")


@pytest.fixture(scope="session")
def shapes_dir(tmp_path_factory):
    """A small shapes data set at 56 px (seed 0): 8 captions, 20 QA (the 20th is text-only),
    4 + 4 held-out samples. Returns the dict of paths of :func:`generate_shapes`."""
    from sts_train.shapes import generate_shapes

    out = tmp_path_factory.mktemp("data") / "shapes"
    return generate_shapes(out, n_alignment=8, n_instruction=20, n_eval=4, image_size_px=56, seed=0)
