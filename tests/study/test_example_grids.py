"""The README's "Your own data" grids (configs/examples/) dry-run against data made here, given their paths and
counts as the README says, by dotted overrides; and the grids the README shows are those files, verbatim."""

import re

import pytest
from PIL import Image

from pipelines.data.folder import folder_to_shards
from tests.conftest import ROOT

EXAMPLES = ROOT / "configs" / "examples"
CLASSES = ("abyssinian", "beagle", "pug")


def _folder(root, per_class: int):
    """An ImageNet-style folder of real JPEGs, `per_class` of each class."""
    for i, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True)
        for j in range(per_class):
            Image.new("RGB", (16, 12), (80 * i, 9 * j, 50)).save(root / name / f"{name}_{j}.jpg", quality=90)
    return root


@pytest.fixture(scope="module")
def own_data(tmp_path_factory):
    """Pretraining images (4 per class) and a downstream task (25 per class, enough for the grids' 25-shot; 2 per
    class to test), as class folders and as the shards `python -m pipelines.data.folder` makes of them."""
    tmp = tmp_path_factory.mktemp("own-data")
    folders = {"train": _folder(tmp / "imagenet" / "train", 4), "pets": _folder(tmp / "pets" / "train", 25),
               "pets_test": _folder(tmp / "pets" / "test", 2)}
    for src, out, split, shard_size in (("train", "imagenet-wds", "train", 5), ("pets", "pets-wds", "train", 25),
                                        ("pets_test", "pets-wds", "test", 25)):
        folder_to_shards(str(folders[src]), tmp / out, split, shard_size, progress=False, workers=1)
    return tmp


def _overrides(grid: str, data) -> list[str]:
    """The keys that describe one's own data (README, "Your own data"), set to the test's data."""
    counts = ["data.pretrain.size=12", "data.pretrain.num_classes=3", "data.subsets=[3, 6, 11]",  # 1 held out
              "downstream[0].size=75", "downstream[0].num_classes=3"]
    if grid == "folder":
        return [f"data.pretrain.root={data}/imagenet/train", f"downstream[0].root={data}/pets/train",
                f"downstream[0].test_root={data}/pets/test", *counts]
    return [f"data.pretrain.urls={data}/imagenet-wds/train-{{000000..000002}}.tar",
            f"downstream[0].urls={data}/pets-wds/train-{{000000..000002}}.tar",
            f"downstream[0].test_urls={data}/pets-wds/test-000000.tar", *counts]


@pytest.mark.parametrize("grid", ["folder", "webdataset"])
def test_an_example_grid_dry_runs_on_ones_own_data_and_shows_its_points(grid, own_data, tmp_path, capsys):
    from study import run

    code = run.main(["--grid", str(EXAMPLES / f"{grid}.yaml"), "--dry-run", *_overrides(grid, own_data),
                     "--out", str(tmp_path / "runs")])
    out, err = capsys.readouterr()
    assert code == 0, err
    rows = [line.split() for line in out.splitlines()  # the grid's rows (the loader and recipe lines name models too)
            if re.match(r"(ViT-B/16|BiT-R50x1)\s+[\d,]+\s+\d+\s", line)]
    assert sorted((r[0], r[1]) for r in rows) == sorted((m, n) for m in ("ViT-B/16", "BiT-R50x1")
                                                         for n in ("3", "6", "11"))
    assert all(r[-1] == "train" for r in rows)
    assert "not checked" not in out  # every path and count was checked: local folders, or shards with _info.json
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("grid", ["folder", "webdataset"])
def test_an_example_grid_names_a_count_that_does_not_match_the_data(grid, own_data, tmp_path, capsys):
    from study import run

    code = run.main(["--grid", str(EXAMPLES / f"{grid}.yaml"), "--dry-run", *_overrides(grid, own_data),
                     "downstream[0].num_classes=2", "--out", str(tmp_path / "runs")])
    assert code == 2
    assert "downstream[0].num_classes: 2, but " in capsys.readouterr().err


def test_the_readme_shows_the_example_grids_verbatim():
    readme = (ROOT / "README.md").read_text()
    shown = dict(re.findall(r"<!-- (configs/examples/[\w.]+\.yaml)[^>]*-->\n```yaml\n(.*?)```", readme, re.S))
    files = {f"configs/examples/{p.name}": p.read_text() for p in EXAMPLES.glob("*.yaml")}
    assert sorted(shown) == sorted(files), "README: show each of configs/examples/*.yaml under a marker comment"
    for name, text in files.items():
        assert shown[name] == text, f"README's copy of {name} differs from the file"
