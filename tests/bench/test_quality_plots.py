"""Label placement of the quality-vs-parameters plot."""

from __future__ import annotations

import pytest

from zoo.bench.quality_plots import spread_labels


def test_labels_of_close_points_are_spread_and_far_ones_stay():
    anchors = [(100.0, 50.0), (101.0, 51.0), (100.5, 49.0), (400.0, 50.0), (100.0, 200.0)]
    heights = spread_labels(anchors, gap=10.0, width=80.0)
    close = sorted(heights[:3])
    assert close[0] == 49.0 and close[1] - close[0] >= 10.0 and close[2] - close[1] >= 10.0
    assert heights[3] == 50.0 and heights[4] == 200.0  # another column, or far above: untouched
    assert all(h >= y for h, (_, y) in zip(heights, anchors))  # labels only move up


@pytest.mark.parametrize("n", [2, 7])
def test_a_stack_of_identical_points_gets_one_line_each(n):
    heights = spread_labels([(10.0, 10.0)] * n, gap=5.0, width=50.0)
    assert sorted(heights) == [10.0 + 5.0 * i for i in range(n)]


def test_a_label_pushed_up_pushes_the_one_above_it():
    heights = spread_labels([(0.0, 0.0), (0.0, 4.0), (0.0, 12.0)], gap=10.0, width=50.0)
    assert heights == [0.0, 10.0, 20.0]
