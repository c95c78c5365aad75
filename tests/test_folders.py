"""Folder scoring: layouts, GenEval summary, resume after a kill, server mode, bad files, the HTML report."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image
from rewardscope.service.tools import folders
from rewardscope.service.tools.cli import main
from serving import ROOT


def spec(name: str, count: int = 1) -> dict:
    """One GenEval metadata include/exclude entry."""
    return {"class": name, "count": count}


GENEVAL_PROMPTS = [
    # (folder, tag, prompt, include, exclude, image)
    ("00000", "single_object", "a photo of a bus", [spec("bus")], [], "bus.jpg"),
    ("00001", "single_object", "a photo of a cat", [spec("cat")], [], "bus.jpg"),
    ("00002", "counting", "a photo of two buses", [spec("bus", 2)], [spec("bus", 3)], "bus.jpg"),
    ("00003", "counting", "a photo of three people", [spec("person", 3)], [spec("person", 4)], "zidane.jpg"),
    ("00004", "two_object", "a photo of a person and a tie", [spec("person"), spec("tie")], [], "zidane.jpg"),
]


def make_geneval_folder(root: Path, assets: Path, copies: int = 2) -> Path:
    for folder, tag, prompt, include, exclude, image in GENEVAL_PROMPTS:
        samples = root / folder / "samples"
        samples.mkdir(parents=True)
        metadata = {"tag": tag, "prompt": prompt, "include": include, **({"exclude": exclude} if exclude else {})}
        (root / folder / "metadata.jsonl").write_text(json.dumps(metadata) + "\n")
        source = Image.open(assets / image).convert("RGB")
        for index in range(copies):
            source.save(samples / f"{index:04d}.png")
    return root


def make_flat_folder(flat: Path, assets: Path, broken: bytes) -> Path:
    """A flat folder: four_people.jpg (the bus picture), two_people.jpg, and broken.png holding `broken`."""
    flat.mkdir()
    shutil.copy(assets / "bus.jpg", flat / "four_people.jpg")
    shutil.copy(assets / "zidane.jpg", flat / "two_people.jpg")
    (flat / "broken.png").write_bytes(broken)
    return flat


@pytest.fixture(scope="module")
def assets(bus_path):
    return bus_path.parent


def test_layouts_are_detected(tmp_path, assets):
    geneval = make_geneval_folder(tmp_path / "g", assets, copies=1)
    t2i = tmp_path / "t" / "samples"
    t2i.mkdir(parents=True)
    shutil.copy(assets / "bus.jpg", t2i / "a bus_000001.png")
    flat = tmp_path / "f"
    flat.mkdir()
    shutil.copy(assets / "bus.jpg", flat / "four_people_0.jpg")
    assert folders.detect_layout(geneval) == "geneval"
    assert folders.detect_layout(tmp_path / "t") == "t2i-compbench"
    _, items = folders.folder_items(tmp_path / "t")
    assert [(i.key, i.prompt) for i in items] == [("samples/a bus_000001.png", "a bus")]
    layout, items = folders.folder_items(flat)
    assert layout == "flat" and [(i.key, i.prompt) for i in items] == [("four_people_0.jpg", "four people")]


def test_geneval_folder_summary_equals_a_hand_count(tmp_path, assets, capsys):
    root = make_geneval_folder(tmp_path / "geneval", assets)
    out = tmp_path / "out"
    assert main(["score", str(root), "--out", str(out), "--no-progress"]) == 0
    rows = folders.read_rows(out)
    assert len(rows) == 10 and len({row["key"] for row in rows}) == 10
    verdict = {row["key"]: row["rewards"]["geneval"] for row in rows}
    # The anchors we know from the photos: the bus is there, no cat, one bus only.
    assert verdict["00000/samples/0000.png"] == 1.0 and verdict["00001/samples/0000.png"] == 0.0
    assert verdict["00002/samples/0001.png"] == 0.0
    summary = json.loads((out / "summary.json").read_text())["geneval"]
    by_tag: dict[str, list[float]] = {}
    by_prompt: dict[str, list[float]] = {}
    for row in rows:
        by_tag.setdefault(row["tag"], []).append(row["rewards"]["geneval"])
        by_prompt.setdefault(row["key"].split("/")[0], []).append(row["rewards"]["geneval"])
    assert summary["total_images"] == 10 and summary["total_prompts"] == 5
    assert summary["correct_images"] == pytest.approx(sum(verdict.values()) / 10)
    # A prompt is correct when ANY of its images is (summary_scores.py S:29); before, we asked for all of them. The
    # two copies of each prompt are the same photo here, so both rules give the same figure on this folder.
    assert summary["correct_prompts"] == pytest.approx(sum(max(v) == 1.0 for v in by_prompt.values()) / 5)
    assert list(summary["tasks"]) == ["single_object", "counting", "two_object"]  # first appearance, not sorted
    for tag, values in by_tag.items():
        assert summary["tasks"][tag]["accuracy"] == pytest.approx(sum(values) / len(values))
    assert summary["overall"] == pytest.approx(sum(sum(v) / len(v) for v in by_tag.values()) / len(by_tag))
    assert summary["failed"] == 0 and summary["failures"] == {}
    printed = capsys.readouterr().out
    assert "Overall score (avg. over tasks)" in printed and "% correct images" in printed
    assert "Profile: geneval@1" in printed and "Failed items" not in printed
    table = __import__("pyarrow.parquet", fromlist=["read_table"]).read_table(out / "results.parquet")
    assert table.num_rows == 10 and "reward_geneval" in table.column_names
    run = json.loads((out / "run.json").read_text())
    assert run["layout"] == "geneval" and run["versions"]["geneval"].startswith("yolov3-tiny-darknet@")
    # A GenEval folder is scored under the geneval profile unless --profile says otherwise.
    assert run["profile"] == summary["profile"] == "geneval@1"


def test_an_explicit_profile_wins_and_failed_geneval_items_count_as_incorrect(tmp_path, assets, capsys):
    root = make_geneval_folder(tmp_path / "geneval", assets, copies=1)
    (root / "00000" / "samples" / "0001.png").write_bytes(b"")  # a second "image" of the bus prompt that is empty
    out = tmp_path / "out"
    assert main(["score", str(root), "--out", str(out), "--profile", "train", "--no-progress"]) == 0
    rows = {row["key"]: row for row in folders.read_rows(out)}
    assert rows["00000/samples/0001.png"]["rewards"]["geneval"] is None
    assert rows["00000/samples/0001.png"]["error_code"] == "empty"
    summary = json.loads((out / "summary.json").read_text())
    geneval = summary["geneval"]
    assert (
        json.loads((out / "run.json").read_text())["profile"] == summary["profile"] == geneval["profile"] == "train@1"
    )
    # 6 rows, the empty one among them: totals count it, and it counts as an incorrect image of single_object.
    assert geneval["total_images"] == 6 and geneval["total_prompts"] == 5
    assert (geneval["failed"], geneval["failures"]) == (1, {"empty": 1})
    single = [rows[key]["rewards"]["geneval"] or 0.0 for key in ("00000/samples/0000.png", "00000/samples/0001.png")]
    single += [rows["00001/samples/0000.png"]["rewards"]["geneval"]]
    assert geneval["tasks"]["single_object"] == {"correct": sum(single), "total": 3, "accuracy": sum(single) / 3}
    printed = capsys.readouterr().out
    assert "Profile: train@1" in printed and "Failed items (counted incorrect): 1 — empty: 1" in printed


def geneval_row(group: str, tag: str, value: float | None, error_code: str | None = None, error: str | None = None):
    """A results.jsonl row of a GenEval folder, as the folder engine writes it (only the keys summarise reads)."""
    failed = value is None
    return {
        "key": f"{group}/samples/x.png",
        "prompt": f"prompt {group}",
        "group": group,
        "tag": tag,
        "rewards": {"geneval": value},
        "error": (error or f"failed: {error_code}") if failed else None,
        "error_code": error_code if failed else None,
    }


def test_geneval_summary_follows_summary_scores_by_hand():
    """GenEval's summary rules (djghosh13/geneval evaluation/summary_scores.py, commit d927da8, cited S:NN), on
    3 prompts x 2 images, every figure worked by hand."""
    rows = [
        geneval_row("A", "single_object", 1.0),
        geneval_row("A", "single_object", 0.0),
        geneval_row("B", "counting", 0.0),
        geneval_row("B", "counting", 0.0),
        geneval_row("C", "colors", 1.0),
        geneval_row("C", "colors", None, error_code="colour_unavailable"),
    ]
    summary = folders.summarise(rows, geneval_reward="geneval", profile="geneval@1")["geneval"]
    # Totals count every row, the failed one too: 6 images, 3 prompts (S:26-27).
    assert (summary["total_images"], summary["total_prompts"]) == (6, 3)
    # S:28, mean of `correct` over all images: A1 and C1 are correct, C2 failed = incorrect -> 2 / 6.
    assert summary["correct_images"] == pytest.approx(2 / 6)
    # S:29, groupby(prompt)['correct'].any().mean(): A (1 of 2) yes, B no, C (1 of 2, the other failed) yes -> 2 / 3.
    # (The all-rule we had would give 0 / 3.)
    assert summary["correct_prompts"] == pytest.approx(2 / 3)
    # S:38-40, per tag in first-appearance order (groupby(sort=False)), task_df['correct'].mean() per image:
    # single_object 1 / 2; counting 0 / 2; colors 1 / 2 (the failed image counts in the 2).
    assert summary["tasks"] == {
        "single_object": {"correct": 1, "total": 2, "accuracy": 0.5},
        "counting": {"correct": 0, "total": 2, "accuracy": 0.0},
        "colors": {"correct": 1, "total": 2, "accuracy": 0.5},
    }
    assert list(summary["tasks"]) == ["single_object", "counting", "colors"]
    # S:43, np.mean over every tag present: (0.5 + 0.0 + 0.5) / 3 = 1 / 3.
    assert summary["overall"] == pytest.approx(1 / 3)
    assert (summary["failed"], summary["failures"], summary["profile"]) == (1, {"colour_unavailable": 1}, "geneval@1")


def test_failed_geneval_items_are_reported_and_a_task_of_failures_stays():
    rows = [
        geneval_row("P", "position", None, error="could not decode the image"),  # no code: the message names it
        geneval_row("P", "position", None, error_code="decode_failed"),
        geneval_row("S", "single_object", 1.0),
        geneval_row("S", "single_object", None, error_code="decode_failed"),
    ]
    summary = folders.summarise(rows, geneval_reward="geneval", profile="geneval@1")
    geneval = summary["geneval"]
    assert geneval["failed"] == 3
    assert geneval["failures"] == {"decode_failed": 2, "could not decode the image": 1}  # most frequent first
    # position's images all failed: it stays, at 0 / 2, and the overall averages both tasks: (0 + 1/2) / 2.
    assert geneval["tasks"]["position"] == {"correct": 0, "total": 2, "accuracy": 0.0}
    assert geneval["overall"] == pytest.approx(0.25)
    assert (geneval["total_images"], geneval["correct_images"], geneval["correct_prompts"]) == (4, 0.25, 0.5)
    assert summary["profile"] == geneval["profile"] == "geneval@1"
    printed = folders.format_summary(summary)
    lines = printed.splitlines()
    assert lines[lines.index("=======") + 1] == "Profile: geneval@1"  # the top of GenEval's block
    assert "Failed items (counted incorrect): 3 — decode_failed: 2, could not decode the image: 1" in lines
    assert "position         = 0.00% (0 / 2)" in lines
    clean = folders.format_summary(folders.summarise(rows[2:3], geneval_reward="geneval"))
    assert "Failed items" not in clean and "Profile:" not in clean


def test_t2i_compbench_numeracy_folder(tmp_path, assets):
    samples = tmp_path / "t2i" / "samples"
    samples.mkdir(parents=True)
    for index in range(3):
        shutil.copy(assets / "bus.jpg", samples / f"four people and a bus_{index:06d}.png")
        shutil.copy(assets / "zidane.jpg", samples / f"two cats_{index:06d}.png")
    shutil.copy(assets / "zidane.jpg", samples / f"two people and three candles_{0:06d}.png")
    out = tmp_path / "out"
    assert main(["score", str(tmp_path / "t2i"), "--out", str(out), "--rewards", "numeracy", "--no-progress"]) == 0
    rows = {row["key"]: row for row in folders.read_rows(out)}
    assert len(rows) == 7
    assert rows["samples/four people and a bus_000000.png"]["rewards"]["numeracy"] == 1.0
    assert rows["samples/two cats_000002.png"]["rewards"]["numeracy"] == 0.0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["profile"] == "t2i-compbench@1"  # the benchmark's folder: its own rules by default
    assert summary["mean"]["numeracy"] == pytest.approx(sum(r["rewards"]["numeracy"] for r in rows.values()) / 7)
    # Candles are no COCO class: that prompt is scored on its people alone, and the summary says so.
    candles = rows["samples/two people and three candles_000000.png"]
    assert candles["details"]["numeracy"]["unknown"] == ["candle"]
    assert summary["scoreable"] == {"prompts": 3, "fully_scoreable": 2, "share": 2 / 3, "unseen_nouns": {"candle": 1}}


def test_bad_files_are_reported_per_row_and_the_run_goes_on(tmp_path, assets):
    flat = tmp_path / "flat"
    flat.mkdir()
    shutil.copy(assets / "bus.jpg", flat / "a_bus.jpg")
    (flat / "truncated.jpg").write_bytes((assets / "bus.jpg").read_bytes()[:2000])
    (flat / "empty.png").write_bytes(b"")
    (flat / "notes.png").write_text("this is text, not a picture")
    out = tmp_path / "out"
    assert main(["score", str(flat), "--out", str(out), "--no-progress"]) == 0
    rows = {row["key"]: row for row in folders.read_rows(out)}
    assert rows["a_bus.jpg"]["error"] is None and rows["a_bus.jpg"]["rewards"]["matching"] > 0
    for key, code in [("truncated.jpg", "decode_failed"), ("empty.png", "empty"), ("notes.png", "unsupported_format")]:
        assert rows[key]["rewards"]["matching"] is None and rows[key]["error_code"] == code, rows[key]


@pytest.mark.parametrize(
    "engine",
    ["local", pytest.param("ray", marks=pytest.mark.slow)],
)
def test_a_killed_run_resumes_to_exactly_the_uninterrupted_rows(tmp_path, assets, engine):
    if engine == "ray":
        pytest.importorskip("ray")
    flat = tmp_path / "flat"
    flat.mkdir()
    for index in range(24):
        shutil.copy(assets / ("bus.jpg" if index % 2 else "zidane.jpg"), flat / f"four_people_{index:03d}.jpg")
    command = [
        sys.executable,
        "-m",
        "rewardscope.service.tools.cli",
        "score",
        str(flat),
        "--batch-size",
        "4" if engine == "local" else "2",
        "--no-progress",
        "--engine",
        engine,
    ]
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    process = subprocess.Popen([*command, "--out", str(killed)], cwd=ROOT, start_new_session=True)
    results = killed / folders.RESULTS_FILE
    deadline = time.monotonic() + 120
    while not (results.exists() and results.read_text().count("\n") >= 8):
        assert process.poll() is None and time.monotonic() < deadline, "run ended before it could be killed"
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert results.read_text().count("\n") < 24
    subprocess.run([*command, "--out", str(killed)], cwd=ROOT, check=True, capture_output=True)
    subprocess.run([*command, "--out", str(clean)], cwd=ROOT, check=True, capture_output=True)
    resumed = sorted(folders.read_rows(killed), key=lambda row: row["key"])
    uninterrupted = sorted(folders.read_rows(clean), key=lambda row: row["key"])
    assert [row["key"] for row in resumed] == sorted(path.name for path in flat.iterdir())
    assert resumed == uninterrupted


def test_a_torn_last_line_is_cut_on_resume(tmp_path):
    path = tmp_path / folders.RESULTS_FILE
    path.write_text('{"key": "a.png"}\n{"key": "b.pn')
    writer = folders.ResultsWriter(path)
    writer.close()
    assert writer.done == {"a.png"} and path.read_text() == '{"key": "a.png"}\n'


def test_the_letterbox_resize_runs_once_per_detector_on_the_decode_workers(assets):
    """The folder engine and the service find the detectors to letterbox ahead the same way (Scorer.letterbox_hooks);
    two rewards on one detector resize once, and a prefetched image then skips the resize in its batch."""
    from rewardscope import Scorer

    scorer = Scorer(["matching", "geneval"])
    detector = scorer.rewards["matching"].detector
    assert scorer.rewards["geneval"].detector is detector  # one session per model and runtime config
    assert scorer.letterbox_hooks() == [detector.prepare] == scorer.letterbox_hooks(["geneval"])
    assert scorer.letterbox_hooks(["no-such-reward"]) == []
    backend = folders.ScorerBackend(scorer)
    assert backend.prepare == [detector.prepare]
    image = backend.prefetch(folders.FolderItem(key="bus.jpg", path=assets / "bus.jpg", prompt="a bus"))
    assert len(detector._resized) == 1 and detector._take_prepared([image])[0] is not None


@pytest.mark.slow
def test_server_mode_gives_the_same_rows_as_in_process(tmp_path, assets):
    from serving import running_server

    flat = make_flat_folder(tmp_path / "flat", assets, broken=b"\x89PNG not really")
    local, remote = tmp_path / "local", tmp_path / "remote"
    assert main(["score", str(flat), "--out", str(local), "--no-progress"]) == 0
    with running_server() as base_url:
        assert main(["score", str(flat), "--out", str(remote), "--server", base_url, "--no-progress"]) == 0
    strip = lambda rows: sorted(({k: r[k] for k in ("key", "rewards", "total", "error_code")} for r in rows), key=str)  # noqa: E731
    assert strip(folders.read_rows(local)) == strip(folders.read_rows(remote))


def test_report_has_thumbnails_and_plots(tmp_path, assets):
    flat = make_flat_folder(tmp_path / "flat", assets, broken=b"")
    report = tmp_path / "report"
    assert main(["score", str(flat), "--out", str(tmp_path / "out"), "--report", str(report), "--no-progress"]) == 0
    page = (report / "index.html").read_text()
    assert page.count("<img class=thumb") == 2 and "unreadable" in page
    for plot in ("dist_matching.png", "per_class_accuracy.png"):
        assert (report / plot).stat().st_size > 1000 and Image.open(report / plot).size[0] > 100
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("Debian's chromium is not installed (.ci/run installs it)")
    shot = tmp_path / "shot.png"
    subprocess.run(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
         f"--screenshot={shot}", "--window-size=1200,900", (report / "index.html").as_uri()],
        check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    pixels = Image.open(shot).convert("RGB")
    # Thumbnails are photos: the page is not a blank white/grey sheet.
    assert len(set(pixels.resize((120, 90)).getdata())) > 500


@pytest.mark.slow
def test_ray_engine_gives_the_same_rows_as_in_process(tmp_path, assets):
    pytest.importorskip("ray")
    flat = tmp_path / "flat"
    flat.mkdir()
    for index in range(6):
        shutil.copy(assets / ("bus.jpg" if index % 2 else "zidane.jpg"), flat / f"two_people_{index}.jpg")
    (flat / "empty.png").write_bytes(b"")
    local, distributed = tmp_path / "local", tmp_path / "ray"
    assert main(["score", str(flat), "--out", str(local), "--no-progress"]) == 0
    argv = ["score", str(flat), "--out", str(distributed), "--engine", "ray", "--batch-size", "3", "--no-progress"]
    try:
        assert main(argv) == 0
    finally:
        import ray

        ray.shutdown()
    key = lambda row: row["key"]  # noqa: E731
    assert sorted(folders.read_rows(local), key=key) == sorted(folders.read_rows(distributed), key=key)


def test_folder_scoring_runs_from_inside_a_running_event_loop(tmp_path, assets):
    # It drives the service's Batcher with asyncio.run; a caller already in an event loop (a notebook) still works.
    import asyncio

    from rewardscope import Scorer

    items = [folders.FolderItem(key=str(i), path=assets / "bus.jpg", prompt="a bus") for i in range(3)]
    backend = folders.ScorerBackend(Scorer(["matching"]))

    async def inside() -> folders.RunStats:
        return folders.score_items(items, backend, tmp_path / "out", batch_size=2)

    stats = asyncio.run(inside())
    assert (stats.scored, stats.errors) == (3, 0)
    assert [row["key"] for row in folders.read_rows(tmp_path / "out")] == ["0", "1", "2"]
