"""The published models of results/seed002/models: ``eval --exported`` of the smallest
gives the accuracy its index records (what results/seed002/README.md reports), and
it starts a run (``--init-from``) like a workdir would."""

import json
import pathlib

import pytest

from jcompress.cli import main

MODELS = pathlib.Path(__file__).resolve().parents[1] / "results" / "seed002" / "models"


def _index():
  path = MODELS / "models.json"
  if not path.exists():
    pytest.skip("no published models")
  return json.loads(path.read_text())


def test_the_index_lists_exactly_the_published_files():
  assert sorted(_index()) == sorted(p.name for p in MODELS.glob("*.jcm"))


@pytest.mark.slow
def test_the_smallest_published_model_gives_its_recorded_accuracy(data_dir, capsys):
  index = _index()
  name = min(index, key=lambda n: (MODELS / n).stat().st_size)
  assert main(["eval", "--exported", str(MODELS / name), "--data-dir", str(data_dir),
               "--json"]) == 0
  result = json.loads(capsys.readouterr().out.splitlines()[-1])
  assert result["accuracy"] == index[name]["accuracy"]
  assert result["exported_bytes"] == index[name]["exported_bytes"]
