"""``benchmarks/dtf_block.py`` runs end to end and its table adds up what it measured.

A smoke run of the real script at tiny stage shapes (one timed repeat): every stage prints a row,
the stage total is blocks x block time, and the last row is the sum of the stage totals.
"""

from __future__ import annotations

import os
import re
import sys

_BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'benchmarks')
sys.path.insert(0, _BENCHMARKS)
import dtf_block  # noqa: E402  pylint: disable=g-import-not-at-top


def test_smoke_run_prints_one_row_per_stage_and_the_sum(monkeypatch, capsys):
  monkeypatch.setitem(dtf_block.NETWORKS, 'c2d_dtf_resnet50',
                      (1, [('layer1', 5, 8, 3), ('layer2', 3, 16, 2)]))
  assert dtf_block.main(['--network', 'c2d_dtf_resnet50', '--repeats', '1']) == 0
  out = capsys.readouterr().out
  rows = re.findall(r'^\| (layer\d) \| \(1, 4, (\d+), \d+, (\d+)\) \| (\d+) \| ([\d.]+) \| ([\d.]+) \| (\d+) \|$',
                    out, re.M)
  assert [r[:4] for r in rows] == [('layer1', '5', '8', '3'), ('layer2', '3', '16', '2')]
  for _, _, _, count, block_ms, aggregation_ms, stage_ms in rows:
    assert float(block_ms) > 0 and float(aggregation_ms) > 0
    assert abs(int(count) * float(block_ms) - int(stage_ms)) <= 0.5 * int(count) + 0.5
  total = int(re.search(r'^\| all \| \| 5 \| \| \| (\d+) \|$', out, re.M).group(1))
  assert abs(total - sum(int(r[3]) * float(r[4]) for r in rows)) <= 2
