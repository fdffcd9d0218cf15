"""Scans as they arrive (tests/damage.py: frames, shadows, margins, noise, rotation, JPEG
q25, generated from MNIST test digits): each cleaning step on its own, then every kind
of damage through ``gpu-mdf infer`` with the reference model, against clean scans."""

import json

import numpy as np
import pytest
from click.testing import CliRunner
from damage import DAMAGE, damaged_folder, frame, scan, shadow

from gpu_mdf.cli import main
from gpu_mdf.data import polarity, scans
from gpu_mdf.data.images import to_mnist

N = 300


@pytest.fixture(scope="module")
def digits(mnist):
    (_, _), (xte, yte) = mnist
    return xte[:N], yte[:N]


def _inverted(page):
    return 255 - page


def test_polarity_is_decided_away_from_a_dark_frame_or_shadow(digits):
    x, _ = digits
    pages = np.stack([scan(x[i], i) for i in range(20)])
    framed = np.stack([frame(8)(p, i) for i, p in enumerate(pages)])
    shaded = np.stack([shadow(p, i) for i, p in enumerate(pages)])
    for batch in (pages, framed, shaded):
        assert polarity.light_background(batch).all()          # a light page, whatever its edges
    assert not polarity.light_background(x[:50]).any()          # MNIST's own: white on black
    assert polarity.light_background(255 - x[:50]).all()


def test_background_removal_takes_a_shadow_to_black_and_keeps_the_strokes(digits):
    x, _ = digits
    page = _inverted(shadow(scan(x[0], 0), 0)).astype(float)    # light strokes, the shadow bright at the left
    fg = scans.remove_background(page)
    assert page[:, :5].mean() > 150 and fg[:, :5].mean() < 10
    strokes = _inverted(scan(x[0], 0)) > 150
    assert np.median(fg[strokes]) > 150


def test_components_label_8_connected_pieces():
    mask = np.zeros((9, 12), bool)
    mask[1:4, 1:4] = True                   # a square
    mask[4, 4] = True                       # touching it by a corner: the same component
    mask[6:8, 8:11] = True                  # another
    labels = scans.components(mask)
    assert len(np.unique(labels[mask])) == 2 and (labels[~mask] == 0).all()
    assert labels[1, 1] == labels[4, 4] != labels[7, 9]


def test_the_digit_is_kept_and_frames_and_specks_dropped(digits):
    x, _ = digits
    page = _inverted(frame(8)(scan(x[1], 1), 1))
    page[50, 5:12] = 255                    # a speck far from the digit, a line touching the frame
    page[90, 90] = 255
    fg = scans.remove_background(scans.working_copy(page))
    keep = scans.digit_components(scans.components(scans.ink_mask(fg)))
    ys, xs = np.nonzero(keep)
    assert ys.min() > 8 and xs.min() > 8 and ys.max() < 91 and xs.max() < 91     # no frame
    assert not keep[90, 90] and not keep[50, 5:12].any()
    assert keep.sum() > 0.5 * (_inverted(scan(x[1], 1)) > 128).sum()             # the digit


def test_a_small_digit_on_a_large_page_keeps_its_detail(digits):
    x, _ = digits
    page = np.full((900, 700), 232, np.uint8)
    page[400:460, 300:360] = scan(x[2], 2)[20:80, 20:80]
    out, flipped = to_mnist(page)
    assert flipped and out.shape == (28, 28)
    rows = np.flatnonzero(out.max(axis=1) > 60)
    assert 17 <= rows[-1] - rows[0] + 1 <= 21                    # fitted into 20x20, not a blur


@pytest.fixture(scope="module")
def damage_scores(reference_mdf, digits, tmp_path_factory):
    """Accuracy of the reference model on every kind of damage (and on clean scans)."""
    x, y = digits
    root = tmp_path_factory.mktemp("damage")
    scores = {}
    for kind in DAMAGE:
        folder = damaged_folder(root / kind.replace(" ", "_"), x, y, kind)
        out = root / f"out_{kind.replace(' ', '_')}"
        r = CliRunner().invoke(main, ["infer", str(reference_mdf), "--data", str(folder), "--out", str(out),
                                      "--device", "cpu", "--no-progress"])
        assert r.exit_code == 0, r.output
        scores[kind] = json.loads((out / "metrics.json").read_text())
    print({k: round(m["accuracy"], 4) for k, m in scores.items()})
    return scores


@pytest.mark.parametrize("kind", [k for k in DAMAGE if k != "clean"])
def test_every_kind_of_damage_keeps_90_percent_of_the_clean_accuracy(damage_scores, kind):
    clean = damage_scores["clean"]["accuracy"]
    assert clean > 0.8
    assert damage_scores[kind]["accuracy"] >= 0.9 * clean, (kind, damage_scores[kind]["accuracy"], clean)
    assert damage_scores[kind]["invert"]["images_inverted"] == N
