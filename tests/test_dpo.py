"""DPO pairs: N candidates per prompt scored with real rewards (tiny CLIP) on real photos, best vs worst written
as Parquet in the Pick-a-Pic v2 layout and read back with pyarrow; ties break by file order, near-ties drop;
and /rank's combination options, in process."""

from __future__ import annotations

import base64
import io
import json
import shutil

import pyarrow.parquet as pq
import pytest
from PIL import Image
from rewardscope.models.combine import combine, likelihood_weights
from rewardscope.service.engine import RewardEngine
from rewardscope.service.schemas import ImageInput, RankGroup, RankOptions
from rewardscope.service.settings import ServiceSettings
from rewardscope.service.tools.cli import main
from rewardscope.service.tools.dpo import export_dpo_pairs, read_candidate_groups
from tiny_clip import shared_tiny_clip

from rewardscope import Scorer

PICK_A_PIC_COLUMNS = ("caption", "jpg_0", "jpg_1", "label_0", "label_1")


@pytest.fixture(scope="module")
def config():
    clip_dir = str(shared_tiny_clip())
    return {"clip": {"model": clip_dir}, "pickscore": {"model": clip_dir, "processor": clip_dir}}


@pytest.fixture(scope="module")
def photo_files(tmp_path_factory, bus, zidane):
    import skimage.data

    root = tmp_path_factory.mktemp("photos")
    images = {
        "bus": bus,
        "zidane": zidane,
        "astronaut": Image.fromarray(skimage.data.astronaut()),
        "coffee": Image.fromarray(skimage.data.coffee()),
        "chelsea": Image.fromarray(skimage.data.chelsea()),
    }
    files = {}
    for name, image in images.items():
        files[name] = root / f"{name}.png"
        image.save(files[name])
    return files


def write_nested(root, groups: dict[str, tuple[str, list]]):
    for prompt_id, (prompt, sources) in groups.items():
        folder = root / prompt_id
        folder.mkdir(parents=True)
        (folder / "prompt.txt").write_text(prompt + "\n")
        for name, source in sources:
            shutil.copy(source, folder / name)


def test_pairs_are_best_vs_worst_in_pick_a_pic_columns(tmp_path, photo_files, config):
    candidates = [("a.png", photo_files["bus"]), ("b.png", photo_files["zidane"]), ("c.png", photo_files["coffee"])]
    write_nested(
        tmp_path / "in",
        {
            "p1": ("a bus on a city street", candidates),
            "p2": ("a cat", [("a.png", photo_files["chelsea"]), ("b.png", photo_files["chelsea"])]),  # duplicates
            "p3": ("one image only", [("a.png", photo_files["astronaut"])]),
        },
    )
    # pickscore, not clip: CLIPScore clamps negative cosines to 0, which can tie a random model's candidates.
    scorer = Scorer(["pickscore"], config=config)
    summary = export_dpo_pairs(tmp_path / "in", tmp_path / "pairs.parquet", scorer, batch_size=4)
    # Duplicates score equal, or equal up to float noise from their rows in the batch: never a pair either way.
    assert (summary.groups, summary.pairs, summary.too_few_scored) == (3, 1, 1)
    assert summary.identical + summary.below_margin == 1
    table = pq.read_table(tmp_path / "pairs.parquet")
    assert set(PICK_A_PIC_COLUMNS) <= set(table.column_names)
    row = table.to_pylist()[0]
    scores = [r.total for r in scorer.score([path for _, path in candidates], ["a bus on a city street"] * 3)]
    best, worst = scores.index(max(scores)), scores.index(min(scores))
    assert row["caption"] == "a bus on a city street" and row["prompt_id"] == "p1"
    assert (row["label_0"], row["label_1"]) == (1.0, 0.0)
    assert row["jpg_0"] == candidates[best][1].read_bytes() and row["jpg_1"] == candidates[worst][1].read_bytes()
    assert row["image_0_path"] == f"p1/{candidates[best][0]}"
    assert row["score_0"] == pytest.approx(scores[best]) and row["score_1"] == pytest.approx(scores[worst])
    assert row["margin"] == pytest.approx(scores[best] - scores[worst]) and row["margin"] > 0
    assert json.loads(row["rewards_0"])["pickscore"] == pytest.approx(scores[best])
    assert Image.open(io.BytesIO(row["jpg_0"])).size == Image.open(candidates[best][1]).size


def test_near_ties_drop_by_margin_and_ties_break_by_file_order(tmp_path, photo_files, config):
    # One image per forward: equal images then score exactly equal, whatever their place in the batch.
    scorer = Scorer(["pickscore"], config={"pickscore": {**config["pickscore"], "batch_size": 1}})
    names = ["bus", "zidane", "astronaut", "coffee"]
    scores = dict(
        zip(names, (r.total for r in scorer.score([photo_files[n] for n in names], ["a dog"] * 4)), strict=True)
    )
    best = max(names, key=scores.get)
    worst = min(names, key=scores.get)
    gap = scores[best] - scores[worst]
    # the best photo twice: the copy that sorts first is chosen
    write_nested(
        tmp_path / "in",
        {"g": ("a dog", [("1.png", photo_files[best]), ("2.png", photo_files[worst]), ("0.png", photo_files[best])])},
    )
    export_dpo_pairs(tmp_path / "in", tmp_path / "tie.parquet", scorer)
    row = pq.read_table(tmp_path / "tie.parquet").to_pylist()[0]
    assert (row["image_0_path"], row["image_1_path"]) == ("g/0.png", "g/2.png")
    kept = export_dpo_pairs(tmp_path / "in", tmp_path / "kept.parquet", scorer, margin=gap * 0.99)
    dropped = export_dpo_pairs(tmp_path / "in", tmp_path / "dropped.parquet", scorer, margin=gap * 1.01)
    assert (kept.pairs, dropped.pairs, dropped.below_margin) == (1, 0, 1)
    assert pq.read_table(tmp_path / "dropped.parquet").num_rows == 0


def test_flat_folder_with_prompts_file_through_the_cli(tmp_path, photo_files, config):
    folder = tmp_path / "flat"
    folder.mkdir()
    lines = []
    for index, name in enumerate(["bus", "zidane", "astronaut", "coffee"]):
        shutil.copy(photo_files[name], folder / f"{name}.png")
        prompt = "people" if index < 2 else "a still life"
        lines.append(json.dumps({"file": f"{name}.png", "prompt": prompt}))
    (folder / "prompts.jsonl").write_text("\n".join(lines) + "\n")
    groups = read_candidate_groups(folder)
    assert [(g.prompt_id, [f.name for f in g.files]) for g in groups] == [
        ("people", ["bus.png", "zidane.png"]),
        ("a still life", ["astronaut.png", "coffee.png"]),
    ]
    output = tmp_path / "pairs.parquet"
    code = main(
        ["dpo-pairs", str(folder), "--output", str(output), "--rewards", "clip=1", "pickscore=0.5"]
        + ["--config", json.dumps(config), "--aggregation", "rank_sum"]
    )
    assert code == 0
    rows = pq.read_table(output).to_pylist()
    assert [row["caption"] for row in rows] == ["people", "a still life"]
    # rank_sum of two candidates: the chosen one's rank sum is at least the rejected one's
    scorer = Scorer({"clip": 1.0, "pickscore": 0.5}, config=config)
    for row, group in zip(rows, groups, strict=True):
        results = scorer.score([str(f) for f in group.files], [group.prompt] * len(group.files))
        values = {name: [r.rewards[name] for r in results] for name in ("clip", "pickscore")}
        combined = combine(values, {"clip": 1.0, "pickscore": 0.5}, aggregation="rank_sum")
        assert row["score_0"] == max(combined) and row["score_1"] == min(combined)
        assert row["aggregation"] == "rank_sum/none"


def test_a_folder_without_prompts_is_refused(tmp_path, photo_files):
    (tmp_path / "g").mkdir()
    shutil.copy(photo_files["bus"], tmp_path / "g" / "a.png")
    with pytest.raises(ValueError, match="no prompt.txt"):
        read_candidate_groups(tmp_path)


# ---------------------------------------------------------------------------------------------------------
# /rank combination options (the endpoint's logic, in process; the e2e test drives it over HTTP)


@pytest.fixture(scope="module")
def engine(config):
    return RewardEngine(ServiceSettings(rewards=["clip", "pickscore"], config=config))


def _group(prompt, paths):
    return RankGroup(
        prompt=prompt, candidates=[ImageInput(image=base64.b64encode(p.read_bytes()).decode()) for p in paths]
    )


def test_rank_defaults_to_the_weighted_total(engine, photo_files):
    paths = [photo_files[n] for n in ("bus", "zidane", "coffee")]
    (answer,) = engine.rank([_group("a bus", paths)], None, None)
    assert answer.scores == [candidate.total for candidate in answer.candidates]
    assert answer.chosen == answer.order[0] and answer.rejected == answer.order[-1]
    assert answer.weights is None and (answer.normalization, answer.aggregation) == ("none", "weighted_sum")


@pytest.mark.parametrize(
    "options",
    [
        RankOptions(normalization="zscore"),
        RankOptions(normalization="rank"),
        RankOptions(aggregation="rank_sum"),
        RankOptions(normalization="zscore", likelihood_weights="softmax", temperature=0.5),
    ],
    ids=["zscore", "rank", "rank-sum", "softmax-weights"],
)
def test_rank_combines_the_candidates_rewards(engine, photo_files, options):
    paths = [photo_files[n] for n in ("bus", "zidane", "coffee", "chelsea")]
    weights = {"clip": 1.0, "pickscore": 2.0}
    (answer,) = engine.rank([_group("a bus", paths)], weights, None, options)
    values = {name: [c.rewards[name] for c in answer.candidates] for name in weights}
    expected = combine(values, weights, options.normalization, options.aggregation)
    assert answer.scores == pytest.approx(expected)
    assert answer.order == sorted(range(4), key=lambda i: (-expected[i], i))
    if options.likelihood_weights:
        assert answer.weights == pytest.approx(likelihood_weights(expected, "softmax", 0.5))
        assert sum(answer.weights) == pytest.approx(1.0)


def test_rank_margin_withholds_a_pair_closer_than_the_margin(engine, photo_files):
    group = _group("a cat", [photo_files["chelsea"], photo_files["chelsea"], photo_files["bus"]])
    (free,) = engine.rank([group], None, None)
    gap = free.scores[free.chosen] - free.scores[free.rejected]
    (strict,) = engine.rank([group], None, None, RankOptions(margin=gap + 1e-6))
    assert free.chosen is not None and (strict.chosen, strict.rejected) == (None, None)
    assert strict.order == free.order
